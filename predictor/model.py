"""The kserve.Model: load AST once, then preprocess → predict → postprocess per request.

Thin by design: protocol parsing lives in `protocol`, decoding in `audio`, cutting clips into
windows and pooling them in `windows`, the filterbank in `features`, the model's queue in
`batching`, the inference engine in `engines`, ranking in `labels`, whether a request may come in
in `admission`. What lives here is the order of the steps, the request's limits, and where each
step runs: reading headers and decoding in a pool of as many threads as the container has cores
(concurrent requests decode in parallel, and a flood waits there, counted, rather than piling up
threads); the filterbank and the model, both torch, on the model's own thread behind the window
queue (beside each other they fought over the same 2 cores); the event loop only parses and
answers, so it keeps answering health probes during inference.
"""

import asyncio
import concurrent.futures
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from kserve import Model
from kserve.model import InferenceVerb
from kserve.protocol.infer_type import InferRequest, InferResponse
from transformers import PretrainedConfig

from . import audio, explanations, labels, metrics, occlusion, precision, protocol, rollout, windows
from .allocator import release_freed_memory
from .admission import Admission, Backlog, Reserved
from .batching import WindowQueue
from .checkpoint import Checkpoint, ModelLoadError, load_feature_extractor
from .config import Config
from .engines import EngineOptions, ExportError, build_engine
from .engines.artifacts import forget_failures
from .engines.options import split
from .errors import ClientInputError, Overloaded, shown
from .features import HOP_LENGTH, LogMelFilterbank
from .ipc import RemoteQueue
from .passes import BatchedPass, CpuPass, Pass
from .protocol.requests import parse
from .protocol.responses import ClipResult, Ranked, Segments, check_padded_segments, respond
from .queue_state import QueueState
from .rollout import Rollout

logger = logging.getLogger(__name__)

ROLLOUT_WINDOWS = 2  # what an explanation by rollout is counted as: its eager pass costs about two windows
EXPLAINING: ContextVar[bool] = ContextVar("explaining", default=False)
"""Set while kserve handles a V1 :explain: its preprocess cannot otherwise tell it from a :predict."""
HELD: ContextVar[list[Reserved]] = ContextVar("held")
"""What a request holds in a `Backlog` (set per request by `__call__`, which lets go of what was
never run however the request ends)."""


@dataclass(frozen=True)
class Options:
    """A request's parameters, checked."""

    top_k: int
    function: str
    hop_seconds: float
    aggregate: str
    return_segments: bool
    return_embedding: bool
    explain: bool
    explain_method: str
    explain_format: str


@dataclass
class Work:
    """A request on its way through the model: its clips' windows and what the response needs."""

    request: protocol.AudioRequest
    options: Options
    starts: list[np.ndarray]  # each clip's window starts, in samples
    lengths: list[int]  # each clip's samples at the model's rate
    windows: list[np.ndarray]  # every clip's windows, in order: views into the waveforms
    cells: list[occlusion.Grid] = field(default_factory=list)  # with explain: each clip's (one window) grid
    rollouts: Optional[Reserved] = None  # with explain by rollout: its clips in the rollouts' backlog


@dataclass
class Logits:
    per_clip: list[torch.Tensor]  # (windows, labels + hidden) rows for each clip
    work: Work
    masked: list[tuple[torch.Tensor, list[int]]] = field(default_factory=list)
    """With explain: each clip's masked copies' rows, and the index of each copy's cell in its grid."""


@dataclass(frozen=True)
class Threads:
    """The threads a model's work runs on: its passes' one thread, the pool that reads and decodes
    requests' files (and draws explanations' pictures), and the rollouts' one thread (on a CPU;
    a GPU's rollouts take turns with its passes). The models of
    a `repository` share one set, so that several models use the cores one model would: their
    passes take turns, and decoding stays a pool sized to the cores."""

    forward: ThreadPoolExecutor
    decoding: ThreadPoolExecutor
    rollouts: ThreadPoolExecutor

    @classmethod
    def make(cls, decoding_threads: int) -> "Threads":
        return cls(ThreadPoolExecutor(max_workers=1, thread_name_prefix="ast-forward"),
                   ThreadPoolExecutor(max_workers=decoding_threads, thread_name_prefix="ast-decode"),
                   ThreadPoolExecutor(max_workers=1, thread_name_prefix="ast-rollout"))


