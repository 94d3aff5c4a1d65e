"""A toy estimator with fitted state and a toy aggregation, written as a plugin would write them: each is one
definition and one registering line, and the library, the service and its API take them from there.

Importing this module registers them: tests load it with tests.plugins.loaded_plugin, which removes the
registrations afterwards, so that tests which do not ask for the toys never see them.
"""

from __future__ import annotations

import torch

from influence.aggregation import AggregationOptions, ScoreSource, register_aggregator
from influence.estimators import Estimator, TrainChunks, register_estimator


@register_estimator("toy-diag")
class ToyDiagonal(Estimator):
    """q -> q / (1 + d) with d_j the mean square of feature j over the train rows: a per-feature diagonal
    scaling fitted on the train features (a diagonal stand-in for DataInf's M_u)."""

    requires_fit = True
    token_rows_refusal = "the toy scales dense features only"

    def __init__(self) -> None:
        self.scale: torch.Tensor | None = None

    @classmethod
    def statistics_nbytes(cls, k: int, token_rows: bool = False) -> int:
        return 0 if token_rows else 8 * k

    def fit(self, train_chunks: TrainChunks, num_params: int) -> None:
        squares, rows = None, 0
        for chunk in train_chunks():
            chunk = torch.as_tensor(chunk, dtype=torch.float64)
            part = chunk.square().sum(dim=0)
            squares = part if squares is None else squares + part
            rows += chunk.shape[0]
        self.scale = (1.0 + squares / rows).reciprocal()

    def transform_query(self, queries: torch.Tensor) -> torch.Tensor:
        return queries * self.scale.to(device=queries.device, dtype=queries.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.scale = state["scale"].to(torch.float64)


@register_aggregator("toy-agg")
def toy_lowest(source: ScoreSource, options: AggregationOptions) -> torch.Tensor:
    """A row is as harmful as its worst vote: the lowest score any (layer, test column) gives it."""
    lowest = [block.double().min(dim=1).values for block in source.voter_blocks()]
    return torch.stack(lowest).min(dim=0).values
