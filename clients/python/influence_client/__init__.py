"""A typed Python client of the influence service's HTTP API, and the `influence` command line on top of it.

    from influence_client import InfluenceClient, InfluenceAPIError

It depends on httpx only.
"""

from influence_client.client import InfluenceAPIError, InfluenceClient
from influence_client.schemas import (
    Audit,
    AuditRow,
    AuditRowsPage,
    Check,
    CheckRow,
    Dataset,
    DatasetRow,
    Example,
    Experiment,
    Health,
    Hit,
    Index,
    IndexSettings,
    Job,
    Model,
    ModelLayers,
    Page,
    QueryResult,
    Readiness,
    Reference,
    Report,
    RowsDeleted,
)
from influence_client.version import IncompatibleServiceError, __version__

__all__ = [
    "Audit",
    "AuditRow",
    "AuditRowsPage",
    "Check",
    "CheckRow",
    "Dataset",
    "DatasetRow",
    "Example",
    "Experiment",
    "Health",
    "Hit",
    "IncompatibleServiceError",
    "Index",
    "IndexSettings",
    "InfluenceAPIError",
    "InfluenceClient",
    "Job",
    "Model",
    "ModelLayers",
    "Page",
    "QueryResult",
    "Readiness",
    "Reference",
    "Report",
    "RowsDeleted",
    "__version__",
]
