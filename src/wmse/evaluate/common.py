"""What the kNN and the linear probe share: checks of a train/test feature set, and the accuracy
of ranked predictions. Internal to :mod:`wmse.evaluate` (not re-exported)."""

from __future__ import annotations

from torch import Tensor


def check_features(train_x: Tensor, train_y: Tensor, test_x: Tensor, num_classes: int | None) -> int:
    """Validate shapes/dtypes of a train/test feature set; return the number of classes."""
    for name, x in (("train_x", train_x), ("test_x", test_x)):
        if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
            raise ValueError(
                f"{name} must be a float tensor of shape (N, F), got "
                f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
            )
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train_x has {train_x.shape[1]} features per row but test_x has {test_x.shape[1]}: "
            "extract both with the same encoder"
        )
    if train_y.ndim != 1 or train_y.shape[0] != train_x.shape[0]:
        raise ValueError(
            f"train_y must have shape ({train_x.shape[0]},) to match train_x, got {tuple(train_y.shape)}"
        )
    if train_y.is_floating_point():
        raise ValueError("train_y must hold integer class labels, got a float tensor")
    if train_x.shape[0] == 0:
        raise ValueError("train_x is empty: nothing to compare against")
    if int(train_y.min()) < 0:
        raise ValueError(
            "train_y has negative labels (unlabeled images?): keep only labeled images for evaluation"
        )
    n_cls = int(train_y.max()) + 1
    if num_classes is None:
        return n_cls
    if num_classes < n_cls:
        raise ValueError(f"num_classes={num_classes} but train_y has label {n_cls - 1}")
    return num_classes


def check_test_y(test_x: Tensor, test_y: Tensor) -> None:
    if test_y.ndim != 1 or test_y.shape[0] != test_x.shape[0]:
        raise ValueError(
            f"test_y must have shape ({test_x.shape[0]},) to match test_x, got {tuple(test_y.shape)}"
        )


def accuracy(ranked: Tensor, test_y: Tensor, top: int) -> float:
    """Percent of rows whose label is among the first ``top`` columns of ``ranked`` (M, T)."""
    if ranked.shape[0] == 0:
        raise ValueError("test_x is empty: nothing to evaluate")
    hit = (ranked[:, :top] == test_y.to(ranked.device).view(-1, 1)).any(dim=1)
    return 100.0 * float(hit.double().mean())
