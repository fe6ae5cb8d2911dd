"""Several processes (GPUs) for one video through torch.distributed: the process group, how a run's work is split,
and the exchanges (CFG branches, Ulysses sequence parallel around self-attention).

Launch with `torchrun --nproc-per-node N scail2-lite generate ...`, or call the Python API under a process group the
caller initialised. NCCL on GPUs, gloo on CPU. Splits (`--parallel`):
  cfg      the two CFG branches run side by side on two halves of the ranks; their outputs are exchanged once per
           step (one all-gather of the velocity). With more than 2 ranks each half also splits its branch by Ulysses.
  ulysses  every rank runs both branches on its share of the packed token sequence; self-attention alone needs all
           tokens, so q, k and v go through an all-to-all (tokens -> heads) before it and its output back after it
           (DeepSpeed-Ulysses). Cross-attention, FFN, norms and RoPE are per token and stay local. N must divide the
           head count (40: 2, 4, 5 or 8 ranks).
  auto     cfg when the run uses CFG and the rank count is even, else ulysses.
  off      this process runs alone, whatever group exists (Python callers may make one video per rank).
Ranks layout: rank = branch * sequence_ranks + index in the branch, so a branch's all-to-alls stay between
neighbouring ranks (one host, the fastest links).

Every rank computes the same latents (same seeds, same exchanged values), encodes and decodes for itself (the next
segment's history needs the pixels); rank 0 alone writes the video and shows progress. A failure on any rank:
the first rank to fail says why in one line (`claim_failure`), the others stay quiet, and the launcher (torchrun,
torch.multiprocessing) ends them all.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError
from .settings import PARALLEL_MODES
_FAILED_KEY = "scail2_lite/failed"


class _Session:
    """What this process did to torch.distributed (process state: the group itself is process-wide)."""

    owns_group = False  # we initialised the default group (from torchrun's environment): we destroy it at exit
    failed = False  # a rank failed: tearing the group down at exit could wait on the dead one


def in_group() -> bool:
    """Whether this process is one of several in an initialised group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def is_main_process() -> bool:
    """Whether this process shows progress and writes files: rank 0 of a group, or torchrun's RANK 0 before the
    group exists, or a process alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0


def claim_failure() -> bool:
    """Called by a failing rank: True for the first rank of the group to fail (it says why), False for the others
    (their error follows from the first one, usually a peer that went away). True when alone."""
    if not in_group():
        return True
    _Session.failed = True
    try:
        return dist.distributed_c10d._get_default_store().add(_FAILED_KEY, 1) == 1
    except Exception:  # the store lives in rank 0: gone means rank 0 failed first and said so
        return False


def failure_prefix() -> str:
    """'rank r of n: ' under a group (which rank broke), else ''."""
    return f"rank {dist.get_rank()} of {dist.get_world_size()}: " if in_group() else ""


def _destroy_owned_group() -> None:
    if _Session.owns_group and not _Session.failed and dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class Split:
    """How one run's work is divided among the ranks: `cfg` groups of ranks (1, or 2 = one CFG branch each), each
    splitting its tokens over `sequence` ranks (Ulysses). `branch` is the CFG branch this rank computes when cfg is
    2; `tokens` is the Ulysses hook the blocks run with (None without a sequence split)."""

    rank: int = 0
    world: int = 1
    cfg: int = 1
    sequence: int = 1
    branch: int = 0
    cfg_group: object | None = None
    tokens: "Ulysses | None" = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str | None:
        """For the run summary; None when alone."""
        if self.world == 1:
            return None
        parts = (["cfg 2"] if self.cfg == 2 else []) + ([f"ulysses {self.sequence}"] if self.sequence > 1 else [])
        return f"{' x '.join(parts)} over {self.world} ranks"

    def branches(self, count: int) -> range:
        """The CFG branches (of `count`) this rank computes."""
        return range(self.branch, self.branch + 1) if self.cfg == 2 else range(count)

    def exchange(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every branch's output on every rank: with the CFG split, one all-gather between the two branch ranks
        (the step's only exchange outside the blocks); else the outputs as they are."""
        if self.cfg == 1:
            return outs
        (mine,) = outs
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine.contiguous(), group=self.cfg_group)
        return both


