"""Fine-tuning sharified models: ``sharify finetune`` and its Python API.

The data flow, one module each::

    data.load_data ─> loaders.build_loaders ─┐
    model.prepare_model (build, load original weights, head, sharify) ─┼─> finetune.finetune ─> out/
    optim (timm optimizer, shared-aware layer decay, cosine) ──────────┘     (state, loop, distill,
                                                                              checkpoint, resume, outputs,
                                                                              distributed, batchnorm)

Example:
    >>> from sharify.train import finetune, load_data, prepare_model
    >>> data = load_data("fashion-mnist", subset=512)  # doctest: +SKIP
    >>> original, shared = prepare_model("timm:resnet18", num_classes=10, in_chans=1)  # doctest: +SKIP
    >>> result = finetune(shared, data, out="runs/demo", epochs=1, original=original)  # doctest: +SKIP
    >>> # or, taught by the original as well (sharify.train.distill): finetune(..., teacher=original, distill=True)
"""

from .batchnorm import recalibrate_batchnorm
from .checkpoint import atomic_write, latest_checkpoint, load_checkpoint, save_checkpoint, save_weights
from .data import DataBundle, load_data
from .distill import distillation_loss
from .distributed import DistContext, init_distributed
from .errors import CheckpointError, DataError
from .finetune import FinetuneConfig, FinetuneResult, finetune
from .loaders import build_loaders, build_transforms
from .model import load_weights_file, prepare_model, replace_head
from .optim import create_optimizer, create_scheduler, layer_ids, param_groups

__all__ = [
    "CheckpointError",
    "DataBundle",
    "DataError",
    "DistContext",
    "FinetuneConfig",
    "FinetuneResult",
    "atomic_write",
    "build_loaders",
    "build_transforms",
    "create_optimizer",
    "create_scheduler",
    "distillation_loss",
    "finetune",
    "init_distributed",
    "latest_checkpoint",
    "layer_ids",
    "load_checkpoint",
    "load_data",
    "load_weights_file",
    "param_groups",
    "prepare_model",
    "recalibrate_batchnorm",
    "replace_head",
    "save_checkpoint",
    "save_weights",
]
