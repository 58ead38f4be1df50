"""Analysis: what a model computes, read from its code without changing it.

Reads an ``nn.Module`` (and optional example inputs); produces an :class:`~sharify.analysis.analyse.Analysis`:
the torch.fx graph of its forward (:mod:`~sharify.analysis.tracing`: Hugging Face forwards traced with their
defaults, untraceable submodules leafed), the shape of every node up to the last residual addition, on fake
or meta tensors (:mod:`~sharify.analysis.shapes`), the residual blocks and the stages they chain into
(:mod:`~sharify.analysis.residual`), and, for the rewrite's channel alignment, each conv's freely permutable
channels (:mod:`~sharify.analysis.channels`). A model whose own forward cannot be traced (a detector) is
analysed part by part, each part with the inputs a recorded run gave it (:mod:`~sharify.analysis.descend`).
:mod:`~sharify.analysis.folding` finds the conv -> BatchNorm pairs (for the report and
:func:`sharify.fold_batchnorm`). Nothing here modifies the model; nothing here knows the sharing rule (that is
:mod:`sharify.planning`).
"""

from .analyse import Analysis, analyse

__all__ = ["Analysis", "analyse"]
