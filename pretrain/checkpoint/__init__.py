"""Layout-independent checkpoints: safetensors + a json manifest; see format.py for the layout.

save/load (io.py) need DeepSpeed and megatron-core and are imported on first use, so tools that
only read or write checkpoint files (offline.py, tools/convert_checkpoint.py) start quickly.
"""

from pretrain.checkpoint.format import CheckpointError, latest_checkpoint, read_manifest, resolve

__all__ = ["CheckpointError", "latest_checkpoint", "read_manifest", "resolve", "load", "save",
           "read_full_tensors", "materialize_optimizer_state", "optimizer_step"]


def __getattr__(name: str):
    if name in ("load", "save"):
        from pretrain.checkpoint import io

        return getattr(io, name)
    if name == "read_full_tensors":  # (name, full tensor) pairs, for tools
        from pretrain.checkpoint.offline import iter_tensors

        return iter_tensors
    if name in ("materialize_optimizer_state", "optimizer_step"):
        from pretrain.checkpoint import state

        return getattr(state, name)
    raise AttributeError(f"module 'pretrain.checkpoint' has no attribute {name!r}")
