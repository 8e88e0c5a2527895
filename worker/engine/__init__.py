"""The delivery engine: claim due rows, send them to /track, settle the outcomes, and what serves that
(settings, retry policy, rate limit, retention, metrics, logs, sd_notify).

The engine imports neither the operator's command (worker.admin) nor the development tools
(worker.devtools); they use the pieces named here, and only these.
"""

from worker.engine import logs
from worker.engine.durations import DEFAULT_RETAIN_DELIVERED, format_duration, parse_duration, parse_retention
from worker.engine.lifecycle import StartupError
from worker.engine.loop import Worker
from worker.engine.policy import Dead, Delivered, Outcome, Retry
from worker.engine.retention import KEPT, Purged, preview_truncate, purge_dead, purge_delivered
from worker.engine.settings import Settings, build_parser, from_args
from worker.engine.store import (EXIT_NO_GRANT, EXIT_READ_ONLY, Claimed, DatabaseReadOnly, DatabaseRefused,
                                 DatabaseUnavailable, database_state, endpoint_state, oldest_transaction, queue_figures, status_counts,
                                 translate, workers_connected)

__all__ = [
    "DEFAULT_RETAIN_DELIVERED", "EXIT_NO_GRANT", "EXIT_READ_ONLY", "KEPT", "Claimed", "DatabaseReadOnly", "DatabaseRefused",
    "DatabaseUnavailable", "Dead", "Purged", "preview_truncate",
    "Delivered", "Outcome",
    "Retry", "Settings", "StartupError", "Worker", "build_parser", "format_duration", "from_args", "logs",
    "database_state", "endpoint_state", "oldest_transaction", "parse_duration", "parse_retention", "purge_dead",
    "purge_delivered", "queue_figures", "status_counts", "translate", "workers_connected",
]
