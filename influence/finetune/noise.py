"""Seeded label noise: the flipped labels and the ground-truth mask the noise-detection evaluation needs
(method.md §4)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from influence.errors import InvalidInputError


def inject_label_noise(
    labels: Sequence[int] | np.ndarray, rate: float, seed: int, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly round(rate * n) labels chosen uniformly at random with a seed.

    labels: (n,) class indices in [0, num_classes). Binary: y -> 1 - y; multi-class: a class drawn uniformly
    among the other num_classes - 1. num_classes defaults to max(2, max(labels) + 1).
    Returns (noisy_labels (n,) int64, noisy_mask (n,) bool); the input is not modified.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate):
        raise InvalidInputError(f"noise rate must be a number in [0, 1], got {rate!r}")
    if not 0.0 <= rate <= 1.0:
        raise InvalidInputError(f"noise rate must be in [0, 1], got {rate}")
    array = np.asarray(labels)
    if array.ndim != 1:
        raise InvalidInputError(f"labels must be one-dimensional, got shape {array.shape}")
    whole = np.issubdtype(array.dtype, np.integer) or (
        np.issubdtype(array.dtype, np.floating) and bool(np.all(array == np.round(array)))
    )
    if array.size and not whole:
        raise InvalidInputError("labels must be integer class indices")
    clean = array.astype(np.int64)
    n = clean.shape[0]
    if n and clean.min() < 0:
        raise InvalidInputError("labels must be non-negative class indices")
    observed = int(clean.max()) + 1 if n else 0
    if num_classes is None:
        num_classes = max(2, observed)
    if num_classes < 2:
        raise InvalidInputError(f"label noise needs at least 2 classes, got num_classes={num_classes}")
    if observed > num_classes:
        raise InvalidInputError(f"label {observed - 1} is out of range for num_classes={num_classes}")

    rng = np.random.default_rng(seed)
    count = round(rate * n)
    flipped = rng.choice(n, size=count, replace=False)
    noisy = clean.copy()
    if num_classes == 2:
        noisy[flipped] = 1 - clean[flipped]
    else:
        # An offset in 1..C-1 added modulo C is uniform over the other classes and never the original one.
        offsets = rng.integers(1, num_classes, size=count)
        noisy[flipped] = (clean[flipped] + offsets) % num_classes
    mask = np.zeros(n, dtype=bool)
    mask[flipped] = True
    return noisy, mask
