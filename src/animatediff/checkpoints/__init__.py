"""Reading, checking and converting every kind of weight file the project uses.

`io` (safe file I/O, torch only) is imported here; the format modules (`motion`, `lora`, `base`,
`adapters`, `detect`) are imported where used, as they pull in diffusers and transformers.
"""

from .io import CheckpointError, load_state_dict, read_metadata, save_state_dict

__all__ = ["CheckpointError", "load_state_dict", "read_metadata", "save_state_dict"]
