"""ORM models: what the service remembers. Job state lives here, not in the Celery result backend.

Every resource (model, dataset, index, job) belongs to exactly one tenant; API keys authenticate a caller as a
tenant, and every query the API makes is filtered by it (app/services/tenancy.py).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class TenantOwned:
    """The columns of every tenant's resource: its id, its tenant and when it was made (app/services/tenancy.py
    finds a resource by id and tenant and lists a tenant's newest first)."""

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Tenant(Base):
    """A customer: owns models, datasets, indexes and jobs; nothing of one tenant is visible to another."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """An API key of a tenant. Only the sha256 of the token is stored; `prefix` (its first characters, not
    secret) finds the row, then the hash is compared in constant time."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RegisteredModel(TenantOwned, Base):
    """A model registration: where the weights are and which layer units it exposes."""

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(Text)  # hub id or local folder
    revision: Mapped[str | None] = mapped_column(String(200), nullable=True)
    task: Mapped[str] = mapped_column(String(32))  # classification | causal-lm
    num_labels: Mapped[int | None] = mapped_column(Integer, nullable=True)  # classes; None for causal-lm
    adapter: Mapped[str | None] = mapped_column(Text, nullable=True)
    checkpoints: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # [{adapter, learning_rate}]
    weights_hash: Mapped[str] = mapped_column(String(64))
    layers: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # influence.Layer.to_dict()
    groups: Mapped[dict[str, list[str]]] = mapped_column(JSON, default=dict)  # influence.layer_groups()


class Dataset(TenantOwned, Base):
    """A registered dataset; rows live in a normalised artifact file, not in the database."""

    __tablename__ = "datasets"

    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16))  # jsonl | csv | tsv | parquet
    task: Mapped[str] = mapped_column(String(32), default="classification")  # classification | causal-lm
    source: Mapped[str | None] = mapped_column(Text, nullable=True)  # uploaded file name or server-side path
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # of the uploaded or server-side file
    columns: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # {text, text_pair, label, noisy}
    row_count: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # the normalised rows artifact
    labels: Mapped[list[Any]] = mapped_column(JSON, default=list)  # distinct labels seen
    # Classification files with label names: names sorted, label i = label_names[i]; None for integer labels.
    label_names: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    has_noisy_flag: Mapped[bool] = mapped_column(Boolean, default=False)


class Index(TenantOwned, Base):
    """Projected per-layer gradients of a dataset under a model: a feature store plus FAISS indexes."""

    __tablename__ = "indexes"

    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="RESTRICT"), index=True)
    layer_selector: Mapped[Any] = mapped_column(JSON, nullable=True)
    layers: Mapped[list[str]] = mapped_column(JSON, default=list)
    projection_kind: Mapped[str] = mapped_column(String(32))
    projection_dim: Mapped[int] = mapped_column(Integer)
    projection_seed: Mapped[int] = mapped_column(Integer)
    # Per-unit overrides the request named ({unit: {kind, dim}}); None: none. The units every layer actually got
    # are in the manifest (manifest["projection"]["units"]) once the build has planned the store.
    projection_units: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # `auto` projections: units with at most this many parameters are stored exactly. None for other kinds (and
    # for rows from before per-unit projections, which are never auto).
    exact_max_params: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # How faithful the stored features are to exact gradients (filled by the build); None until measured.
    fidelity: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    dtype: Mapped[str] = mapped_column(String(16))
    faiss_kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    store_path: Mapped[str] = mapped_column(Text)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    num_rows: Mapped[int] = mapped_column(Integer, default=0)  # rows that answer queries (deleted ones not)
    # Rows deleted (tombstoned) whose features are still on disk until a compaction removes them.
    deleted_rows: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # Which settings a query, audit or check that names none uses (app/services/index_settings.py):
    # "latest-report" | "pinned-report" | "defaults"; the pinned report's job id in pinned-report mode.
    settings_mode: Mapped[str] = mapped_column(
        String(16), default="latest-report", server_default="latest-report"
    )
    settings_report_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Job(TenantOwned, Base):
    """An asynchronous job (index build, audit, ...): its state, progress, timings and outcome."""

    __tablename__ = "jobs"

    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    target_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    done: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The id of the HTTP request that created the job (app/logs.py): the worker logs it with every line of the job.
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
