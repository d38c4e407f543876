"""The model queue's Prometheus metrics, on kserve's `/metrics` (prometheus_client's default registry).

Windows, not requests, are the unit of work (see `batching`), so these count windows: a client
or a dashboard reads how much work is waiting, and tests read the order work was done in.
"""

from prometheus_client import Counter, Gauge

SUBMITTED = Counter("ast_windows_submitted", "Windows of admitted requests handed to the model's queue")
WINDOWS = Counter("ast_windows", "Windows (one model input each, 10.24 s for AudioSet AST) classified")
QUEUED_WINDOWS = Gauge("ast_queued_windows", "Windows of admitted requests not yet handed to a forward pass")