def _released(name: str) -> None:
    """A model let go of (unloaded, and its last request answered): what its engine held, handed
    back to the system (`keep_freed_memory` would keep it)."""
    release_freed_memory()
    logger.info("Model %s released: its engine's memory is handed back", name)


class ASTModel(Model):
    def __init__(self, config: Config, threads: int = 1, device: str = "cpu", state: Optional[QueueState] = None,
                 remote: Optional[RemoteQueue] = None, shared: Optional[Threads] = None):
        """`state`: where the queue's numbers live (shared memory in the model's process under
        `frontends`, shared by the models of a `repository`). `remote`: in a frontend, the model's
        process, which then holds the engine and the queue; this process only takes requests,
        decodes them and answers. `shared`: the threads of a repository's models; by default the
        model makes its own."""
        super().__init__(config.model_name)
        self.config = config
        self.threads = threads
        self.device = device
        self.state = state or QueueState.local()
        self.remote = remote
        self.shared = shared
        self.pools: Optional[Threads] = None
        self.queue: Optional[Union[WindowQueue, RemoteQueue]] = None
        self.admission: Optional[Admission] = None
        self.rollouts: Optional[Backlog] = None
        self.passes: Optional[Pass] = None  # the engine behind it is no attribute: kserve's `engine` is a flag
        self.filterbank: Optional[LogMelFilterbank] = None
        self.target: Optional[audio.Target] = None
        self.windowing: Optional[windows.Windowing] = None
        self.num_labels = 0
        self.hidden_size = 0
        self.id2label: dict[int, str] = {}
        self.rollout: Optional[Rollout] = None  # where the model runs here (not in a frontend)
        self.geometry: Optional[PretrainedConfig] = None  # the model's: its patches, for rollout's cells
        self.default_top_k = config.top_k
        self.default_function = "softmax"

    # ---- loading ---------------------------------------------------------------------------

    def load(self) -> bool:
        config = self.config
        self.pools = self.shared or Threads.make(self.threads)
        forget_failures()
        checkpoint = Checkpoint.open(config.model_dir, weights=self.remote is None)
        source, model_config = checkpoint.source, checkpoint.config
        self.filterbank = LogMelFilterbank.from_extractor(load_feature_extractor(source, model_config))
        rate = self.filterbank.sampling_rate
        self.target = audio.Target(rate, config.max_audio_seconds, config.max_channels)
        audio.cap_allocations(config.max_request_bytes)
        self.windowing = windows.Windowing.of(self.filterbank)
        self.num_labels = model_config.num_labels
        self.hidden_size = model_config.hidden_size
        self.id2label = {int(k): v for k, v in model_config.id2label.items()}
        self.geometry = model_config
        self.default_function = config.function_to_apply or labels.default_function(model_config.problem_type,
                                                                                    self.num_labels)
        self.default_top_k = min(config.top_k, self.num_labels)  # the pipeline clamps top_k too
        on_gpu = torch.device(self.device).type == "cuda"
        self.queue = self.remote or self._load_engine(checkpoint, on_gpu)
        self.rollout = None if self.remote else Rollout(source, model_config, self.device)
        del checkpoint  # and its torch module, if it was loaded and no torch engine holds it
        release_freed_memory()
        self.admission = Admission(self.queue.state, config.max_queue_seconds, config.queued_windows(on_gpu))
        self.rollouts = Backlog("an explanation by rollout", config.max_queue_seconds, self.queue.state,
                                ROLLOUT_WINDOWS)
        logger.info("Loaded AST from %s: %d labels, %d mel bins x %d frames (windows of %g s), default %s top-%d%s",
                    source, self.num_labels, self.filterbank.num_mel_bins, self.filterbank.max_length,
                    self.windowing.seconds, self.default_function, self.default_top_k,
                    ", through the model's process" if self.remote else "")
        weakref.finalize(self, _released, self.name).atexit = False
        self.ready = True
        return self.ready

    def _load_engine(self, checkpoint: Checkpoint, on_gpu: bool) -> WindowQueue:
        """The engine for this device and precision, warmed up, behind the window queue."""
        config = self.config
        engine_options = EngineOptions(backend=config.backend,
                                       precision=precision.resolve(config.precision, torch.device(self.device),
                                                                   config.backend),
                                       threads=self.threads,
                                       cache_dir=config.onnx_cache_dir, start_timeout_s=config.start_timeout_s,
                                       calibration_dir=config.calibration_dir, device=self.device)
        try:
            engine = build_engine(checkpoint, engine_options, serving=self.name)
        except ExportError as exc:
            raise ModelLoadError(f"{exc}\nPass --backend torch (or AST_BACKEND=torch) to serve with eager PyTorch "
                                 "instead.") from exc
        device = torch.device(self.device)
        max_batch_size = config.batch_size(on_gpu)
        try:
            if on_gpu:
                if config.gpu_memory_fraction:
                    torch.cuda.set_per_process_memory_fraction(config.gpu_memory_fraction, device)
                self.passes = BatchedPass(self.filterbank, engine, device, max_batch_size)
            else:
                self.passes = CpuPass(self.filterbank, engine)
            windows, runs = (max_batch_size, 2) if on_gpu else (1, 1)
            if self.shared:  # loaded beside a repository's other models: in turn with their passes
                seconds_per_window = self.shared.forward.submit(self._warm_up, windows, runs).result()
            else:
                seconds_per_window = self._warm_up(windows, runs)
        except BaseException:
            metrics.engine_stopped(self.name)  # built, but it will serve nothing
            raise
        logger.info("Engine ready: %s", engine_options)
        return WindowQueue(self.passes, max_batch_size, config.max_batch_wait_ms / 1000, seconds_per_window,
                           self.state, self.pools.forward)

    def stop(self) -> None:
        """Unloaded (the V2 repository API, or the server stopping): not ready, and its queue ends
        once the windows admitted are computed, so that nothing holds the engine after them."""
        self.ready = False
        if isinstance(self.queue, WindowQueue):
            self.queue.close()
            metrics.engine_stopped(self.name)

    # ---- the request path ------------------------------------------------------------------

    async def __call__(self, body: Any, headers: Optional[dict] = None, verb: InferenceVerb = InferenceVerb.PREDICT):
        """kserve's own order of steps; a V1 :explain is a predict with `explain` on (`EXPLAINING`)."""
        explaining, held = EXPLAINING.set(verb == InferenceVerb.EXPLAIN), HELD.set([])
        try:
            return await super().__call__(body, headers, verb)
        finally:
            for reserved in HELD.get():
                if not reserved.running:
                    reserved.release()
            HELD.reset(held)
            EXPLAINING.reset(explaining)

    def validate(self, payload: Any) -> Any:
        """kserve's check looks for V1/V2 dict keys; our preprocess has already validated."""
        return payload

    async def preprocess(self, payload: Union[dict, bytes, InferRequest], headers: Optional[dict] = None) -> Work:
        """Refuse a busy server's request before parsing it (a large request's base64 or JSON numbers
        hold the event loop while they are decoded); parse; read the headers (in the decoding pool)
        and refuse what the limits or the wait forbid; then decode."""
        self.admission.check()
        request = parse(payload, self.config.max_clips_per_request)
        options = self._options(request.parameters, explaining=EXPLAINING.get())
        if options.explain and options.explain_format == "png":
            explanations.check_pictures(len(request.clips), options.top_k, self.config.explain_max_pictures)
        rollouts = None
        if options.explain and options.explain_method == "rollout":
            rollouts = self.rollouts.reserve(len(request.clips))
            HELD.get().append(rollouts)
        sources = await self._pooled(self._open, request.clips,
                                     abandoned=lambda done: done.cancelled() or done.exception() or _close(done.result()))
        try:
            cost = self._check_windows([self._declared(s) for s in sources], request, options)
            if not options.explain:  # and what containers only estimate (MP3), up to where decoding stops
                estimated = sum(self.windowing.count(self._declared(s, estimated=True), options.hop_seconds)
                                for s in sources)
                cost = max(cost, min(estimated, self.config.max_windows_per_request))
            self.admission.check(cost)
        except (ClientInputError, Overloaded):
            _close(sources)
            raise
        decoding, stop = self.admission.counted(cost), threading.Event()

        def stopped(done: concurrent.futures.Future) -> None:  # the request went away: its decoding has ended now
            if done.cancelled():  # before it began
                _close(sources)
            decoding.release()

        try:
            waveforms = await self._pooled(self._decode, sources, options, stop,  # which closes them
                                           abandoned=stopped, stop=stop)
        finally:
            if not stop.is_set():  # decoded, or failed: else counted until its decoding stops (`stopped`)
                decoding.release()
        decoded = self._check_windows([len(w) for w in waveforms], request, options)
        if decoded > cost:  # a header did not say, or understated: admitted for fewer windows than it has
            self.admission.check(decoded, wait=False)
        starts = [self.windowing.starts(len(w), options.hop_seconds) for w in waveforms]
        return Work(
            request=request, options=options, starts=starts, lengths=[len(w) for w in waveforms],
            windows=[window for w, s in zip(waveforms, starts) for window in self.windowing.slices(w, s)],
            cells=[self._grid(len(w)) for w in waveforms] if options.explain else [],  # one window each
            rollouts=rollouts,
        )

    async def predict(self, payload: Work, headers: Optional[dict] = None) -> Logits:
        """The windows' rows; with explain, each clip's masked copies' too (its one window, each
        with a cell of silence), in the same call: they take turns in the queue with every other
        request's windows."""
        occluding = payload.options.explain_method == "occlusion"
        copies = [occlusion.copies(w, cells) for w, cells in zip(payload.windows, payload.cells)] if occluding else []
        count = len(payload.windows)
        # queued before this first awaits: see `admission`
        rows = await self.queue([*payload.windows, *(copy for masked, _ in copies for copy in masked)])
        masked = list(zip(rows[count:].split([len(m) for m, _ in copies]), [indices for _, indices in copies]))
        return Logits(per_clip=list(rows[:count].split([len(s) for s in payload.starts])), work=payload, masked=masked)

    async def explain(self, payload: Work, headers: Optional[dict] = None) -> Logits:
        return await self.predict(payload, headers)

    async def postprocess(self, result: Logits, headers: Optional[dict] = None, response_headers=None) -> Union[dict, InferResponse]:
        """Each clip's windows' rows → its labels (logits aggregated as asked), its embedding (the
        mean of its windows': a clip's direction in embedding space, where a max per dimension
        would mix features of different windows into a point no window is near), and segments."""
        work, options = result.work, result.work.options
        per_clip = [split(rows, self.num_labels) for rows in result.per_clip]
        clip_logits = torch.stack([windows.aggregate(logits, options.aggregate) for logits, _ in per_clip])
        results = [ClipResult(ranked) for ranked in self._rank(clip_logits, options)]
        for clip, (logits, embeddings), starts, length in zip(results, per_clip, work.starts, work.lengths):
            if options.return_embedding:
                clip.embedding = embeddings.mean(dim=0).numpy()
            if options.return_segments:
                start, end = self.windowing.times(starts, length)
                clip.segments = Segments(start=start, end=end, ranked=self._rank(logits, options),
                                         embeddings=embeddings.numpy() if options.return_embedding else None)
        if options.explain:
            await self._explain(results, clip_logits, result.masked, work)
        metrics.CLIPS.inc(len(work.lengths))
        metrics.AUDIO_SECONDS.inc(sum(work.lengths) / self.target.rate)
        return respond(work.request, self.name, results)

    # ---- steps -------------------------------------------------------------------------------

    async def _explain(self, results: list[ClipResult], clip_logits: torch.Tensor,
                       masked: list[tuple[torch.Tensor, list[int]]], work: Work) -> None:
        """Each clip's top-k labels' drops in score under each masked cell (`occlusion`), or its
        attention rollout, one map for every label (`rollout`, one pass on a thread of its own: `Backlog`)."""
        options = work.options
        if options.explain_method == "rollout":
            patches = await self.rollouts.run(work.rollouts, lambda: self.roll_out(work.windows))
            maps = [rollout.cell_relevance(row, self.geometry, cells) for row, cells in zip(patches, work.cells)]
        else:
            scores = labels.scores(clip_logits, options.function)
            ids = scores.topk(options.top_k, dim=-1).indices  # as `labels.top_k` ranks them
            maps = []
            for row, label_ids, (rows, indices), cells in zip(scores, ids, masked, work.cells):
                masked_scores = labels.scores(split(rows, self.num_labels)[0], options.function)[:, label_ids]
                maps.append(occlusion.relevance(row[label_ids].numpy(), masked_scores.numpy(), indices, cells))

        def answer() -> None:  # the pictures' filterbank and PNGs on the decoding pool, not the event loop
            for clip, relevance, cells, window in zip(results, maps, work.cells, work.windows):
                if relevance.ndim == 2:  # rollout's: the same for every label
                    relevance = np.repeat(relevance[None], len(clip.ranked.labels), axis=0)
                features = (self.filterbank([window])[0, : cells.frames[-1][1]].numpy()
                            if options.explain_format == "png" else None)
                clip.explanations = explanations.explained(options.explain_method, clip.ranked.labels,
                                                           clip.ranked.scores, relevance, cells, self.target.rate,
                                                           self.filterbank.num_mel_bins, features)

        await asyncio.wrap_future(self.pools.decoding.submit(answer))

    async def roll_out(self, windows: list[np.ndarray]) -> torch.Tensor:
        """Each clip's one window → its (patches,) relevance, where the model runs (in the
        model's process under frontends: `ipc`), timed into the backlog's estimate (the encoder's
        first load apart). On a CPU on the rollouts' thread, beside the passes; on a GPU on the
        passes' thread, in turn with them: beside a pass, its memory could make the pass run out,
        and the pass would be split for good (`passes`)."""
        if self.remote:
            return await self.remote.roll_out(windows)

        def timed() -> torch.Tensor:
            self.rollout.load()
            started = time.monotonic()
            patches = self.rollout(self.filterbank(windows))
            self.rollouts.timed((time.monotonic() - started) / len(windows))
            return patches

        thread = self.pools.forward if torch.device(self.device).type == "cuda" else self.pools.rollouts
        return await asyncio.wrap_future(thread.submit(timed))

    def _options(self, parameters: dict[str, Any], explaining: bool = False) -> Options:
        """`explaining`: a V1 :explain, which is explain: true whatever the parameters say. An
        explanation covers a clip's one window, so its hop is the window: another is refused."""
        flags = {name: parameters.get(name, False) for name in ("return_segments", "return_embedding", "explain")}
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise ClientInputError(f"{name} must be true or false; got {shown(value)}")
        explain = flags["explain"] or explaining
        hop_seconds = self.windowing.check_hop(parameters.get("hop_seconds", self.windowing.seconds))
        if explain and hop_seconds != self.windowing.seconds:  # once replaced by the window: labels unlike :predict's
            raise ClientInputError(f"an explanation covers a clip's one window ({self.windowing.seconds:g} s), and "
                                   f"hop_seconds ({hop_seconds:g}) spaces the windows of a longer clip: leave "
                                   "hop_seconds out to explain")
        return Options(
            top_k=labels.check_top_k(parameters.get("top_k", self.default_top_k), self.num_labels),
            function=labels.check_function(parameters.get("function_to_apply", self.default_function)),
            hop_seconds=hop_seconds,
            aggregate=windows.check_aggregate(parameters.get("aggregate", "max")),
            return_segments=flags["return_segments"],
            return_embedding=flags["return_embedding"],
            explain=explain,
            explain_method=explanations.check_method(parameters.get("explain_method", "occlusion")),
            explain_format=explanations.check_format(parameters.get("explain_format", "json")),
        )

    async def _pooled(self, function: Callable[..., Any], *args: Any,
                      abandoned: Callable[[concurrent.futures.Future], object],
                      stop: Optional[threading.Event] = None) -> Any:
        """`function(*args)` in the decoding pool. If the request is cancelled first (its client
        left), `stop` is set (decoding ends at its next block), and `abandoned` gets the pool's
        future on the event loop once it is done, or cancelled before it ran, to release what the
        call opened or would have closed, and what the request held meanwhile."""
        loop = asyncio.get_running_loop()
        future = self.pools.decoding.submit(function, *args)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if stop is not None:
                stop.set()
            future.add_done_callback(lambda done: _on_loop(loop, abandoned, done))
            raise

    def _open(self, clips: list[audio.Clip]) -> list[audio.Source]:
        """Every clip's header, checked against the clip limits and the request's sample budget,
        before a sample is decoded."""
        sources: list[audio.Source] = []
        try:
            for clip in clips:
                sources.append(audio.open_clip(clip, self.target))
            audio.SampleBudget(self.config.max_request_samples).check_declared(sources)
        except BaseException:
            _close(sources)
            raise
        return sources

    def _decode(self, sources: list[audio.Source], options: Options, stop: threading.Event) -> list[np.ndarray]:
        """Each clip in turn, the request's budget charged with the samples decoding finds (a header
        may not say, or may understate), and each clip stopped once its windows, beside the other
        clips' (as declared, or decoded), pass --max_windows_per_request, or to explain, once it
        passes its one window: the budget counts samples at each file's rate, so 600 s at 1 kHz in
        a file that does not say so would otherwise be decoded and upsampled whole before its
        windows were counted. Once `stop` is set (the request went away), at the next block."""
        hop_seconds, most = options.hop_seconds, self.config.max_windows_per_request
        with ExitStack() as stack, metrics.STAGE_SECONDS.labels("decode").time():  # not the wait for a pool thread
            for source in sources:
                stack.enter_context(closing(source.blocks))
            budget = audio.SampleBudget(self.config.max_request_samples)
            windows = [self.windowing.count(self._declared(source), hop_seconds) for source in sources]
            waveforms = []
            for index, source in enumerate(sources):
                if options.explain:
                    beyond = (self.windowing.beyond(1, hop_seconds), self._explains_one_window("longer than that"))
                else:
                    left = max(1, most - (sum(windows) - windows[index]))
                    beyond = (self.windowing.beyond(left, hop_seconds),
                              _too_many_windows(f"more than {most}", self.windowing.seconds, hop_seconds, most))
                try:
                    waveforms.append(self.target.waveform(source, budget, beyond, stop))
                except audio.Abandoned as exc:
                    logger.info("Decoding %s: its request went away", exc)
                    raise
                windows[index] = self.windowing.count(len(waveforms[-1]), hop_seconds)
                logger.debug("decoded %d frames at %d Hz (%d channels) with %s", source.decoded, source.rate,
                             source.channels, source.reader)
            return waveforms

    def _declared(self, source: audio.Source, estimated: bool = False) -> int:
        """The samples at the model's rate a header declares (with `estimated`, or what its container
        estimates where it declares none, for admission alone); a clip that does not say counts as
        one window until decoded."""
        frames = source.estimated if source.frames is None and estimated else source.frames
        return 0 if frames is None else round(frames / source.rate * self.target.rate)

    def _check_windows(self, lengths: list[int], request: protocol.AudioRequest, options: Options) -> int:
        """The request's windows (with explain, each clip's masked copies too, at most), refused past
        the limit before they are made, and a V2 answer's padded segments past theirs. A length of
        0 is a clip whose header did not say."""
        hop_seconds = options.hop_seconds
        per_clip = [self.windowing.count(length, hop_seconds) for length in lengths]
        count = sum(per_clip)
        copies = 0
        if options.explain:
            if count > len(lengths):
                raise ClientInputError(self._explains_one_window(f"of {max(lengths) / self.target.rate:.2f} s"))
            # A clip shorter than a frame has no cell: `starts` refuses it. Rollout's pass (beside the
            # queue, eager attention) is counted as the two windows it costs (`make bench`).
            copies = sum((len(self._grid(length or self.windowing.length).cells) if options.explain_method == "occlusion"
                          else ROLLOUT_WINDOWS) for length in lengths if not 0 < length < self.windowing.min_samples)
        if count + copies > self.config.max_windows_per_request:
            if copies:
                raise ClientInputError(
                    f"this request needs {count + copies} windows of {self.windowing.seconds:g} s, {copies} of them to "
                    f"explain its clips ({options.explain_method}); this server computes at most "
                    f"{self.config.max_windows_per_request} per request (--max_windows_per_request): send fewer clips "
                    "per request, or lower --explain_max_cells"
                )
            raise ClientInputError(_too_many_windows(str(count), self.windowing.seconds, hop_seconds,
                                                     self.config.max_windows_per_request))
        if options.return_segments and request.v2 is not None:
            hidden = self.hidden_size if options.return_embedding else 0
            check_padded_segments(per_clip, options.top_k + hidden,
                                  self.config.max_windows_per_request * (self.num_labels + hidden))
        return count + copies

    def _explains_one_window(self, clip: str) -> str:
        return (f"an explanation covers one window ({self.windowing.seconds:g} s) of a clip; this request has a clip "
                f"{clip}: send the part to explain")

    def _grid(self, samples: int) -> occlusion.Grid:
        """A clip's occlusion cells, as the explain_* settings lay them out over its one window (a
        clip a few samples longer is cut there: the frames past it are the window's padding)."""
        config, filterbank = self.config, self.filterbank
        frames = filterbank.frames(min(samples, self.windowing.length))
        return occlusion.grid(frames, filterbank.num_mel_bins,
                              cell_frames=max(1, round(config.explain_cell_seconds * filterbank.sampling_rate / HOP_LENGTH)),
                              bands=config.explain_bands, max_cells=config.explain_max_cells)

    def _warm_up(self, windows: int, runs: int) -> float:
        """Passes of whole windows of silence, the last timed: the first estimate of a window's cost
        (admission's wait). On a GPU a whole batch, twice: the first pass pays for CUDA's, cuBLAS's
        and cuFFT's set-up, and a batch that does not fit shows at start, split and logged, not on
        a request. A repository's model runs it on the thread the models' passes share: beside a
        pass of another (a V2 load while it serves), it would time the contention, and on a GPU two
        full passes at once may not fit."""
        silence = [np.zeros(self.filterbank.max_samples, dtype=np.float32)] * windows
        for _ in range(runs):
            started = time.monotonic()
            self.passes.run(self.passes.stage(silence))
        return (time.monotonic() - started) / windows

    def _rank(self, logits: torch.Tensor, options: Options) -> list[Ranked]:
        names, values = labels.top_k(labels.scores(logits, options.function), options.top_k, self.id2label)
        return [Ranked(row_names, row_values) for row_names, row_values in zip(names, values.numpy())]

    def get_input_types(self) -> list[dict]:
        return protocol.INPUT_TYPES

    def get_output_types(self) -> list[dict]:
        return protocol.OUTPUT_TYPES


def _too_many_windows(count: str, window_seconds: float, hop_seconds: float, most: int) -> str:
    return (f"this request needs {count} windows of {window_seconds:g} s at hop_seconds {hop_seconds:g}; this server "
            f"computes at most {most} per request (--max_windows_per_request): raise hop_seconds or send fewer "
            "seconds of audio")


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: Any) -> None:
    """`callback(*args)` on `loop`, from any thread, unless the loop has closed (the server stopping)."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # closed, even between a check and the call
        pass


def _close(sources: list[audio.Source]) -> None:
    for source in sources:
        source.blocks.close()