class Ranks:
    """This process's place among the processes that make one video, and the subgroups its splits need."""

    def __init__(self, rank: int = 0, world: int = 1, local_world: int = 1,
                 device: torch.device = torch.device("cpu")) -> None:
        self.rank, self.world, self.local_world, self.device = rank, world, local_world, device
        self._groups: dict[tuple[int, ...], object] = {}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def join(cls, mode: str, device: torch.device) -> "Ranks":
        """The ranks of this run and this rank's device: an initialised default group, else torchrun's environment
        (the group is then initialised here: NCCL on CUDA, gloo on CPU), else this process alone. Under several
        ranks a CUDA device is `cuda:LOCAL_RANK`."""
        if mode not in PARALLEL_MODES:
            raise UserError(f"unknown --parallel {mode!r}; choose one of {', '.join(PARALLEL_MODES)}")
        launched = _env_int("WORLD_SIZE", 1) > 1
        if mode == "off" or not (launched or in_group()):
            if launched and mode == "off":
                raise UserError("--parallel off runs one process, but this one was launched as one of "
                                f"{_env_int('WORLD_SIZE', 1)}: launch it alone (without torchrun) or pick a split")
            return cls(device=device)
        if device.type == "cuda" and device.index is not None and _env_int("WORLD_SIZE", 1) > 1:
            raise UserError(f"--device {device}: under several ranks each takes cuda:LOCAL_RANK; give --device cuda")
        local_rank = _env_int("LOCAL_RANK", 0)
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise UserError(f"rank with LOCAL_RANK {local_rank} has no GPU: this host has "
                                f"{torch.cuda.device_count()}; launch at most that many processes per node")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    device_id=device if device.type == "cuda" else None)
            _Session.owns_group = True
            atexit.register(_destroy_owned_group)
        world = dist.get_world_size()
        return cls(dist.get_rank(), world, _env_int("LOCAL_WORLD_SIZE", world), device)

    def split(self, mode: str, uses_cfg: bool, heads: int) -> Split:
        """The split `mode` asks for, checked against this run (one clear line when it cannot be done)."""
        n = self.world
        cfg, sequence = layout(mode, n, uses_cfg, heads)
        if cfg * sequence == 1:
            return Split()
        branch, index = divmod(self.rank, sequence)
        # new_group is collective: every rank creates every subgroup, in the same order.
        cfg_group = None
        if cfg == 2:
            for i in range(sequence):
                group = self._group((i, i + sequence))
                if i == index:
                    cfg_group = group
        tokens = None
        if sequence > 1:
            groups = [self._group(tuple(range(b * sequence, (b + 1) * sequence))) for b in range(cfg)]
            tokens = Ulysses(groups[branch], sequence, index)
        return Split(self.rank, n, cfg, sequence, branch, cfg_group, tokens)

    def _group(self, ranks: tuple[int, ...]) -> object:
        if len(ranks) == self.world:
            return dist.group.WORLD
        if ranks not in self._groups:
            self._groups[ranks] = dist.new_group(list(ranks))
        return self._groups[ranks]


def layout(mode: str, world: int, uses_cfg: bool, heads: int) -> tuple[int, int]:
    """(CFG groups, ranks per sequence) of `mode` over `world` ranks, checked (one clear line when impossible)."""
    n = world
    if n == 1 or mode == "off":
        if mode in ("cfg", "ulysses"):
            raise UserError(f"--parallel {mode} needs several processes: launch with `torchrun "
                            f"--nproc-per-node N $(which scail2-lite) generate ...`")
        return 1, 1
    if mode == "cfg" and not uses_cfg:
        raise UserError("--parallel cfg splits the two CFG branches, but this run has --guidance 1 (one branch): "
                        "use --parallel ulysses or auto")
    if mode == "cfg" and n % 2:
        raise UserError(f"--parallel cfg needs an even number of ranks, got {n}")
    cfg = 2 if mode == "cfg" or (mode == "auto" and uses_cfg and n % 2 == 0) else 1
    sequence = n // cfg
    if heads % sequence:
        valid = ", ".join(str(d * cfg) for d in range(2, heads + 1) if heads % d == 0 and d * cfg <= 16)
        raise UserError(f"Ulysses splits the {heads} attention heads over {sequence} ranks, which does not divide "
                        f"them: launch {valid} processes for this split")
    return cfg, sequence


