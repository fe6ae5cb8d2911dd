"""Checkpoint files: which format a file is, its tensors in Wan names, and how they are read and mapped.

Rooms: `keys` (the Wan key contract and other formats' names), `read` (detection and lazy reading), `files`
(mapped weight files and their pages), `pickles` (safe pickle loading), `assign` (state dicts into modules).
This front door names what the rest of the runtime uses.
"""

from .files import FilePages, WeightFiles
from .keys import COMFY_PREFIX, SAT_FILE, check_keys, wan_shapes
from .read import (
    describe,
    detect_format,
    find_dit,
    index_files,
    iter_tensors,
    read_config,
    read_shapes,
    read_state_dict,
)

__all__ = [
    "COMFY_PREFIX", "SAT_FILE", "FilePages", "WeightFiles", "check_keys", "describe", "detect_format", "find_dit",
    "index_files", "iter_tensors", "read_config", "read_shapes", "read_state_dict", "wan_shapes",
]
