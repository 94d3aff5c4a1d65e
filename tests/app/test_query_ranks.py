"""The per-layer ranks a query reports for its shown rows equal the library's average ranks of every row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.services.queries import shown_layer_ranks
from influence import average_ranks


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shown_count", [1, 7, 300])
def test_shown_layer_ranks_equal_average_ranks(ties, shown_count):
    rng = np.random.default_rng(shown_count + 10 * ties)
    scores = rng.standard_normal((2_000, 5)).astype(np.float32)
    if ties:
        scores = np.round(scores * 3) / 3  # a handful of distinct values per layer: ties everywhere
        scores[:50, 2] = 0.0
    shown = np.unique(rng.choice(len(scores), size=shown_count, replace=False))
    expected = average_ranks(torch.from_numpy(scores)).numpy()[shown]
    got = shown_layer_ranks(scores, shown)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, expected)


def test_shown_layer_ranks_extremes():
    scores = np.array([[3.0], [1.0], [2.0], [1.0], [5.0]], dtype=np.float32)
    # ascending: 1.0, 1.0 share ranks 0 and 1 -> 0.5; 2.0 -> 2; 3.0 -> 3; 5.0 -> 4
    got = shown_layer_ranks(scores, np.array([0, 1, 3, 4]))
    np.testing.assert_array_equal(got[:, 0], [3.0, 0.5, 0.5, 4.0])
