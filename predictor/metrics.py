"""The server's Prometheus metrics beyond kserve's own, on its `/metrics` (prometheus_client's default registry).

Windows, not requests, are the model's unit of work (see `batching`), so the queue counts windows:
a client or a dashboard reads how much work is waiting, and tests read the order work was done in.
The rest say what the service did (clips, seconds of audio), where its time went (decoding, the
filterbank, the model), how it batched, how requests ended, and which engine serves.

With frontends (`frontends`) the series are written by several processes: prometheus_client's
multiprocess mode (its files, under `PROMETHEUS_MULTIPROC_DIR`) adds them up, and `aggregated`
is the registry a frontend's /metrics answers from. That mode keeps no Info metric and no gauge set
from a function, so the engine is a gauge of 1 with the engine as labels (the exposition an Info
writes), and the gauges computed when scraped are `LIVE`'s, from numbers every process reads.
"""

from typing import Callable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class Live(Collector):
    """Gauges read when scraped."""

    def __init__(self) -> None:
        self.functions: dict[tuple[str, str], Callable[[], float]] = {}

    def gauge(self, name_and_help: tuple[str, str], function: Callable[[], float]) -> None:
        self.functions[name_and_help] = function

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for (name, help_), function in self.functions.items():
            yield GaugeMetricFamily(name, help_, value=function())


LIVE = Live()
REGISTRY.register(LIVE)


def aggregated() -> CollectorRegistry:
    """Every process's series added up (multiprocess mode), and the live gauges."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(LIVE)
    return registry


SUBMITTED = Counter("ast_windows_submitted", "Windows of admitted requests handed to the model's queue")
WINDOWS = Counter("ast_windows", "Windows (one model input each, 10.24 s for AudioSet AST) classified")
QUEUED_WINDOWS = Gauge("ast_queued_windows", "Windows of admitted requests not yet handed to a forward pass",
                       multiprocess_mode="livesum")
QUEUE_WAIT_SECONDS = ("ast_queue_wait_seconds", "The wait a new request would face: the windows admitted ahead of it "
                      "(decoding or queued) times the recent time per window; past --max_queue_seconds, new requests "
                      "get 503")

CLIPS = Counter("ast_clips", "Clips (audio files or waveforms) classified")
AUDIO_SECONDS = Counter("ast_audio_seconds", "Seconds of audio classified")
STAGE_SECONDS = Histogram(
    "ast_stage_seconds", "Time per step: decode (a request's clips to 16 kHz mono), features (the filterbank "
    "of a forward pass's windows), model (the engine's forward pass)", ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
STAGE_SECONDS.labels("decode")  # at 0 before the first request, as the unlabelled series are (a pass's stages
# depend on the device: they appear with the first pass, the warm-up's)
BATCH_WINDOWS = Histogram("ast_batch_windows", "Windows per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
WINDOW_WAIT_SECONDS = Histogram(
    "ast_window_wait_seconds", "Time from a request reaching the model's queue to the pass that takes each of its "
    "windows: near zero with small passes means the model waits for work (on a GPU: not fed)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
REQUESTS = Counter("ast_requests", "Inference requests by how they ended: the HTTP status, or the gRPC status name",
                   ["protocol", "code"])
ENGINE = Gauge("ast_engine_info", "The engine serving each model, its precision and device", ["model", "backend",
               "precision", "device"], multiprocess_mode="livemax")
_engines: dict[str, tuple[str, str, str]] = {}  # each model served: its ENGINE labels but the name


def engine_serving(model: str, backend: str, precision: str, device: str) -> None:
    """`model`'s one `ast_engine_info` series (a model loaded again replaces its own)."""
    engine_stopped(model)
    _engines[model] = (backend, precision, device)
    ENGINE.labels(model, backend, precision, device).set(1)


def engine_stopped(model: str) -> None:
    """`model` unloaded: its series goes."""
    labels = _engines.pop(model, None)
    if labels is not None:
        ENGINE.remove(model, *labels)
