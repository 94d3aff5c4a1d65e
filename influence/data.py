"""Examples, tokenisation and batching shared by featurisation, fine-tuning and queries.

A classification example is (text, text_pair?, label: class index). A causal-LM example is (text = prompt,
label = completion string): the loss is taken on the completion tokens only, the prompt is masked. A causal-LM
example without a completion is plain language modelling on all of its tokens.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from influence.errors import InvalidInputError
from influence.lazy import lazy_module

# Batches are made on workers; the API reads tasks, columns and rows here without loading torch.
torch = lazy_module("torch")

TaskKind = Literal["classification", "causal-lm"]
TASKS: tuple[str, ...] = ("classification", "causal-lm")
IGNORE_INDEX = -100  # the label value that torch's cross-entropy skips


@dataclass(frozen=True)
class Example:
    """One input: `label` is a class index (classification) or a completion string (causal LM)."""

    text: str
    label: int | str | None = None
    text_pair: str | None = None


@dataclass
class EncodedExample:
    """Token ids of one example; `labels` is per token for causal LM (IGNORE_INDEX on the prompt)."""

    input_ids: list[int]
    label: int | None = None
    token_labels: list[int] | None = None


@dataclass
class Batch:
    """A right-padded batch.

    input_ids, attention_mask: (B, T) int64. labels: (B,) class indices for classification, or (B, T) token
    labels aligned with input_ids (not shifted; IGNORE_INDEX where no loss) for causal LM. row_ids: (B,) the
    position of each example in the sequence it was batched from.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    task: str
    row_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.task,
            self.row_ids,
        )

    @property
    def padding_fraction(self) -> float:
        """Share of the (B, T) grid that is padding: wasted work."""
        return 1.0 - float(self.attention_mask.float().mean())


def check_task(task: str) -> str:
    if task not in TASKS:
        raise InvalidInputError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def encode_examples(
    tokenizer, examples: Sequence[Example], task: str, max_length: int
) -> list[EncodedExample]:
    """Tokenise examples (no padding). Classification labels must be integers."""
    check_task(task)
    if task == "classification":
        texts = [e.text for e in examples]
        pairs = [e.text_pair for e in examples]
        if any(p is not None for p in pairs):
            if any(p is None for p in pairs):
                raise InvalidInputError("either every example has a text_pair or none does")
            enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        else:
            enc = tokenizer(texts, truncation=True, max_length=max_length)
        out = []
        for e, ids in zip(examples, enc["input_ids"], strict=True):
            if e.label is None or isinstance(e.label, str) or int(e.label) != e.label:
                raise InvalidInputError(f"classification needs an integer label, got {e.label!r}")
            out.append(EncodedExample(list(ids), label=int(e.label)))
        return out

    eos = tokenizer.eos_token_id
    out = []
    for e in examples:
        prompt = tokenizer(e.text, add_special_tokens=True)["input_ids"]
        if e.label is None:
            ids = prompt[:max_length]
            token_labels = list(ids)
        else:
            completion = tokenizer(str(e.label), add_special_tokens=False)["input_ids"]
            if eos is not None:
                completion = [*completion, eos]
            # Keep the completion whole where possible: the loss lives there, so truncate the prompt's start.
            keep_prompt = max(1, max_length - len(completion))
            prompt = prompt[-keep_prompt:]
            ids = (prompt + completion)[:max_length]
            token_labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
        if not any(t != IGNORE_INDEX for t in token_labels[1:]):
            raise InvalidInputError(
                "a causal-LM example needs at least one completion token after the prompt"
            )
        out.append(EncodedExample(list(ids), token_labels=token_labels))
    return out


def collate(encoded: Sequence[EncodedExample], pad_token_id: int, task: str, row_ids: Sequence[int]) -> Batch:
    """Right-pad encoded examples into one Batch."""
    width = max(len(e.input_ids) for e in encoded)
    n = len(encoded)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    if task == "classification":
        labels = torch.tensor([e.label for e in encoded], dtype=torch.long)
    else:
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(encoded):
        length = len(e.input_ids)
        input_ids[i, :length] = torch.tensor(e.input_ids)
        attention[i, :length] = 1
        if e.token_labels is not None:
            labels[i, :length] = torch.tensor(e.token_labels)
    return Batch(input_ids, attention, labels, task, torch.tensor(list(row_ids), dtype=torch.long))


def iter_batches(
    encoded: Sequence[EncodedExample],
    pad_token_id: int,
    task: str,
    batch_size: int,
    sort_by_length: bool = True,
    max_tokens: int | None = None,
) -> Iterator[Batch]:
    """Yield batches of at most `batch_size` rows and, with `max_tokens`, at most that many tokens counting
    padding (rows x longest row): LLM rows of 256 tokens then run in fewer rows than short sentences. A row
    longer than the budget runs alone. With sort_by_length, rows of similar length go together (less padding).

    Each Batch.row_ids says which input rows it holds, so callers can put results back in order.
    """
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise InvalidInputError(f"max_tokens must be at least 1, got {max_tokens}")
    order = np.arange(len(encoded))
    if sort_by_length:
        order = np.argsort([len(e.input_ids) for e in encoded], kind="stable")
    start = 0
    while start < len(order):
        stop, width = start, 0
        while stop < len(order) and stop - start < batch_size:
            wider = max(width, len(encoded[order[stop]].input_ids))
            if max_tokens is not None and stop > start and (stop - start + 1) * wider > max_tokens:
                break
            stop, width = stop + 1, wider
        idx = order[start:stop].tolist()
        yield collate([encoded[i] for i in idx], pad_token_id, task, idx)
        start = stop


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS token."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise InvalidInputError("the tokenizer has neither a pad nor an EOS token")


def read_labelled_tsv(path: str | Path, limit: int | None = None) -> list[Example]:
    """Read a GLUE-style TSV with header `sentence<TAB>label` (e.g. the repository's data/sst2/train.tsv)."""
    examples: list[Example] = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        for row in reader:
            examples.append(Example(text=row["sentence"].strip(), label=int(row["label"])))
            if limit is not None and len(examples) >= limit:
                break
    return examples


def stratified_subsample(examples: Sequence[Example], size: int, seed: int) -> list[Example]:
    """At most `size` examples with the label proportions of the input, chosen with a seed (order kept)."""
    if size >= len(examples):
        return list(examples)
    rng = np.random.default_rng(seed)
    labels = np.array([e.label for e in examples])
    chosen: list[int] = []
    classes, counts = np.unique(labels, return_counts=True)
    quotas = np.floor(counts / len(examples) * size).astype(int)
    quotas[np.argsort(-counts)[: size - quotas.sum()]] += 1  # hand out the rounding remainder
    for cls, quota in zip(classes, quotas, strict=True):
        idx = np.flatnonzero(labels == cls)
        chosen.extend(rng.choice(idx, size=quota, replace=False).tolist())
    return [examples[i] for i in sorted(chosen)]
