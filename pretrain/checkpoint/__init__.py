"""Layout-independent checkpoints: safetensors + a json manifest; see format.py for the layout."""

from pretrain.checkpoint.format import CheckpointError, latest_checkpoint, read_manifest, resolve
from pretrain.checkpoint.io import load, read_full_tensors, save
from pretrain.checkpoint.state import materialize_optimizer_state

__all__ = ["CheckpointError", "latest_checkpoint", "read_manifest", "resolve", "load", "save",
           "read_full_tensors", "materialize_optimizer_state"]
