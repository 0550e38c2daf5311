"""Exports for PyTorch users: PEFT adapters (both ways), merged MLX models, Hugging Face checkpoints.

torch/transformers/peft are only needed by `verify` (the `dev` extra).
"""

from .hf import export_hf, fuse, hf_state_dict
from .peft import export_peft, import_peft

__all__ = ["export_hf", "export_peft", "fuse", "hf_state_dict", "import_peft"]
