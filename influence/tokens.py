"""Token rows: the exact per-sample gradient of an embedding, stored the way it is (method.md §2).

An embedding's per-sample gradient is row-sparse: G(z) = sum_t e_{id_t} d_t^T has a non-zero row only for the
tokens z holds, and that row is the sum of the output gradients d_t at the positions holding the token. So
G(z) is exactly {token v: g_v(z) = sum_{t: id_t = v} d_t} over z's distinct tokens, and

    <G(z), G(x)> = sum over tokens v held by both z and x of g_v(z) . g_v(x)          (a join on token id)
    ||G(z)||^2   = sum over z's tokens of ||g_v(z)||^2

`TokenRows` holds these for n rows, row-major like a CSR matrix: row r's entries are offsets[r]:offsets[r+1]
of `tokens` (ascending) and `values` (one vector each), so rows are appended, selected and compacted as
slices. A join needs the other order: `order` (stable argsort of the tokens) lists every token's entries
together, in row order, and a join is, per token of the queries, one matrix product of the train rows'
vectors for that token with the queries' vectors for it. The cost of a query is
the number of (train row, token) entries that share a token with it times the vector width: common tokens
([CLS], [SEP], punctuation) are held by almost every row. An optional per-token projection (ProjectionSpec
kind `tokens` with dim below the embedding width) sketches each g_v with one Gaussian matrix shared by all
tokens: an ordinary JL projection of each joined term, which keeps token identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from influence.errors import InvalidInputError
from influence.kernels import COMPILED_DOTS
from influence.lazy import is_tensor, lazy_module

torch = lazy_module("torch")

# Train entries turned to float32 at a time in a join: bounds the extra memory over a float16 memmap.
_JOIN_BLOCK = 1 << 16
# Numbers of an (entries, queries, width) outer product formed at a time (DataInf's token table): 128 MiB.
_OUTER_BLOCK = 1 << 24


class TokenRows:
    """Row-sparse features of n rows (module doc): `offsets` (n + 1,) int64, `tokens` (e,) integer ids,
    ascending within each row, `values` (e, width) floating; `order` (e,) optional, the stable argsort of
    `tokens` (computed on first use when not given). numpy arrays (memmaps included) or torch tensors;
    results of arithmetic are torch."""

    ndim = 2

    def __init__(
        self, offsets: Any, tokens: Any, values: Any, order: Any = None, *, check: bool = True
    ) -> None:
        self.offsets = _numpy(offsets)
        self.tokens = tokens
        self.values = values
        self._order = None if order is None else _numpy(order)
        self._rows: np.ndarray | None = None
        self._sorted_tokens: np.ndarray | None = None
        self._token_index: tuple[np.ndarray, np.ndarray] | None = None
        if check:
            self._check()

    def _check(self) -> None:
        offsets = np.asarray(self.offsets)
        e = len(self.tokens)
        if (
            offsets.ndim != 1
            or len(offsets) < 1
            or offsets[0] != 0
            or offsets[-1] != e
            or np.any(np.diff(offsets) < 0)
        ):
            raise InvalidInputError(f"token rows: offsets must rise from 0 to the {e} entries")
        if self.values.ndim != 2 or self.values.shape[0] != e:
            raise InvalidInputError(
                f"token rows need tokens (e,) and values (e, width); got {e} and {tuple(self.values.shape)}"
            )
        if e:
            tokens = _numpy(self.tokens).astype(np.int64)
            if tokens.min() < 0:
                raise InvalidInputError("token rows: a negative token id")
            rising = np.diff(tokens) > 0
            starts = np.zeros(e, dtype=bool)
            starts[offsets[1:-1][offsets[1:-1] < e]] = True
            if not np.all(rising | starts[1:]):
                raise InvalidInputError("token rows: each row's tokens must be ascending without repeats")
        if self._order is not None and len(self._order) != e:
            raise InvalidInputError("token rows: order must list every entry")

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def from_positions(
        cls,
        ids: torch.Tensor,
        grads: torch.Tensor,
        row_of: torch.Tensor | None = None,
        num_rows: int | None = None,
    ) -> TokenRows:
        """Sum per-position gradients into token rows: ids (B, T) or (P,), grads (B, T, w) or (P, w); the row of
        each position is its batch index (or `row_of`, (P,)). Positions with a zero gradient (padding) add
        nothing and are dropped."""
        if ids.dim() == 2:
            batch, length = ids.shape
            row_of = torch.arange(batch, device=ids.device).repeat_interleave(length)
            ids, grads = ids.reshape(-1), grads.reshape(batch * length, -1)
            num_rows = batch if num_rows is None else num_rows
        if row_of is None or num_rows is None:
            raise InvalidInputError("flat positions need row_of and num_rows")
        keep = grads.abs().amax(dim=1) > 0 if len(grads) else torch.zeros(0, dtype=torch.bool)
        ids, grads, row_of = ids[keep].long(), grads[keep], row_of[keep].long()
        span = int(ids.max()) + 1 if len(ids) else 1
        unique, inverse = torch.unique(row_of * span + ids, sorted=True, return_inverse=True)
        values = torch.zeros(len(unique), grads.shape[1], dtype=grads.dtype, device=grads.device)
        values.index_add_(0, inverse, grads)
        counts = torch.bincount(unique // span, minlength=num_rows)
        offsets = torch.zeros(num_rows + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(counts.cpu(), 0)
        return cls(offsets, unique % span, values, check=False)

    @classmethod
    def empty(cls, num_rows: int, width: int, dtype: torch.dtype | None = None) -> TokenRows:
        """n rows without entries, values of `dtype` (float32 unless given)."""
        return cls(
            np.zeros(num_rows + 1, dtype=np.int64),
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0, width, dtype=dtype or torch.float32),
        )

    @classmethod
    def concat(cls, parts: Sequence[TokenRows]) -> TokenRows:
        """Rows of `parts` one after another."""
        if not parts:
            raise InvalidInputError("nothing to concatenate")
        offsets, shift = [np.zeros(1, dtype=np.int64)], 0
        for part in parts:
            offsets.append(np.asarray(part.offsets[1:], dtype=np.int64) + shift)
            shift += len(part.tokens)
        return cls(
            np.concatenate(offsets),
            np.concatenate([_numpy(p.tokens) for p in parts]),
            np.concatenate([_numpy(p.values) for p in parts]),
            check=False,
        )

    @classmethod
    def gather(cls, parts: Sequence[tuple[TokenRows, Any]], num_rows: int) -> TokenRows:
        """Rows placed by index: part k's row r becomes row positions_k[r] of the result; every result row
        comes from exactly one part (a batch's rows put back in input order)."""
        source = cls.concat([p for p, _ in parts])
        where = np.concatenate([np.asarray(positions, dtype=np.int64) for _, positions in parts])
        if len(where) != num_rows or len(np.unique(where)) != num_rows:
            raise InvalidInputError("gather needs every row exactly once")
        inverse = np.empty(num_rows, dtype=np.int64)
        inverse[where] = np.arange(num_rows)
        return source.select(inverse)

    def __add__(self, other: TokenRows) -> TokenRows:
        """Entry-wise sum of two sets of the same rows (a module called twice in one forward pass)."""
        if other.num_rows != self.num_rows:
            raise InvalidInputError("token rows of different row counts cannot be added")
        rows = torch.from_numpy(np.concatenate([self.entry_rows(), other.entry_rows()]))
        ids = torch.cat([_torch(self.tokens).long(), _torch(other.tokens).long()])
        values = torch.cat([_torch(self.values), _torch(other.values)])
        return TokenRows.from_positions(ids, values, rows, self.num_rows)

    def select(self, positions: Any) -> TokenRows:
        """The rows at `positions` (any order, repeats allowed), renumbered 0.. in that order."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(positions) and (positions.min() < 0 or positions.max() >= self.num_rows):
            raise InvalidInputError(f"row positions must be in [0, {self.num_rows})")
        offsets = np.asarray(self.offsets, dtype=np.int64)
        starts = offsets[positions]
        counts = offsets[positions + 1] - starts
        new_offsets = np.zeros(len(positions) + 1, dtype=np.int64)
        np.cumsum(counts, out=new_offsets[1:])
        entries = np.repeat(starts - new_offsets[:-1], counts) + np.arange(new_offsets[-1])
        return TokenRows(new_offsets, _take(self.tokens, entries), _take(self.values, entries), check=False)

    # ------------------------------------------------------------------------------------------- reading

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def width(self) -> int:
        return int(self.values.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, width): the shape scoring code checks (a query must have the same width)."""
        return self.num_rows, self.width

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, key: Any) -> TokenRows:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.num_rows)
            return self.select(np.arange(start, stop, step))
        return self.select(key)

    def entry_rows(self) -> np.ndarray:
        """The row of every entry, (e,) int64."""
        if self._rows is None:
            self._rows = np.repeat(
                np.arange(self.num_rows, dtype=np.int64), np.diff(np.asarray(self.offsets))
            )
        return self._rows

    @property
    def order(self) -> np.ndarray:
        """Entries in token order (stable: rows ascending within a token), (e,) int64."""
        if self._order is None:
            self._order = np.argsort(_numpy(self.tokens), kind="stable").astype(np.int64)
        return self._order

    def sorted_tokens(self) -> np.ndarray:
        """The entries' tokens in token order (tokens[order]), kept: a store's rows serve query after query."""
        if self._sorted_tokens is None:
            self._sorted_tokens = _numpy(self.tokens)[self.order]
        return self._sorted_tokens

    def token_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(the distinct tokens, ascending; each entry's position among them), from the token order, kept."""
        if self._token_index is None:
            ordered = self.sorted_tokens()
            starts = np.ones(len(ordered), dtype=bool)
            starts[1:] = ordered[1:] != ordered[:-1]
            entry_token = np.empty(len(ordered), dtype=np.int64)
            entry_token[self.order] = np.cumsum(starts) - 1
            self._token_index = (ordered[starts], entry_token)
        return self._token_index

    def norms(self) -> torch.Tensor:
        """||G(z)|| per row (n,) float32, accumulated in float64."""
        squared = torch.zeros(self.num_rows, dtype=torch.float64)
        rows = torch.from_numpy(self.entry_rows())
        for start in range(0, len(self.tokens), _JOIN_BLOCK):
            block = _torch(self.values[start : start + _JOIN_BLOCK]).double()
            squared.index_add_(0, rows[start : start + _JOIN_BLOCK], block.square().sum(dim=1))
        return squared.sqrt().float()

    def scaled(self, factors: torch.Tensor) -> TokenRows:
        """Every row r's vectors times factors[r] (float32)."""
        rows = torch.from_numpy(self.entry_rows())
        values = _torch(self.values).float() * factors.float()[rows].unsqueeze(1)
        return TokenRows(self.offsets, self.tokens, values, self._order, check=False)

    def to_dense(self, vocab_size: int) -> torch.Tensor:
        """(n, vocab_size * width) in the embedding weight's layout: for checks on small inputs."""
        out = torch.zeros(self.num_rows, vocab_size, self.width, dtype=_torch(self.values).dtype)
        out[torch.from_numpy(self.entry_rows()), _torch(self.tokens).long()] = _torch(self.values)
        return out.reshape(self.num_rows, -1)

    def dot(self, queries: TokenRows, dtype: torch.dtype | None = None) -> torch.Tensor:
        """<G(train row i), G(query j)> (n, m): per token of the queries, the train entries holding it times
        the queries' vectors for it, added into (row, query). Each (row, token) is one entry: no repeats.
        Sums in `dtype` (float32 unless given)."""
        dtype = dtype or torch.float32
        if queries.width != self.width:
            raise InvalidInputError(f"queries have width {queries.width}, the rows {self.width}")
        out = torch.zeros(self.num_rows, queries.num_rows, dtype=dtype)
        if not len(self.tokens) or not len(queries.tokens):
            return out
        q_order = queries.order
        q_tokens = _numpy(queries.tokens)[q_order].astype(np.int64)
        q_rows = torch.from_numpy(queries.entry_rows()[q_order])
        q_values = _torch(queries.values).to(dtype)[torch.from_numpy(q_order)]
        distinct, q_start = np.unique(q_tokens, return_index=True)
        q_end = np.append(q_start[1:], len(q_tokens))
        order = self.order
        sorted_tokens = self.sorted_tokens()
        lo = np.searchsorted(sorted_tokens, distinct, side="left")
        hi = np.searchsorted(sorted_tokens, distinct, side="right")
        rows_of = self.entry_rows()
        for k in np.flatnonzero(hi > lo):
            query_block = q_values[q_start[k] : q_end[k]]  # (m_v, w)
            columns = q_rows[q_start[k] : q_end[k]]
            for start in range(int(lo[k]), int(hi[k]), _JOIN_BLOCK):
                entries = order[start : min(int(hi[k]), start + _JOIN_BLOCK)]  # ascending: a forward read
                values = _torch(_take(self.values, entries))
                if dtype == torch.float32 and COMPILED_DOTS.serves(values.dtype, len(query_block)):
                    block = COMPILED_DOTS(values, query_block)  # float16 rows: conversion fused into the dots
                else:
                    block = values.to(dtype) @ query_block.T  # (e_v, m_v)
                rows = torch.from_numpy(rows_of[entries])
                out[rows[:, None], columns[None, :]] += block  # a row holds a token once: no repeats
        return out

    def token_sums(self, weights: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """sum_i weights[i, j] G(row i), as a token-keyed table: (tokens (V,) ascending, table (V, m, w)) over
        the V distinct tokens the rows hold; float64."""
        tokens, entry_token = self.token_index()
        m = weights.shape[1]
        table = torch.zeros(len(tokens), m, self.width, dtype=torch.float64)
        rows_of = self.entry_rows()
        step = max(1, _OUTER_BLOCK // max(1, m * self.width))
        for start in range(0, len(entry_token), step):
            stop = start + step
            values = _torch(self.values[start:stop]).double()  # (b, w)
            weight = weights[torch.from_numpy(rows_of[start:stop])].double()  # (b, m)
            table.index_add_(
                0, torch.from_numpy(entry_token[start:stop]), weight[:, :, None] * values[:, None, :]
            )
        return tokens, table

    def dot_table(self, tokens: np.ndarray, table: torch.Tensor) -> torch.Tensor:
        """<G(row i), T_j> (n, m) float64 for a token-keyed table T (token_sums' form): per entry, its vector
        times the table's (m, w) block of its token (absent tokens: 0)."""
        out = torch.zeros(self.num_rows, table.shape[1], dtype=torch.float64)
        own = _numpy(self.tokens)
        where = np.searchsorted(tokens, own)
        present = (
            (where < len(tokens)) & (tokens[np.minimum(where, len(tokens) - 1)] == own)
            if len(tokens)
            else np.zeros(len(own), bool)
        )
        rows_of = self.entry_rows()
        step = max(1, _OUTER_BLOCK // max(1, table.shape[1] * self.width))
        for start in range(0, len(own), step):
            stop = min(len(own), start + step)
            keep = np.flatnonzero(present[start:stop]) + start
            if not len(keep):
                continue
            values = _torch(_take(self.values, keep)).double()  # (b, w)
            blocks = table[torch.from_numpy(where[keep])]  # (b, m, w)
            out.index_add_(0, torch.from_numpy(rows_of[keep]), torch.einsum("bw,bmw->bm", values, blocks))
        return out


def _take(array: Any, entries: np.ndarray) -> Any:
    if is_tensor(array):
        return array[torch.from_numpy(entries)]
    return np.asarray(array)[entries] if not isinstance(array, np.memmap) else array[entries]


def _torch(array: Any) -> torch.Tensor:
    if is_tensor(array):
        return array
    array = np.asarray(array)
    if not array.flags.writeable:
        array = np.array(array)  # torch refuses read-only buffers (memmaps)
    return torch.from_numpy(array)


def _numpy(array: Any) -> np.ndarray:
    return array.cpu().numpy() if is_tensor(array) else np.asarray(array)
