"""The exception types a request can end with, other than a server fault.

Raised without importing kserve; `protocol.kserve` turns them into kserve's: `ClientInputError`
into `InvalidInput` (HTTP 400, gRPC INVALID_ARGUMENT), `Overloaded` into a 503 with
`Retry-After` (gRPC UNAVAILABLE).
"""


class ClientInputError(ValueError):
    """The request cannot be served as sent; the message tells the client what to fix."""


class Overloaded(RuntimeError):
    """The model's queue is full: come back later (after about `retry_after_s` seconds)."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s
