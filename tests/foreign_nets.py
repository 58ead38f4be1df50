"""Model code written the way other projects write it: old CIFAR repositories, attention/recurrent context,
models that tie or parametrize their own convs, backbones inside bigger models.

sharify's own tests define these classes in the style of code nobody here wrote (``self.bn.forward(x)``,
vector additions beside residual blocks, ``weight_norm``, a conv module reused by several blocks), so the
analysis is tested against the habits of real model code, not only against tidy definitions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__: list[str] = []


# ----------------------------------------------------------------------------------------------------------
# Tracing: direct `submodule.forward(x)` calls, forwards with optional arguments
# ----------------------------------------------------------------------------------------------------------


# (end of tracing section)


# ----------------------------------------------------------------------------------------------------------
# Analysis: non-spatial additions, parametrized convs
# ----------------------------------------------------------------------------------------------------------


# (end of analysis section)


# ----------------------------------------------------------------------------------------------------------
# Ties: convs the model's authors already tied, models inside bigger models
# ----------------------------------------------------------------------------------------------------------


# (end of ties section)
