"""The kserve classes our requests go through: every kserve 0.21 workaround in one place.

`AudioDataPlane` is kserve's own extension point (the `DataPlane` a `ModelServer` routes every
request through), each workaround tested end to end:
- binary BYTES inputs in a V2 REST request: parsed by `requests.parse_binary_extension`;
- kserve's V1 path decodes `application/octet-stream` as JSON, and leaves JSON sent with any
  content type not on its exact list (`application/json; charset=utf-8`, `text/plain`) undecoded;
  we read a V1 body as audio unless it is, or looks like, JSON;
- CloudEvents in either mode, read per the spec (`cloudevents`), and answered as one whatever
  parameters the structured event's content type carries;
- a V1 :explain answers with its own headers, not the request's (`AudioDataPlane.explain`);
- our `ClientInputError` becomes kserve's `InvalidInput` (HTTP 400, gRPC INVALID_ARGUMENT).
`AudioModelServer` routes through it, sets the gRPC receive limit (which kserve reads only from
its own command line), and adds our ASGI middlewares (`asgi`) to kserve's FastAPI app: the same
size limit for HTTP bodies, cancellation for clients that disconnect, request ids, and the count of
HTTP outcomes. As a frontend (`frontends`), it serves HTTP on the socket the supervisor bound
(kserve's REST server binds its own: `setup_event_loop`, the one hook between kserve making its
uvicorn server and running it, hands uvicorn the socket), and answers /metrics with every process's
series added up (`AggregatedMetrics`). A request's id (`request_ids`) is settled in `AudioDataPlane.infer`, the one place
both HTTP and gRPC requests pass with their headers and V2 `id`; gRPC outcomes are counted there too
(kserve's gRPC server takes no interceptor of ours).
"""

import asyncio
import functools
import logging
import socket
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Optional

from kserve import model_server
from kserve.constants.constants import PredictorProtocol
from kserve.errors import (InferenceError, InvalidInput, ModelNotFound, ModelNotReady, ServerNotReady,
                           UnsupportedProtocol)
from kserve.model import InferenceVerb
from kserve.model_server import ModelServer
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferRequest
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.utils.utils import create_response_cloudevent
from starlette.responses import JSONResponse

from .. import metrics
from ..errors import ClientInputError, Overloaded, UnsupportedAudio
from . import cloudevents, request_ids
from .asgi import AggregatedMetrics, BodyLimit, CancelOnDisconnect, Outcomes, RequestIds
from .requests import load_json, parse_binary_extension

logger = logging.getLogger(__name__)

CLOUDEVENT_MODE: ContextVar[Optional[str]] = ContextVar("cloudevent_mode", default=None)
"""How a V1 request came as a CloudEvent ("binary", "structured"), or None: set by `decode`, read by
`encode` of the same request."""


