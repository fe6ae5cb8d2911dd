"""SCAIL-2's 3D RoPE: [extra refs | ref | video | pose] tokens, each segment with its own shifted position grid.

Tables are computed in float64 like upstream and cast once; the rotation itself runs in float32 (upstream rotates
in float64, which at 96k tokens would cost gigabytes for a difference far below bf16 resolution). On CUDA the
model runs q/k RMSNorm and the rotation as one Triton pass (`fused.rms_norm_rope`), with `apply_rope`'s math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

THETA = 10000.0
MAX_POSITIONS = 8192

# (t, h, w) position shifts of the ref, video and pose segments without extra references, keyed by the replace
# flag (SPEC section 3). N extra references (section 6) sit at t 0..N-1 with the ref's h and w shifts, and move
# the ref, video and pose segments N frames later in t.
SHIFTS: dict[bool, tuple[tuple[int, int, int], ...]] = {
    False: ((0, 0, 0), (1, 0, 0), (1, 0, 120)),  # animation
    True: ((0, 120, 0), (0, 0, 0), (0, 0, 120)),  # replacement
}


def axis_lanes(head_dim: int) -> tuple[int, int, int]:
    """Lanes of the t, h and w axes (128 -> 44/42/42), Wan's split for any head_dim."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(head_dim: int, max_len: int = MAX_POSITIONS, theta: float = THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 cos/sin tables (max_len, head_dim/2): per axis frequencies theta^(-2i/lanes), concatenated t|h|w."""
    pos = torch.arange(max_len, dtype=torch.float64)
    angles = [
        torch.outer(pos, theta ** (-torch.arange(0, lanes, 2, dtype=torch.float64) / lanes))
        for lanes in axis_lanes(head_dim)
    ]
    table = torch.cat(angles, dim=1)
    return table.cos(), table.sin()


def _grid_table(
    table: torch.Tensor, head_dim: int, grid: tuple[int, int, int], shift: tuple[int, int, int]
) -> torch.Tensor:
    """Gather one segment's (f, h, w, head_dim/2) rows: each axis indexes its own columns at index + shift."""
    f, h, w = grid
    pt, ph, _ = (lanes // 2 for lanes in axis_lanes(head_dim))
    st, sh, sw = shift
    t_part = table[st : st + f, :pt].view(f, 1, 1, -1).expand(f, h, w, -1)
    h_part = table[sh : sh + h, pt : pt + ph].view(1, h, 1, -1).expand(f, h, w, -1)
    w_part = table[sw : sw + w, pt + ph :].view(1, 1, w, -1).expand(f, h, w, -1)
    return torch.cat([t_part, h_part, w_part], dim=-1)


def _pool2x2(x: torch.Tensor) -> torch.Tensor:
    """Average (f, h, w, c) over 2x2 spatial windows -> (f, h/2, w/2, c)."""
    return F.avg_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)


def _later(shift: tuple[int, int, int], frames: int) -> tuple[int, int, int]:
    return shift[0] + frames, shift[1], shift[2]


def rope_freqs(
    head_dim: int,
    grid: tuple[int, int, int],
    replace_flag: bool,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    extra_refs: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (L, head_dim/2) for the packed sequence
    [extra refs (N,h,w) | ref (1,h,w) | video (f,h,w) | pose (f,h/2,w/2)], N = `extra_refs`.

    `grid` is the video patch grid (f, h, w). The extra references are the N frames of one grid at t 0..N-1
    (SPEC section 6). The pose grid is laid out at video resolution and then average-pooled 2x2 on cos and sin
    separately, so pose rotations are not unit length (upstream behaviour, intended).
    """
    f, h, w = grid
    if h % 2 or w % 2:
        raise ValueError(f"video patch grid {h}x{w} must be even for the half-resolution pose segment")
    if extra_refs < 0 or extra_refs + 1 + f > MAX_POSITIONS:
        raise ValueError(f"{extra_refs} extra references and {f} latent frames exceed {MAX_POSITIONS} positions")
    ref_shift, vid_shift, pose_shift = (_later(s, extra_refs) for s in SHIFTS[bool(replace_flag)])
    out = []
    for table in rope_tables(head_dim):
        extras = [_grid_table(table, head_dim, (extra_refs, h, w), (0, *ref_shift[1:]))] if extra_refs else []
        segments = extras + [
            _grid_table(table, head_dim, (1, h, w), ref_shift),
            _grid_table(table, head_dim, (f, h, w), vid_shift),
            _pool2x2(_grid_table(table, head_dim, (f, h, w), pose_shift)),
        ]
        parts = [p.reshape(-1, head_dim // 2) for p in segments]
        out.append(torch.cat(parts).to(device=device, dtype=dtype))
    return out[0], out[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent lane pairs (2i, 2i+1) of x (B, L, heads, head_dim) by (L, head_dim/2) tables, in float32.

    One complex multiply, `(a + ib)(cos + i sin)`, so the only full-size temporary is the result.
    """
    pairs = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))
    rotation = torch.complex(cos.float(), sin.float()).unsqueeze(1)
    return torch.view_as_real(pairs * rotation).flatten(-2)
