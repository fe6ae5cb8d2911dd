"""LoRA files for the Wan/SCAIL-2 DiT: read the layouts people download, map their keys to Wan names, merge.

Rooms: `files` (what the user names: `LoraFile`, `--lora PATH[:STRENGTH]`, reading safetensors and safe pickles),
`keys` (every layout's key names, both directions), `mapping` (a file mapped onto the model: updates, the merge
rule, the match report), `merge` (adding them: dense, 8-bit requantized, side path), `synthetic` (files in every
layout for the synthetic checkpoint and the tests).
"""

from .files import LoraFile, as_lora_file, parse_lora_arg, read_lora_file
from .keys import BLOCK_LINEARS, LAYOUTS, SAT_LORA_LINEARS, wan_to_diffusers
from .mapping import SKIP_RULE, SKIP_SHAPE, LoRA, LoraSource, LoraUpdate, load_lora, load_lora_state, resolve_loras
from .merge import (
    LoraSidePath,
    apply_side_path,
    lora_index,
    merge_block,
    merge_into_model,
    merge_into_state_dict,
    merge_quantized,
    merge_tensor,
    side_factors,
    summed_delta,
)
from .synthetic import I2V_IN_CHANNELS, make_lightx2v_lora, make_synthetic_lora

__all__ = [
    "BLOCK_LINEARS", "I2V_IN_CHANNELS", "LAYOUTS", "SAT_LORA_LINEARS", "SKIP_RULE", "SKIP_SHAPE", "LoRA", "LoraFile",
    "LoraSidePath", "LoraSource", "LoraUpdate", "apply_side_path", "as_lora_file", "load_lora", "load_lora_state", "lora_index",
    "make_lightx2v_lora", "make_synthetic_lora", "merge_block", "merge_into_model", "merge_into_state_dict",
    "merge_quantized", "merge_tensor", "parse_lora_arg", "read_lora_file", "resolve_loras", "side_factors",
    "summed_delta", "wan_to_diffusers",
]