class AudioDataPlane(DataPlane):
    """kserve's DataPlane with raw audio bodies, binary BYTES inputs and our client errors."""

    def decode(self, body, headers, protocol_version: str = PredictorProtocol.REST_V1.value, model_name=None):
        headers = headers or {}
        CLOUDEVENT_MODE.set(None)
        with _as_kserve_errors():
            if protocol_version == PredictorProtocol.REST_V1.value and isinstance(body, (bytes, bytearray)):
                attributes: dict = {}
                mode = cloudevents.mode(headers)
                CLOUDEVENT_MODE.set(mode)
                if mode is not None:
                    body, content_type, attributes = cloudevents.unwrap(body, headers)
                    headers = {"content-type": content_type}
                if _is_raw_audio(body, headers):
                    return body, attributes
                # kserve parses JSON only for an exact list of content types; clients also send
                # "application/json; charset=utf-8", text/plain, or curl's form-urlencoded default.
                return load_json(body), attributes
            return super().decode(body, headers, protocol_version, model_name)

    def encode(self, model_name, response, headers, req_attributes: dict):
        """A V1 CloudEvent is answered with one in its mode, as `decode` read it. kserve decides
        from the headers it is handed here: the request's for :predict, but for :explain the
        answer's (which were the request's: `explain`), and for a structured event only with the
        exact content type, where ours may carry parameters (`; charset=utf-8`)."""
        mode = CLOUDEVENT_MODE.get()
        if mode is None:
            return super().encode(model_name, response, headers, req_attributes)
        headers, body = create_response_cloudevent(model_name, response, req_attributes, mode == "binary")
        headers["content-type"] = "application/json" if mode == "binary" else cloudevents.STRUCTURED
        return body, headers

    def decode_inference_request(self, body, headers: dict, model_name: str) -> InferRequest:
        if isinstance(body, bytes):
            with _as_kserve_errors():
                return parse_binary_extension(body, headers, model_name)
        return super().decode_inference_request(body, headers, model_name)

    async def infer(self, model_name: str, request, headers=None):
        v2 = request if isinstance(request, InferRequest) else None
        headers = {} if headers is None else headers
        request_id = request_ids.adopt(headers, v2.id if v2 else None)
        headers[request_ids.HEADER] = request_id  # for kserve's latency log line
        if v2 is not None and not v2.id:
            v2.id = request_id
        grpc = v2 is not None and v2.from_grpc  # REST outcomes are counted by `Outcomes`, whatever path they took
        try:
            with _as_kserve_errors():
                response = await super().infer(model_name, request, headers)
        except BaseException as exc:
            if grpc:
                metrics.REQUESTS.labels("grpc", _grpc_status(exc)).inc()
            raise
        if grpc:
            metrics.REQUESTS.labels("grpc", "OK").inc()
        return response

    async def explain(self, model_name: str, request, headers=None):
        """V1 :explain: the model's own `explain` (`ASTModel`), with the request's id as for infer.
        kserve's `DataPlane.explain` answers with the request's own headers as the response's (its
        content type, a chunked upload's transfer-encoding beside the answer's content-length), so
        the model is called here as `DataPlane.infer` calls it: the answer's headers are its own."""
        headers = {} if headers is None else headers
        headers[request_ids.HEADER] = request_ids.adopt(headers, None)
        with _as_kserve_errors():
            model = await self.get_model(model_name)
            return await model(request, verb=InferenceVerb.EXPLAIN, headers=headers)


class AudioModelServer(ModelServer):
    """kserve's ModelServer, routing requests through `AudioDataPlane`, with our gRPC message limit."""

    def __init__(self, max_message_bytes: int, listener: Optional[socket.socket] = None,
                 repository_extension: Optional[ModelRepositoryExtension] = None, **kwargs: Any):
        """`repository_extension`: the V2 repository API's handlers for a repository (`OneModel`'s
        where the server has one model)."""
        super().__init__(**kwargs)
        self.listener = listener
        self._registering: list = []
        self.model_repository_extension = repository_extension or OneModel(self.registered_models)
        self.dataplane = AudioDataPlane(model_registry=self.registered_models)
        # kserve's GRPCServer takes its limits from kserve's own parse of the command line. Answers
        # have none, as over REST (gRPC's own is 2 GiB): explanations' pictures pass kserve's 8 MiB
        # default, which would refuse them once computed.
        model_server.args.grpc_max_receive_message_length = max_message_bytes
        model_server.args.grpc_max_send_message_length = -1
        model_server.app.add_middleware(CancelOnDisconnect)
        model_server.app.add_middleware(BodyLimit, max_bytes=max_message_bytes)
        model_server.app.add_middleware(RequestIds)
        model_server.app.add_middleware(Outcomes)  # outermost: it sees every answer, a last-resort 500 too
        if listener is not None:
            model_server.app.add_middleware(AggregatedMetrics, registry=metrics.aggregated())
        # The V2 repository extension's index (Triton's POST /v2/repository/index): kserve 0.21 has
        # the handler (`ModelRepositoryExtension.index`) but no route for it.
        model_server.app.add_api_route("/v2/repository/index", self.model_repository_extension.index,
                                       methods=["POST"])

    def start(self, models: list) -> None:
        """kserve's start, which holds the list it is given for as long as it serves: emptied once
        kserve has registered the models (`setup_event_loop` comes after), so that a model the V2
        repository API unloads is let go of, and its engine's memory with it."""
        self._registering = models
        super().start(models)

    def setup_event_loop(self) -> None:
        super().setup_event_loop()
        self._registering.clear()  # the registry holds them now
        if self.listener is not None:
            uvicorn_server = self._rest_server._server
            uvicorn_server.serve = functools.partial(uvicorn_server.serve, sockets=[self.listener])
        model_server.app.add_exception_handler(Busy, busy_handler)
        model_server.app.add_exception_handler(UnsupportedMediaType, unsupported_media_handler)


