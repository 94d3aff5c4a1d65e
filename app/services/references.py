"""Reference sets and featurizing examples against an index (the one code path queries and workflows share).

A reference ("test") set is what audits, layer reports and batch checks score training rows against:
rows of a registered dataset or inline examples (app/schemas/references.py). The API resolves it cheaply
(`resolve_reference`: the dataset is this tenant's, the rows exist, labels fit the model, the size is within
`max_reference_rows`) into a plain JSON spec kept in the job's params; the worker turns that spec into
examples (`load_reference`, or with the index's sources and store `load_index_reference`) and featurizes them
(`featurize_reference`) exactly as a query featurizes its examples (`featurize_for_index`), both in the index's
`IndexSpace`: the model, tokenizer, dataset and projection checked against the index's manifest first, so
reference and training features always live in the same projected space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy.orm import Session

import influence
from app.config import Settings
from app.errors import Conflict, Invalid
from app.jobs.context import WorkerContext, featurize_options, store_compute_dtype
from app.models import Dataset, Index, RegisteredModel
from app.schemas.indexes import QueryExample
from app.schemas.references import ReferenceSet
from app.services.datasets import get_dataset, read_rows
from app.services.indexes import index_sources
from app.stores import open_store
from influence.errors import ManifestMismatchError

if TYPE_CHECKING:
    from app.jobs.model_cache import ModelCache


@dataclass
class ReferenceFeatures:
    """A featurized reference set: per-layer features (m, k_u) float32, per-row loss and prediction."""

    examples: list  # influence.Example
    features: dict[str, np.ndarray]
    losses: np.ndarray  # (m,) float64
    predictions: np.ndarray  # (m,) int64, -1 for causal LM
    labels: np.ndarray | None  # (m,) int64 class indices (classification), else None

    @property
    def correct(self) -> np.ndarray | None:
        """(m,) bool: the model predicts the row's label (classification only)."""
        if self.labels is None:
            return None
        return self.predictions == self.labels

    @property
    def accuracy(self) -> float | None:
        correct = self.correct
        return None if correct is None or len(correct) == 0 else float(correct.mean())


# --------------------------------------------------------------------------------------------- in the API


def to_examples(given: Sequence[QueryExample], dataset: Dataset, task: str, where: str = "examples") -> list:
    """API examples as influence.Example, label names mapped to the dataset's class indices (422 if unknown)."""
    names = dataset.label_names or []
    out = []
    for i, example in enumerate(given):
        label = example.label
        if task == "classification":
            if isinstance(label, str):
                if label not in names:
                    raise Invalid(
                        f"{where}[{i}].label {label!r} is not a label name of the dataset"
                        + (f" ({', '.join(names[:10])})" if names else " (its labels are class indices)")
                    )
                label = names.index(label)
            if label is None:
                raise Invalid(f"{where}[{i}].label is required for a classification index")
        elif label is not None and not isinstance(label, str):
            label = str(label)
        out.append(influence.Example(text=example.text, label=label, text_pair=example.text_pair))
    pairs = {example.text_pair is None for example in out}
    if len(pairs) > 1:
        raise Invalid(f"either every one of {where} has a text_pair or none does")
    return out


def check_labels(examples: Sequence, model: RegisteredModel, where: str = "examples") -> None:
    """Classification labels must be class indices of the model's head (422 naming the example otherwise)."""
    if model.task != "classification":
        return
    classes = int(model.num_labels or 2)
    for i, example in enumerate(examples):
        if not isinstance(example.label, int) or not 0 <= example.label < classes:
            raise Invalid(f"{where}[{i}].label {example.label!r} is not a class index in [0, {classes})")


def _label_map(reference: Dataset, trained: Dataset) -> dict[int, int] | None:
    """Class index in the reference dataset -> class index of the index's dataset (None: the same numbering).

    Label names number classes in sorted order per dataset, so two files with names map by name; integer
    labels are class indices already."""
    ref_names, train_names = reference.label_names, trained.label_names
    if not ref_names or not train_names or ref_names == train_names:
        if bool(ref_names) != bool(train_names):
            raise Invalid(
                "the reference dataset and the index's dataset label their classes differently (one by name, "
                "one by index); register both the same way"
            )
        return None
    unknown = [name for name in ref_names if name not in train_names]
    if unknown:
        raise Invalid(
            f"reference labels {unknown[:5]} are not labels of the index's dataset ({train_names[:10]})"
        )
    return {i: train_names.index(name) for i, name in enumerate(ref_names)}