def shares(length: int, parts: int) -> list[int]:
    """Tokens per rank: as even as can be, the first `length % parts` ranks one more."""
    base, extra = divmod(length, parts)
    return [base + (i < extra) for i in range(parts)]


class Ulysses:
    """DeepSpeed-Ulysses sequence parallel over `size` ranks of `group`, as the blocks' token split (`blocks.
    TokenSplit`): the blocks run on this rank's share of the tokens; self-attention trades the token split for a
    head split (all-to-all), attends over every token with heads/size heads, and trades back.

    Uneven shares need no padding: all-to-all takes per-rank sizes. Every op outside self-attention is per token,
    and self-attention per head, so the numbers are those of one process (tests/test_distributed.py); the one
    quantity not per head, the fp8 backend's per-tensor scales, is reduced over the group
    (`attention.self_attention`'s `heads_group`)."""

    def __init__(self, group: object, size: int, index: int) -> None:
        self.group, self.size, self.index = group, size, index
        self._length = 0

    def scatter(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's share of `t` along its token axis `dim` (a copy: the full tensor may be freed)."""
        sizes = shares(t.shape[dim], self.size)
        self._length = t.shape[dim]
        start = sum(sizes[: self.index])
        return t.narrow(dim, start, sizes[self.index]).clone()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, share, C) -> (B, L, C), the same on every rank (one all-gather of equal padded pieces)."""
        sizes = shares(self._length, self.size)
        piece = x.new_zeros(x.shape[0], sizes[0], *x.shape[2:])
        piece[:, : x.shape[1]] = x
        pieces = [torch.empty_like(piece) for _ in range(self.size)]
        dist.all_gather(pieces, piece, group=self.group)
        return torch.cat([p[:, :n] for p, n in zip(pieces, sizes)], dim=1)

    def self_attention(self, qkv: list[torch.Tensor], backend: str) -> torch.Tensor:
        """`attention.self_attention` on the full sequence with this rank's heads; q, k, v (B, share, H, D) are
        taken over one at a time (each freed once exchanged); returns (B, share, H, D)."""
        from .attention import self_attention

        sizes = shares(self._length, self.size)
        for i in range(3):
            qkv[i] = self._to_heads(qkv[i], sizes)
        return self._to_tokens(self_attention(qkv, backend, self.group), sizes)

    def _to_heads(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """(B, share, H, D) -> (B, L, H/size, D): head group g goes to rank g, tokens arrive in sequence order."""
        b, n, h, d = t.shape
        send = t.view(b, n, self.size, h // self.size, d).permute(2, 1, 0, 3, 4).reshape(self.size * n, b,
                                                                                         h // self.size, d)
        del t
        recv = send.new_empty(sum(sizes), b, h // self.size, d)
        dist.all_to_all_single(recv, send, output_split_sizes=sizes, input_split_sizes=[n] * self.size,
                               group=self.group)
        return recv.permute(1, 0, 2, 3).contiguous()

    def _to_tokens(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """(B, L, H/size, D) -> (B, share, H, D): the inverse of `_to_heads`."""
        b, _, hs, d = t.shape
        n = sizes[self.index]
        send = t.permute(1, 0, 2, 3).contiguous()
        del t
        recv = send.new_empty(self.size * n, b, hs, d)
        dist.all_to_all_single(recv, send, output_split_sizes=[n] * self.size, input_split_sizes=sizes,
                               group=self.group)
        return recv.view(self.size, n, b, hs, d).permute(2, 1, 0, 3, 4).reshape(b, n, self.size * hs, d)
