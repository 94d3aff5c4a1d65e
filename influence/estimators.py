"""Per-layer influence estimators (method.md §2), each "transform the query, then inner product".

One instance serves one layer unit u. With train features g_i (rows of the layer's feature matrix, projected
per-sample gradients) and a test feature q, every estimator scores

    I(z_i, x) = row_scale(||g_i||)_i * g_i . transform_query(q)

so a single feature store (and index) per layer serves them all. Sign: positive = the sample helps.

A new estimator is one class and one line::

    @register_estimator("my-estimator")
    class MyEstimator(Estimator): ...

One with fitted statistics also sets requires_fit (and statistics_nbytes for the budget): every feature store
the service builds then carries its state, restored for each query (influence.statistics).

torch is imported here on first use (influence.lazy), inside the estimators' methods: the service's API reads
this registry (names, requires_fit, needs_checkpoints, statistics_nbytes) without loading it. A plugin module
may import torch at its top; the API then loads it with the plugin.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from influence.errors import InvalidInputError
from influence.lazy import lazy_module

if TYPE_CHECKING:
    from influence.tokens import TokenRows

# Imported on first use: the API reads this registry (names, requires_fit, ...) without loading torch.
torch = lazy_module("torch")

TrainChunks = Callable[[], Iterable["torch.Tensor"]]
# DataInf on token rows: float64 numbers of its token-keyed table held at once (512 MiB).
_TABLE_NUMBERS = 1 << 26


class Estimator(ABC):
    """A per-layer influence estimator: a query transform, an optional row scale, then an inner product."""

    name: ClassVar[str]
    #: True when row_scale uses the train feature norms: score() then computes them when none are given.
    needs_norms: ClassVar[bool] = False
    #: Why the estimator cannot score token rows (the exact embedding, influence.tokens); None when it can.
    token_rows_refusal: ClassVar[str | None] = None
    #: True when it scores only after fit(): its state_dict() is then fitted once per layer of a feature store
    #: and restored for every query (influence.statistics).
    requires_fit: ClassVar[bool] = False
    #: True when the features are per-checkpoint blocks it weighs (TracIn-CP): a store of one checkpoint's
    #: features, as influence.featurize builds it, cannot serve it.
    needs_checkpoints: ClassVar[bool] = False

    @classmethod
    def statistics_nbytes(cls, k: int, token_rows: bool = False) -> int:
        """Bytes of the state fit() leaves for a unit of k features (token_rows: a token-row unit), to check a
        budget before anything is fitted. Default: none."""
        return 0

    def fit(self, train_chunks: TrainChunks, num_params: int) -> None:  # noqa: B027 (optional hook)
        """Fit layer statistics from the train features: train_chunks() yields (c, k) blocks, may be called
        more than once; num_params is the layer's raw parameter count p_u. Default: nothing to fit."""

    @abstractmethod
    def transform_query(self, queries: torch.Tensor) -> torch.Tensor:
        """Map test features (m, k) to the vectors the train features are dotted with, (m, k)."""

    def row_scale(self, norms: torch.Tensor) -> torch.Tensor | None:
        """Per-train-row factor (n,) from the train feature norms (n,); None means 1."""
        return None

    def query_scale(self, norms: torch.Tensor) -> torch.Tensor | None:
        """Per-query factor (m,) from the query norms, for estimators whose transform is one (token rows)."""
        return None

    def fit_token_rows(self, rows: TokenRows, num_params: int) -> None:  # noqa: B027 (optional hook)
        """fit() for a token-row unit (its rows at once). Default: nothing to fit."""

    def attach_token_rows(self, rows: TokenRows) -> None:  # noqa: B027 (optional hook)
        """Bind, after load_state_dict(), the rows a token-row unit was fitted on: a state that sums over them
        keeps them in the store, not in state_dict(). Default: nothing to bind."""

    def score_token_rows(
        self, train: TokenRows, queries: TokenRows, norms: torch.Tensor | None
    ) -> torch.Tensor:
        """Scores (n, m) of token rows (influence.tokens): queries times their per-query factor, joined with
        the train rows on token id, times the per-row factor. norms: the train rows' (n,), or None."""
        if self.token_rows_refusal is not None:
            raise InvalidInputError(
                f"estimator {self.name!r} cannot score this unit: {self.token_rows_refusal}"
            )
        scale = self.query_scale(queries.norms())
        scores = train.dot(queries if scale is None else queries.scaled(scale))
        if norms is None and self.needs_norms:
            norms = train.norms()
        return self.scale_rows(scores, norms)

    def score_transformed(
        self, train: torch.Tensor, transformed: torch.Tensor, norms: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores (n, m) of train features (n, k) against already transformed queries (m, k).

        Lets callers transform the queries once and stream the train rows in chunks.
        """
        dtype = torch.promote_types(train.dtype, transformed.dtype)
        train = train.to(dtype)
        scores = train @ transformed.to(device=train.device, dtype=dtype).T
        if norms is None and self.needs_norms:
            norms = torch.linalg.vector_norm(train, dim=1)
        return self.scale_rows(scores, norms)

    def scale_rows(self, scores: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
        """Inner products (n, m) times the per-row factor row_scale(norms), in place; None norms: as they are.

        The second half of score_transformed, for callers that form the inner products another way (the
        compiled kernel of influence.kernels)."""
        if norms is None:
            return scores
        if tuple(norms.shape) != (scores.shape[0],):
            raise InvalidInputError(f"norms must have shape ({scores.shape[0]},), got {tuple(norms.shape)}")
        scale = self.row_scale(norms.to(device=scores.device))
        if scale is not None:
            scores *= scale.to(scores.dtype).unsqueeze(1)
        return scores

    def score(
        self, train: torch.Tensor, queries: torch.Tensor, norms: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Influence scores (n, m) of train features (n, k) on test features (m, k); norms: optional (n,)."""
        _check_features(train, queries)
        return self.score_transformed(train, self.transform_query(queries), norms)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Fitted statistics, to persist beside the feature store. Default: none."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what state_dict() returned."""
        if state:
            raise InvalidInputError(f"estimator {self.name!r} has no state, got keys {sorted(state)}")


def _check_features(train: torch.Tensor, queries: torch.Tensor) -> None:
    if train.ndim != 2 or queries.ndim != 2 or train.shape[1] != queries.shape[1]:
        raise InvalidInputError(
            f"features must be (n, k) and queries (m, k) with the same k, got {tuple(train.shape)} and "
            f"{tuple(queries.shape)}"
        )


def _check_queries(queries: torch.Tensor, k: int | None = None) -> None:
    if queries.ndim != 2 or (k is not None and queries.shape[1] != k):
        expected = "(m, k)" if k is None else f"(m, {k})"
        raise InvalidInputError(f"queries must have shape {expected}, got {tuple(queries.shape)}")


ESTIMATORS: dict[str, type[Estimator]] = {}
E = TypeVar("E", bound=type[Estimator])


def register_estimator(name: str) -> Callable[[E], E]:
    """Class decorator: register an Estimator subclass under `name` (also sets its `name`)."""

    def decorate(cls: E) -> E:
        if name in ESTIMATORS:
            raise ValueError(f"estimator {name!r} is already registered")
        cls.name = name
        ESTIMATORS[name] = cls
        return cls

    return decorate


def estimator_class(name: str) -> type[Estimator]:
    """The class registered under `name`, to ask what it needs (requires_fit, statistics_nbytes, ...)."""
    if name not in ESTIMATORS:
        raise InvalidInputError(f"unknown estimator {name!r}; expected one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


def make_estimator(name: str, **options: Any) -> Estimator:
    """A new, unfitted estimator by registry name; options go to its constructor."""
    cls = estimator_class(name)
    try:
        return cls(**options)
    except TypeError as error:  # an unknown or missing option
        raise InvalidInputError(f"bad options for estimator {name!r}: {error}") from error


def estimator_names(*, one_checkpoint: bool = False) -> list[str]:
    """Registered estimator names, in registration order; one_checkpoint: only those that score the features
    of one checkpoint (what a feature store holds), without constructor options."""
    return [name for name, cls in ESTIMATORS.items() if not (one_checkpoint and cls.needs_checkpoints)]


def fitted_estimator_names() -> list[str]:
    """Registered estimators whose requires_fit is set, in registration order."""
    return [name for name, cls in ESTIMATORS.items() if cls.requires_fit]


@register_estimator("grad-dot")
class GradDot(Estimator):
    """Grad-Dot / TracIn at one checkpoint: g(z_i) . g(x)."""

    def transform_query(self, queries: torch.Tensor) -> torch.Tensor:
        _check_queries(queries)
        return queries


def _safe_reciprocal(values: torch.Tensor) -> torch.Tensor:
    """1 / values, with 0 where values == 0 (a zero gradient has no direction: its cosine is 0)."""
    return torch.where(
        values > 0, values.reciprocal(), torch.zeros((), dtype=values.dtype, device=values.device)
    )


@register_estimator("cosine")
class Cosine(Estimator):
    """Cosine similarity: g(z_i) . g(x) / (||g(z_i)|| ||g(x)||); 0 where either gradient is zero."""

    needs_norms = True

    def transform_query(self, queries: torch.Tensor) -> torch.Tensor:
        _check_queries(queries)
        return queries * self.query_scale(torch.linalg.vector_norm(queries, dim=1)).unsqueeze(1)

    def query_scale(self, norms: torch.Tensor) -> torch.Tensor:
        return _safe_reciprocal(norms)

    def row_scale(self, norms: torch.Tensor) -> torch.Tensor:
        return _safe_reciprocal(norms)


@register_estimator("datainf")
class DataInf(Estimator):
    """DataInf: q -> M_u q with M_u = (1/lambda)(I - (1/n) sum_i g_i g_i^T / (lambda + ||g_i||^2)).

    lambda = damping_ratio * mean_i ||g_i||^2 / p_u unless `damping` is given (the paper: ratio 0.1).
    Fitted in float64 in two streaming passes (the damping needs the mean norm first).

    On token rows (the exact embedding, whose p_u = vocabulary x width features no matrix can hold) the same
    M_u is applied without forming it: g_k . M_u q = (g_k . q - sum_i c_i (g_k . g_i)) / lambda with
    c_i = (g_i . q) / (n (lambda + ||g_i||^2)) over the n rows it was fitted on (`token_rows`; the rows scored
    when none are attached), i.e. two joins per query: the fitted rows' scores, then the rows scored against
    the token-keyed table sum_i c_i g_i (influence.tokens). Its state is the damping and the row count; the
    rows themselves stay in the store (attach_token_rows after load_state_dict).
    """

    requires_fit = True

    def __init__(self, damping: float | None = None, damping_ratio: float = 0.1):
        if damping is not None and not (math.isfinite(damping) and damping > 0):
            raise InvalidInputError(f"damping must be a positive number, got {damping!r}")
        if not (math.isfinite(damping_ratio) and damping_ratio > 0):
            raise InvalidInputError(f"damping_ratio must be a positive number, got {damping_ratio!r}")
        self.damping_option = damping
        self.damping_ratio = float(damping_ratio)
        self.matrix: torch.Tensor | None = None  # M_u, (k, k) float64
        self.token_rows: TokenRows | None = None  # the rows M_u sums over, for a token-row unit
        self.damping: float | None = None
        self.num_samples = 0

    @classmethod
    def statistics_nbytes(cls, k: int, token_rows: bool = False) -> int:
        """M_u, a k x k float64 matrix; token rows keep only the damping and the row count."""
        return 0 if token_rows else k * k * 8

    def fit(self, train_chunks: TrainChunks, num_params: int) -> None:
        """Fit M_u: train_chunks() yields (c, k) train features; num_params = p_u (raw parameters of u)."""
        damping = self.damping_option
        if damping is None:
            n, squared = 0, 0.0
            for chunk in train_chunks():
                chunk = _as_chunk(chunk)
                n += chunk.shape[0]
                squared += float(chunk.square().sum())
            damping = self._damping(n, squared, num_params)
        weighted: torch.Tensor | None = None
        n = 0
        for chunk in train_chunks():
            chunk = _as_chunk(chunk)
            n += chunk.shape[0]
            weights = (damping + chunk.square().sum(dim=1)).reciprocal()
            partial = (chunk * weights.unsqueeze(1)).T @ chunk
            weighted = partial if weighted is None else weighted.add_(partial)
        if weighted is None or n == 0:
            raise InvalidInputError("DataInf needs at least one train feature row")
        identity = torch.eye(weighted.shape[0], dtype=torch.float64, device=weighted.device)
        self.matrix = (identity - weighted / n) / damping
        self.damping = float(damping)
        self.num_samples = n

    def _damping(self, n: int, squared: float, num_params: int) -> float:
        """lambda from the rows' count and summed squared norms."""
        if int(num_params) < 1:
            raise InvalidInputError(f"num_params must be a positive parameter count, got {num_params!r}")
        if n == 0:
            raise InvalidInputError("DataInf needs at least one train feature row")
        if squared == 0.0:
            # Every train gradient is zero (a LoRA A tensor while B is still zero, or features that
            # underflowed in float16): every score q^T M g_k is 0 whatever M is, so any positive damping
            # gives the same (zero) scores. 1.0 keeps M = I finite instead of failing the whole index.
            return 1.0
        damping = self.damping_ratio * squared / n / int(num_params)
        if not (math.isfinite(damping) and damping > 0):
            raise InvalidInputError(
                f"DataInf's damping came out as {damping!r} (mean squared norm {squared / n!r} over "
                f"{num_params} parameters); pass damping= explicitly"
            )
        return damping

    def fit_token_rows(self, rows: TokenRows, num_params: int) -> None:
        squared = float(rows.norms().double().square().sum())
        damping = self.damping_option
        if damping is None:
            damping = self._damping(len(rows), squared, num_params)
        self.matrix = None
        self.damping = float(damping)
        self.num_samples = len(rows)
        self.token_rows = rows

    def attach_token_rows(self, rows: TokenRows) -> None:
        self.token_rows = rows

    def score_token_rows(
        self, train: TokenRows, queries: TokenRows, norms: torch.Tensor | None
    ) -> torch.Tensor:
        if self.damping is None:
            raise InvalidInputError("DataInf is not fitted: call fit_token_rows() or load_state_dict() first")
        basis = train if self.token_rows is None else self.token_rows
        scores = train.dot(queries, torch.float64)  # g_k . q_j
        fitted = scores if basis is train else basis.dot(queries, torch.float64)  # g_i . q_j
        # From the values as stored, as the dense fit reads them (not the norms taken before a float16 cast).
        squared = basis.norms().double().square()
        weights = fitted / (self.damping + squared).unsqueeze(1) / max(1, len(basis))
        # The table holds (distinct tokens, queries, width) numbers: queries in groups that keep it bounded.
        distinct = max(1, len(basis.token_index()[0]))
        group = max(1, _TABLE_NUMBERS // (distinct * max(1, basis.width)))
        second = torch.empty_like(scores)
        for j0 in range(0, scores.shape[1], group):
            tokens, table = basis.token_sums(weights[:, j0 : j0 + group])  # sum_i c_ij g_i, per token
            second[:, j0 : j0 + group] = train.dot_table(tokens, table)
        return ((scores - second) / self.damping).float()

    def transform_query(self, queries: torch.Tensor) -> torch.Tensor:
        if self.matrix is None:
            raise InvalidInputError("DataInf is not fitted: call fit() or load_state_dict() first")
        _check_queries(queries, self.matrix.shape[0])
        matrix = self.matrix.to(queries.device)
        # M is symmetric, so (M q_j)^T for every row j is q @ M. Computed in float64, returned in q's dtype.
        return (queries.to(torch.float64) @ matrix).to(queries.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.damping is None:
            raise InvalidInputError("DataInf is not fitted: nothing to save")
        state = {
            "damping": torch.tensor(self.damping, dtype=torch.float64),
            "num_samples": torch.tensor(self.num_samples, dtype=torch.int64),
        }
        return (
            state if self.matrix is None else {"matrix": self.matrix.cpu(), **state}
        )  # token rows: no matrix

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) - {"matrix"} != {"damping", "num_samples"}:
            raise InvalidInputError(
                f"DataInf state needs damping, num_samples (and matrix but for token rows); got {sorted(state)}"
            )
        matrix = state.get("matrix")
        if matrix is not None and (matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]):
            raise InvalidInputError(f"DataInf matrix must be square, got {tuple(matrix.shape)}")
        self.matrix = None if matrix is None else matrix.to(torch.float64)
        self.damping = float(state["damping"])
        self.num_samples = int(state["num_samples"])


def _as_chunk(chunk: Any) -> torch.Tensor:
    chunk = torch.as_tensor(chunk).to(torch.float64)
    if chunk.ndim != 2:
        raise InvalidInputError(f"train feature chunks must be (c, k), got {tuple(chunk.shape)}")
    return chunk


@register_estimator("tracin-cp")
class TracInCP(Estimator):
    """TracIn-CP: sum_c eta_c g^c(z_i) . g^c(x) over checkpoints c.

    Features are the concatenation of per-checkpoint blocks of widths `checkpoint_dims`; the query's block c
    is multiplied by `learning_rates[c]`.
    """

    token_rows_refusal = "TracIn-CP weights dense per-checkpoint blocks; token rows have none"
    needs_checkpoints = True

    def __init__(self, checkpoint_dims: Sequence[int], learning_rates: Sequence[float]):
        dims = [int(d) for d in checkpoint_dims]
        rates = [float(r) for r in learning_rates]
        if not dims or len(dims) != len(rates):
            raise InvalidInputError(
                f"tracin-cp needs one learning rate per checkpoint: {len(dims)} dims, {len(rates)} rates"
            )
        if min(dims) < 1:
            raise InvalidInputError(f"checkpoint_dims must be positive, got {dims}")
        if not all(math.isfinite(r) for r in rates):
            raise InvalidInputError(f"learning_rates must be finite, got {rates}")
        self.checkpoint_dims = dims
        self.learning_rates = rates
        self._weights = torch.repeat_interleave(
            torch.tensor(rates, dtype=torch.float64), torch.tensor(dims, dtype=torch.int64)
        )

    def transform_query(self, queries: torch.Tensor) -> torch.Tensor:
        _check_queries(queries, len(self._weights))
        return queries * self._weights.to(device=queries.device, dtype=queries.dtype)
