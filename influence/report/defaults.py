"""What a layer report uses when the caller names nothing, and the correct-only suffix of an aggregation name.

Light on purpose (no torch): the service's API validates report requests and documents their defaults from
here without loading the library's compute side.
"""

from __future__ import annotations

from influence.estimators import estimator_class, estimator_names

# An aggregation name with this suffix aggregates over the reference rows the model predicts correctly only.
CORRECT_SUFFIX = "-c"
DEFAULT_AGGREGATIONS: tuple[str, ...] = ("mean", "rank", "vote", "rank-c", "vote-c")
# Every registered estimator that scores one checkpoint's features, token rows included (registration order).
DEFAULT_ESTIMATORS: tuple[str, ...] = tuple(
    name for name in estimator_names(one_checkpoint=True) if estimator_class(name).token_rows_refusal is None
)
DEFAULT_QUANTILES: tuple[float, ...] = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
