"""fp-outbox: write analytics events inside your database transaction; a separate worker delivers them.

Applications import only this package; it needs SQLAlchemy and a PostgreSQL driver, never an HTTP client.
"""

from outbox.enqueue import enqueue, enqueue_async, enqueue_many, enqueue_many_async, identify, identify_async
from outbox.wake import wake_workers, wake_workers_async
from outbox.validation import MAX_EVENT_BYTES, MAX_NESTING, TOKEN_ALLOWANCE, InvalidEvent

__all__ = [
    "InvalidEvent", "MAX_EVENT_BYTES", "MAX_NESTING", "TOKEN_ALLOWANCE",
    "enqueue", "enqueue_many", "identify", "enqueue_async", "enqueue_many_async", "identify_async",
    "wake_workers", "wake_workers_async",
]
__version__ = "0.6.0"  # as pyproject.toml (tests/test_install.py checks)
