"""Input and output: files that keep the sharing, and the models they are loaded into.

Reads and writes ``.safetensors`` files. :mod:`~sharify.io.serialization` holds :func:`sharify.save` (each
shared tensor once, the model's own ties once, and the :class:`~sharify.io.recipe.Recipe` -- options,
groups, stores, source -- in the file's metadata) and :func:`sharify.load` (rebuild the model from its
recorded source, re-apply the recipe, check it fits, load); :mod:`~sharify.io.recipe` is the recipe,
:mod:`~sharify.io.reapply` fits it to a model and re-applies it, :mod:`~sharify.io.source` and
:mod:`~sharify.io.zoo` name and build models (timm, torchvision), :mod:`~sharify.io.aliases` keeps the model's
own tied tensors, :mod:`~sharify.io.unshared` loads ordinary (unshared) checkpoints into a shared model, and
:mod:`~sharify.io.atomic` is the one atomic file writer (training checkpoints use it too).
"""

from .serialization import load, read_recipe, save
from .unshared import load_unshared_state_dict

__all__ = ["load", "load_unshared_state_dict", "read_recipe", "save"]
