"""Evaluation of frozen representations: feature extraction, kNN, linear probe, a printed table.

The protocol follows the paper and the official code (htdt/self-supervised, ``eval/knn.py`` and
``eval/sgd.py``), which we read to match it:

- features are ``E(x)`` of the un-augmented train and test images, used as they are (the official
  code applies no normalisation and no BatchNorm before the linear layer, and neither do we);
- kNN: k = 5, Euclidean distance, majority vote (official: ``torch.cdist`` + ``topk`` +
  ``unique(return_counts=True)`` + ``argmax``, so among tied vote counts the smallest label wins,
  which is also what scikit-learn's ``KNeighborsClassifier`` does);
- weighted kNN (not in the official code, reported by many papers, e.g. InstDisc and DINO):
  k = 200, cosine similarity, each neighbour votes ``exp(sim / 0.07)`` for its class;
- linear probe: one ``nn.Linear(F, C)`` with PyTorch's default init, cross-entropy, Adam
  (lr 1e-2, weight_decay 5e-6 added to the gradient, i.e. L2 not AdamW), the lr multiplied by
  ``gamma = (1e-6 / 1e-2) ** (1 / epochs)`` after every epoch (``ExponentialLR``), 500 epochs of
  shuffled batches of 1000, top-1 and top-5 on the test set with the final weights.

The computations are rewritten for speed on a CPU (a chunked matmul for the distances, shared by
the Euclidean and cosine kNN; the linear layer trained with hand-written gradients and Adam
update), and tested against scikit-learn and against the official formulation.

All accuracies returned by this package are percentages in ``[0, 100]``.

Modules, one job each: :mod:`.features` (encoder over an image tensor), :mod:`.knn` (both kNN
protocols), :mod:`.probe` (the linear probe and its optimiser), :mod:`.protocol` (everything
``wmse evaluate`` reports), :mod:`.table` (results as a text table), :mod:`.common` (input checks
and the accuracy count that kNN and probe share).
"""

from __future__ import annotations

from .features import extract_features
from .knn import Metric, Weighting, knn_accuracy, knn_classify, knn_evaluate, weighted_knn_accuracy
from .probe import linear_probe
from .protocol import evaluate_features
from .table import flatten, format_table

__all__ = [
    "extract_features",
    "knn_classify",
    "knn_accuracy",
    "weighted_knn_accuracy",
    "knn_evaluate",
    "linear_probe",
    "evaluate_features",
    "format_table",
    "flatten",
    "Metric",
    "Weighting",
]