def resolve_reference(
    session: Session,
    settings: Settings,
    reference: ReferenceSet,
    *,
    tenant_id: str,
    model: RegisteredModel,
    trained: Dataset,
) -> dict[str, Any]:
    """Check a reference set without loading anything heavy; returns the JSON spec a job keeps in its params."""
    limit = settings.max_reference_rows
    if reference.examples is not None:
        if len(reference.examples) > limit:
            raise Invalid(
                f"{len(reference.examples)} reference examples; at most {limit} (max_reference_rows)"
            )
        for i, example in enumerate(reference.examples):
            for part in (example.text, example.text_pair or ""):
                if len(part) > settings.max_text_chars:
                    raise Invalid(
                        f"reference.examples[{i}]: longer than {settings.max_text_chars} characters"
                    )
        examples = to_examples(reference.examples, trained, model.task, "reference.examples")
        check_labels(examples, model, "reference.examples")
        return {"examples": [{"text": e.text, "text_pair": e.text_pair, "label": e.label} for e in examples]}
    dataset = get_dataset(session, reference.dataset_id or "", tenant_id)
    if dataset.task != model.task:
        raise Invalid(
            f"reference dataset {dataset.id!r} is a {dataset.task} dataset; the model is {model.task}"
        )
    if reference.rows is not None:
        rows = sorted(set(reference.rows))
        if rows[-1] >= dataset.row_count:
            raise Invalid(
                f"reference row {rows[-1]} is out of range: dataset {dataset.id!r} has {dataset.row_count}"
            )
    else:
        rows = None
    count = len(rows) if rows is not None else min(dataset.row_count, reference.limit or dataset.row_count)
    if count > limit:
        raise Invalid(
            f"the reference set has {count} rows; at most {limit} (max_reference_rows): pass `limit` or `rows`"
        )
    if count == 0:
        raise Invalid(f"reference dataset {dataset.id!r} has no rows")
    label_map = _label_map(dataset, trained) if model.task == "classification" else None
    if model.task == "classification":
        classes = int(model.num_labels or 2)
        mapped = [label_map.get(int(x), -1) if label_map else int(x) for x in dataset.labels or []]
        bad = [x for x in mapped if not 0 <= x < classes]
        if bad:
            raise Invalid(
                f"reference dataset {dataset.id!r} has labels outside [0, {classes}) for this model"
            )
    return {
        "dataset_id": dataset.id,
        "rows": rows,
        "limit": None if rows is not None else count,
        "label_map": {str(k): v for k, v in label_map.items()} if label_map else None,
    }


# ---------------------------------------------------------------------------------------------- in workers


def load_reference(settings: Settings, session: Session, spec: dict[str, Any]) -> list:
    """The examples of a resolved reference spec (rows of its dataset, or the inline examples)."""
    if spec.get("examples") is not None:
        return [
            influence.Example(text=e["text"], label=e["label"], text_pair=e.get("text_pair"))
            for e in spec["examples"]
        ]
    dataset = session.get(Dataset, spec["dataset_id"])
    if dataset is None:
        raise Conflict(f"reference dataset {spec['dataset_id']!r} was deleted")
    label_map = {int(k): int(v) for k, v in (spec.get("label_map") or {}).items()}
    if spec.get("rows") is not None:
        rows = [read_rows(settings, dataset, int(r), 1)[0] for r in spec["rows"]]
    else:
        rows = read_rows(settings, dataset, 0, int(spec["limit"]))
    out = []
    for row in rows:
        label = row["label"]
        if label_map and label is not None:
            label = label_map[int(label)]
        out.append(influence.Example(text=row["text"], label=label, text_pair=row.get("text_pair")))
    return out


@dataclass(frozen=True)
class IndexSpace:
    """Where examples are featurized for an index: under its model, in the projected space of its store (where
    its training rows' features live), on these models and device."""

    settings: Settings
    models: ModelCache
    device: str
    store: Any
    model: RegisteredModel
    dataset: Dataset