@contextmanager
def _as_kserve_errors() -> Iterator[None]:
    """Our client errors become kserve's InvalidInput (HTTP 400, gRPC INVALID_ARGUMENT), audio in a
    format we do not decode its `UnsupportedMediaType` (HTTP 415); a busy server becomes `Busy` (HTTP 503 with Retry-After, gRPC UNAVAILABLE)."""
    try:
        yield
    except UnsupportedAudio as exc:
        raise UnsupportedMediaType(str(exc)) from exc
    except ClientInputError as exc:
        raise InvalidInput(str(exc)) from exc
    except Overloaded as exc:
        raise Busy(str(exc), exc.retry_after_s) from exc


def _grpc_status(exc: BaseException) -> str:
    """The status kserve's gRPC interceptor answers an exception with."""
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    if isinstance(exc, (InvalidInput, InferenceError, UnsupportedProtocol)):
        return "INVALID_ARGUMENT"
    if isinstance(exc, (ServerNotReady, ModelNotReady)):
        return "UNAVAILABLE"
    if isinstance(exc, ModelNotFound):
        return "NOT_FOUND"
    if isinstance(exc, NotImplementedError):
        return "UNIMPLEMENTED"
    return "INTERNAL"


class OneModel(ModelRepositoryExtension):
    """The V2 repository API of a server of one model (its --model_dir one model directory, or a
    hub id; under --frontends, each frontend's). Unloading that model is refused (400, gRPC
    INVALID_ARGUMENT), as Triton refuses load and unload outside its explicit mode: no load could
    bring it back, so the pod would stay live and never be ready again (under --frontends, the one
    frontend that took the call would). Loading it is a no-op, as for any model served; another
    name is not found (404, where kserve's stub load leaves it a 503 "not ready")."""

    async def load(self, model_name: str) -> None:
        self._served(model_name)

    async def unload(self, model_name: str) -> None:
        self._served(model_name)
        raise InvalidInput(f"model {model_name} is this server's only model and cannot be unloaded: nothing could load "
                           "it again, and the server would never be ready again. Restart the pod to reload it; a "
                           "--model_dir of several model directories is a repository, whose models load and unload")

    def _served(self, model_name: str) -> None:
        if model_name not in self._model_registry.get_models():
            raise NotServed(f"Model with name {model_name} does not exist: this server serves one model, "
                            f"{', '.join(self._model_registry.get_models())}")


class NotServed(ModelNotFound):
    """kserve's 404 (gRPC NOT_FOUND), with a message that says what is served instead."""

    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason


class Busy(ServerNotReady):
    """kserve maps ServerNotReady to gRPC UNAVAILABLE with its `reason`, which it does not set."""

    def __init__(self, reason: str, retry_after_s: int):
        super().__init__(reason)
        self.error_msg = self.reason = reason
        self.retry_after_s = retry_after_s


async def busy_handler(_: Any, exc: Busy) -> JSONResponse:
    """HTTP 503 with Retry-After, logged once as a warning (kserve's handler would log a trace)."""
    logger.warning("%s", exc)
    return JSONResponse(status_code=503, content={"error": str(exc)}, headers={"Retry-After": str(exc.retry_after_s)})


class UnsupportedMediaType(InvalidInput):
    """InvalidInput to kserve's gRPC server (INVALID_ARGUMENT); HTTP answers it 415."""


async def unsupported_media_handler(_: Any, exc: UnsupportedMediaType) -> JSONResponse:
    logger.info("415: %s", exc)
    return JSONResponse(status_code=415, content={"error": str(exc)})


def _is_raw_audio(body: bytes, headers: dict) -> bool:
    """A V1 body is audio unless it says (or looks like) JSON: curl's --data-binary needs no header."""
    content_type = cloudevents.media_type(headers.get("content-type", ""))
    if content_type.startswith("audio/"):
        return True
    if content_type in ("application/json", "application/ld+json"):
        return False
    return body[:1024].lstrip()[:1] != b"{"
