"""Model registry, built-in families (mlp, mlp-deep, cnn, wrn16), parameter counting, plugins and checkpoints.

    from lawbench.models import register_model, get_model, list_models, get_entry, count_params, ModelError
    model = get_model("mlp", in_shape=(1, 28, 28), num_classes=10, width=640)

Imports torch only; never imports ``bench`` or other packages of the suite.
"""
from .registry import (ENTRY_POINT_GROUP, ModelEntry, ModelError, count_params, get_entry, get_model, list_models,
                       load_entry_points, load_plugin, param_count, register_model, unregister_model)
from . import layers
from .layers import Normalize, Residual, check_structure
from . import families  # noqa: F401  (registers the built-in families)
from .checkpoints import (CheckpointEntry, build_from_entry, default_cache_dir, fetch_checkpoint,
                          list_checkpoint_entries, load_checkpoint, read_checkpoint_entry, save_checkpoint,
                          sha256_file)

__all__ = [
    "register_model", "unregister_model", "get_model", "list_models", "get_entry", "count_params", "param_count",
    "ModelError", "ModelEntry", "load_plugin", "load_entry_points", "ENTRY_POINT_GROUP",
    "layers", "Normalize", "Residual", "check_structure",
    "save_checkpoint", "load_checkpoint", "sha256_file", "CheckpointEntry", "read_checkpoint_entry",
    "list_checkpoint_entries", "fetch_checkpoint", "default_cache_dir", "build_from_entry",
]