@dataclass
class IndexSources:
    """An index a worker scores against, with its model and dataset."""

    index: Index
    model: RegisteredModel
    dataset: Dataset

    @classmethod
    def detached(cls, session: Session, index: Index) -> IndexSources:
        """The index's model and dataset (409 if either was removed since), all three detached from `session`
        so that they can be read once it has closed."""
        model, dataset = index_sources(session, index)
        for row in (index, model, dataset):
            session.expunge(row)
        return cls(index, model, dataset)

    def space(self, ctx: WorkerContext, store: Any) -> IndexSpace:
        """The space of the index's store, on the worker's models and device."""
        return IndexSpace(ctx.settings, ctx.models, ctx.device, store, self.model, self.dataset)


@dataclass
class IndexReference(IndexSources):
    """What an audit or a layer report starts from: the index's sources, its store (every checksum verified) and
    the reference examples."""

    store: Any
    examples: list  # influence.Example

    def featurize(self, ctx: WorkerContext, layers: Sequence[str], progress=None) -> ReferenceFeatures:
        """The reference set featurized as a query featurizes its examples."""
        return featurize_reference(self.space(ctx, self.store), self.examples, layers, progress)


def load_index_reference(
    settings: Settings, session: Session, index: Index, spec: dict[str, Any]
) -> IndexReference:
    """The index's sources and verified store (409 if its model or dataset is gone, or it is not ready) and the
    examples of a resolved reference spec."""
    sources = IndexSources.detached(session, index)
    return IndexReference(
        sources.index,
        sources.model,
        sources.dataset,
        store=open_index_store(settings, index),
        examples=load_reference(settings, session, spec),
    )


def featurize_for_index(space: IndexSpace, examples: Sequence, layers: Sequence[str], progress=None):
    """Projected per-layer gradients of `examples` in the space of the index's store: influence.FeatureSet.

    Checks first that what would be computed is what the store holds: model id, revision, weights hash,
    tokenizer, dataset hash, projection and task (ManifestMismatchError -> 409), and the per-layer dims. The
    model computes in the dtype the store's features were computed in (bfloat16 or float32), so the two stay
    comparable; batch and chunk sizes are this process's settings (they bound memory, not the features)."""
    store, model = space.store, space.model
    # Here, not at the top: the model cache imports torch, which only the featurizing (worker) side loads.
    from app.jobs.model_cache import ModelSpec

    spec = ModelSpec.of(model, store_compute_dtype(store.manifest))
    cached = space.models.get(spec, space.device)
    featurizer = cached.featurizer(list(layers), store.manifest.projection)
    store.manifest.check_compatible(
        {
            "model_id": model.id,
            "revision": model.revision or "",
            "weights_hash": spec.weights_hash,
            "tokenizer": cached.tokenizer_id,
            "dataset_hash": space.dataset.content_hash,
            "projection": featurizer.projection.to_dict(),
            "task": model.task,
        }
    )
    for name in layers:
        if featurizer.dims[name] != store.layer_spec(name).dim:
            raise ManifestMismatchError(
                f"layer {name!r}: the model gives {featurizer.dims[name]} features, the index holds "
                f"{store.layer_spec(name).dim}"
            )
    with cached.lock:
        return influence.featurize_examples(
            featurizer,
            cached.loaded.tokenizer,
            list(examples),
            model.task,
            max_length=store.manifest.max_length,
            progress=progress,
            **featurize_options(space.settings),
        )


def featurize_reference(
    space: IndexSpace, examples: Sequence, layers: Sequence[str], progress=None
) -> ReferenceFeatures:
    """featurize_for_index for a reference set, with its labels (for correctness and accuracy)."""
    features = featurize_for_index(space, examples, layers, progress)
    labels = None
    if space.model.task == "classification":
        labels = np.array([int(e.label) for e in examples], dtype=np.int64)
    return ReferenceFeatures(
        examples=list(examples),
        features={name: features.features[name] for name in layers},
        losses=features.losses,
        predictions=features.predictions,
        labels=labels,
    )


def open_index_store(settings: Settings, index: Index):
    """The index's feature store, every checksum verified (a worker reads it whole; 409 if not ready)."""
    if index.status != "ready":
        raise Conflict(f"index {index.id!r} is not ready (status {index.status})")
    store = open_store(settings, index, verify=True)
    store.map_all()
    return store
