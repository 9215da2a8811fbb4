"""CPSL's self-labeling core in plain torch: a plug-in for any self-training loop.

It needs only torch: ``import cpsl_hf.selflabel`` imports neither transformers nor accelerate
(``tests/test_imports.py``).

- :func:`sinkhorn`: class-balanced Sinkhorn-Knopp (float32+, autocast-proof, zero-mass rows for a filling bank).
- :class:`MemoryBank`: FIFO ring buffer with a device-side pointer.
- :func:`class_balanced_sample`, :func:`uniform_sample`: static-shape per-image pixel sampling.
- :class:`ClassPrior`, :func:`class_histogram`, :func:`rectify`, :func:`class_argmax`: distribution alignment and pseudo-label rectification.
- :func:`prototypes_from_features`, :class:`PrototypeAccumulator`: class-mean prototype initialisation.
- losses: :func:`self_labeling_loss`, :func:`symmetric_kl`, :func:`one_way_kl`, :func:`rce_loss`,
  :func:`symmetric_ce_loss`, :func:`masked_cross_entropy`.
- :class:`SelfLabeling`: the whole per-step algorithm, returning :class:`SelfLabelingOutput`;
  :func:`cosine_logits`: the cosine classifier's scores ``cos(z, W) / tau`` of a map of embeddings.
"""

from .distributed import all_gather_rows, all_reduce_sum
from .losses import (
    masked_cross_entropy,
    one_way_kl,
    rce_loss,
    self_labeling_loss,
    symmetric_ce_loss,
    symmetric_kl,
)
from .memory import MemoryBank
from .module import SelfLabeling, SelfLabelingOutput, cosine_logits
from .prior import ClassPrior, class_argmax, class_histogram, rectify
from .prototypes import PrototypeAccumulator, prototypes_from_features
from .sampling import class_balanced_sample, uniform_sample
from .sinkhorn import sinkhorn

__all__ = [
    "ClassPrior",
    "MemoryBank",
    "PrototypeAccumulator",
    "SelfLabeling",
    "SelfLabelingOutput",
    "all_gather_rows",
    "all_reduce_sum",
    "class_balanced_sample",
    "class_argmax",
    "class_histogram",
    "cosine_logits",
    "masked_cross_entropy",
    "one_way_kl",
    "prototypes_from_features",
    "rce_loss",
    "rectify",
    "self_labeling_loss",
    "sinkhorn",
    "symmetric_ce_loss",
    "symmetric_kl",
    "uniform_sample",
]
