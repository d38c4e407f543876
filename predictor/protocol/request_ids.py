"""Request ids: one per request, on every log line about it and on its response.

The id is the client's `x-request-id` header (Istio's and Knative's gateways set one on every
request), else the V2 request's own `id`, else a generated one. It is returned as the
`x-request-id` response header (HTTP) and as the V2 response's `id` when the request had none.
An id is printable ASCII without spaces, at most 128 characters: anything else (a newline that
would forge a log line, a kilobyte of text) is replaced by a generated id.

kserve's error handlers (HTTP and gRPC alike) log every error they answer with its stack trace, a
client's own mistake included: a 400 became some twenty lines. `RequestLog`, a filter on the log
handlers, puts the request id on each record logged while a request is handled, and turns a client
error's record into one warning line; any other error (a 5xx) keeps its trace. kserve has no hook
for either, and a logging filter is logging's own one.
"""

import logging
import re
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Mapping, Optional

from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady, ServerNotReady, UnsupportedProtocol

HEADER = "x-request-id"
_ACCEPTED = re.compile(r"[\x21-\x7e]{1,128}")
# Errors that are the client's (4xx) or a passing state of the server (503): one line each.
CLIENT_ERRORS = (InvalidInput, ModelNotFound, ModelNotReady, ServerNotReady, UnsupportedProtocol)


@dataclass
class RequestId:
    given: Optional[str] = None
    generated: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def value(self) -> str:
        return self.given or self.generated


_current: ContextVar[Optional[RequestId]] = ContextVar("request_id", default=None)


def begin(header: Optional[str]) -> RequestId:
    """A new request's id, from its `x-request-id` header if it has an acceptable one."""
    request_id = RequestId(given=_accepted(header))
    _current.set(request_id)
    return request_id


def adopt(headers: Mapping[str, str], v2_id: Optional[str]) -> str:
    """The id of the request being handled: its header's (gRPC has no middleware to begin one),
    else its V2 `id`, else the generated one."""
    request_id = _current.get() or begin(headers.get(HEADER))
    if request_id.given is None:
        request_id.given = _accepted(v2_id)
    return request_id.value


def current() -> Optional[str]:
    request_id = _current.get()
    return None if request_id is None else request_id.value


def _accepted(value: Optional[str]) -> Optional[str]:
    return value if isinstance(value, str) and _ACCEPTED.fullmatch(value) else None


class RequestLog(logging.Filter):
    """Prefixes records logged while a request is handled with its id; a client error's record
    becomes one warning line without its trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = current()
        if request_id is None or getattr(record, "request_id", None) is not None:
            return True  # outside a request, or already done by another handler's filter
        record.request_id = request_id
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, CLIENT_ERRORS):
            record.msg, record.args = "request %s: %s: %s", (request_id, type(error).__name__, error)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        else:
            record.msg, record.args = "request %s: %s", (request_id, record.getMessage())
        return True
