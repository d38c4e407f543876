"""The exception types a request can end with, other than a server fault.

Raised without importing kserve; `protocol.kserve` turns them into kserve's: `ClientInputError`
into `InvalidInput` (HTTP 400, gRPC INVALID_ARGUMENT; 415 for `UnsupportedAudio`), `Overloaded` into a 503 with
`Retry-After` (gRPC UNAVAILABLE). `shown` is how a message quotes what the client sent;
`released` lets the memory of the work an exception ended go before the answer it causes is sent.
"""

import reprlib
from typing import Any

from .names import retry_after_token

# Short, however long or deep the value: a message (and the log line that records it) never
# repeats a client's megabyte string, and a list nested a thousand deep is not recursed into.
_SHOWN = reprlib.Repr()  # Python 3.11's takes no arguments
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 3, 80, 80, 40
_SHOWN.maxlist = _SHOWN.maxdict = _SHOWN.maxset = _SHOWN.maxtuple = 8


def shown(value: Any) -> str:
    return _SHOWN.repr(value)


def released(exc: BaseException) -> BaseException:
    """`exc` without its traceback, which holds the frames of the work that failed and whatever
    their locals hold (a failed pass's activations on a GPU): they go now, where an answer raised
    `from exc` would keep them until it has been sent, and an emptied GPU cache would miss them."""
    return exc.with_traceback(None)


class ClientInputError(ValueError):
    """The request cannot be served as sent; the message tells the client what to fix."""


class UnsupportedAudio(ClientInputError):
    """The audio is in a container or encoding this server does not decode (HTTP 415)."""


class Overloaded(RuntimeError):
    """The server is too busy for the request: come back after about `retry_after_s` seconds. The
    message ends with the time in words and as `names.retry_after_token`."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(f"{message}; retry in about {retry_after_s} s ({retry_after_token(retry_after_s)})")
        self.reason = message
        self.retry_after_s = retry_after_s
