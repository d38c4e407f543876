"""ASGI middlewares for kserve's FastAPI app: what uvicorn and kserve do not do for a model server.

- `BodyLimit`: kserve's endpoints read a request body whole, however large; uvicorn sets no limit.
  A body past the limit is answered 413 as soon as its `Content-Length` says so, before a byte of
  it is read, or (chunked, no length) as soon as the bytes read pass it. Any answer sent before the
  body was read whole (the 413, a 404, ...) then lingers, as nginx's "lingering close" does: the
  answer is written, the rest of the body read and discarded for up to `LINGER_SECONDS` (at most
  `LINGER_IDLE_SECONDS` between reads, `LINGER_BYTES` in all), and only then is the connection
  closed. A client that writes its whole body before reading (Python's `http.client` and `urllib`)
  would otherwise get a broken pipe or a reset instead of the answer.
- `CancelOnDisconnect`: uvicorn lets a handler run on after its client has gone, and a ten-minute
  clip would then keep the model busy for nobody; a disconnect before the answer starts cancels
  the handler, whose windows waiting for the model are then dropped. (gRPC cancels the handler of
  a cancelled call by itself.)
- `Outcomes`: counts how inference requests ended, by HTTP status (`metrics.REQUESTS`), the 413s
  and 400s refused on the way included, which kserve's own metrics (the steps' times) never see.
- `RequestIds`: gives each request its id (`request_ids`) and returns it as the `x-request-id`
  header. A client that hangs up mid-upload is logged (info) and forgotten; any other exception
  no handler took is answered here, a 500 naming the request id only, and
  logged once with its trace: Starlette's own last resort would log it twice (kserve's handler,
  then uvicorn) and send the exception's text to the client.
- `AggregatedMetrics`: with frontends, answers /metrics from every process's series added up
  (`metrics.aggregated`); kserve's handler would answer its own process's.
"""

import asyncio
import json
import logging
from typing import Any

from prometheus_client import CollectorRegistry, exposition
from starlette.requests import ClientDisconnect

from .. import metrics
from . import request_ids

logger = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    """Raised into the app when a chunked body passes the limit: it stops reading there."""


LINGER_SECONDS = 30.0  # nginx's lingering_time
LINGER_IDLE_SECONDS = 5.0  # nginx's lingering_timeout: a client that stops writing this long is done
LINGER_BYTES = 256 * 2**20  # the most of an unwanted body read and discarded for one answer


class BodyLimit:
    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        unread = (declared not in (None, b"0")) or b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        read, started = 0, False

        async def counted_receive() -> dict:
            nonlocal read, unread
            message = await receive()
            read += len(message.get("body", b""))
            unread = message["type"] == "http.request" and message.get("more_body", False)
            if read > self.max_bytes:
                raise BodyTooLarge()
            return message

        async def lingering_send(message: dict) -> None:
            """An answer to a request whose body is still coming: closed, and only once the body is in."""
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if unread:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False) and unread:
                await send({**message, "more_body": True})
                await _discard_body(receive)
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(lingering_send, f"{int(declared)} bytes")
        try:
            await self.app(scope, counted_receive, lingering_send)
        except BodyTooLarge:
            unread = True
            if not started:
                await self._refuse(lingering_send, f"more than {self.max_bytes} bytes")

    async def _refuse(self, send: Any, size: str) -> None:
        logger.warning("413: request body is %s (limit %d bytes)", size, self.max_bytes)
        message = (f"request body is {size}; this server accepts at most {self.max_bytes} bytes "
                   f"({self.max_bytes / 2**20:g} MiB, --max_request_mb): send compressed audio (FLAC, M4A, Opus) "
                   "or fewer clips per request")
        await _send_error(send, 413, message)


async def _discard_body(receive: Any) -> None:
    """Read what is left of a request body and drop it, within the linger's bounds."""
    loop = asyncio.get_running_loop()
    deadline, discarded = loop.time() + LINGER_SECONDS, 0
    while discarded < LINGER_BYTES and (left := deadline - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(receive(), min(left, LINGER_IDLE_SECONDS))
        except asyncio.TimeoutError:
            return
        discarded += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _send_error(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class CancelOnDisconnect:
    """ASGI middleware: once a request's body has arrived, a client that disconnects before its
    response starts cancels the request's handler (so its windows waiting for the model are dropped)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_read, responding = asyncio.Event(), asyncio.Event()

        async def tracked_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read.set()
            return message

        async def tracked_send(message: dict) -> None:
            responding.set()
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, tracked_receive, tracked_send))

        async def watch() -> None:
            await body_read.wait()
            if (await receive())["type"] == "http.disconnect" and not responding.is_set():
                handler.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # the server's own cancellation, not the client's
                raise
        finally:
            watcher.cancel()


class RequestIds:
    """ASGI middleware: the request's id on its response, and the last word on unhandled errors."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(request_ids.HEADER.encode())
        request_id = request_ids.begin(header.decode("latin-1") if header is not None else None)
        started = False

        async def identified_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                others = [(k, v) for k, v in message.get("headers", []) if k.lower() != request_ids.HEADER.encode()]
                message = {**message, "headers": others + [(request_ids.HEADER.encode(), request_id.value.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, identified_send)
        except ClientDisconnect:  # Starlette's word for a body cut short: nobody to answer
            logger.info("the client disconnected before its request arrived whole")
        except Exception:
            if started:
                raise
            logger.exception("500: %s %s failed", scope.get("method"), scope.get("path"))
            await _send_error(identified_send, 500, f"internal server error (request id {request_id.value})")


class Outcomes:
    """ASGI middleware: every V1 predict or explain and V2 infer request counted by its response's
    status, or as `disconnected` when its client left before one was sent."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.endswith((":predict", ":explain", "/infer")):
            return await self.app(scope, receive, send)
        status = "disconnected"

        async def counted_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            metrics.REQUESTS.labels("http", status).inc()


class AggregatedMetrics:
    def __init__(self, app: Any, registry: CollectorRegistry):
        self.app = app
        self.registry = registry

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/metrics" or scope["method"] != "GET":
            return await self.app(scope, receive, send)
        accept = dict(scope.get("headers") or []).get(b"accept", b"").decode("latin-1")
        encoder, content_type = exposition.choose_encoder(accept)
        body = encoder(self.registry)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
