"""Where the service keeps its artifacts, and the one place it opens an index's feature store.

    <artifacts>/indexes/<index id>/       an index: its feature store (Index.store_path), FAISS files, locks
    <artifacts>/jobs/<job id>/            a workflow job's files (app/jobs/run.py)
    <artifacts>/datasets/<dataset id>/    a registered dataset (app/services/datasets/artifact.py)
"""

from __future__ import annotations

from pathlib import Path

from app.config import Settings
from app.models import Index
from influence import FeatureStore


def index_dir(settings: Settings, index_id: str) -> Path:
    return settings.resolved_artifacts_dir / "indexes" / index_id


def store_dir(settings: Settings, index: Index) -> Path:
    """The feature store of an index (Index.store_path is relative to the artifacts dir)."""
    return settings.resolved_artifacts_dir / index.store_path


def job_dir(settings: Settings, job_id: str) -> Path:
    return settings.resolved_artifacts_dir / "jobs" / job_id


def open_store(settings: Settings, index: Index, verify: bool = False) -> FeatureStore:
    """An index's feature store. verify=True checks every file's checksum (a compaction, an integrity check, a
    worker about to read the whole store); readers of a ready index skip it (its files were verified when
    written and are never rewritten in place)."""
    return FeatureStore.open(store_dir(settings, index), verify=verify)
