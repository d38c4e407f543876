"""`make bench`: our serving path against the transformers pipeline, measured in one run.

On a full-size random-init AST (768 x 12 layers, 128 mel bins x 1024 frames, 527 labels) and
10 s clips, this measures and prints, each figure beside the baseline from the same run and their
ratio:
  1. the baseline: `pipeline("audio-classification")`, one clip at a time; and the peer a user who
     knows OpenVINO would pick, optimum-intel's OVModelForAudioClassification in that pipeline (from
     its own virtualenv, `make peer-venv`);
  2. the model alone (features precomputed) for each engine at batch 1, 4 and 8, and as a fraction of
     this machine's measured fp32 GEMM peak times the model's FLOPs (the roofline); the fp32, bf16
     and int8 GEMM peaks; the CPU model and its vector extensions head the output;
  3. the server end to end: V2 binary data and V1 base64 over HTTP, and gRPC, at concurrency 1, 4
     and 16 (clips/s, p50/p99 latency) in fp32, and the default (--precision auto) and int8 over V2
     at concurrency 4;
  4. feature extraction alone: ours against `ASTFeatureExtractor`;
  5. bf16 and int8 against fp32 logits (max abs difference, cosine, top-5 overlap);
  6. the server's peak RSS, and how fast its health probes answer with 4 clips in flight;
  7. long clips: one 10-minute clip over V2 binary at fp32 and int8, in seconds of audio classified
     per second (and seconds per minute of audio) against one clip of exactly one window (10.24 s)
     on the same server; and a fresh server's peak RSS after a 10-minute 48 kHz stereo WAV against
     after a 10 s one, both sent as V1 raw audio bodies;
  8. time to ready: a new pod (exports and times the engines), a restart with the cache kept, and a
     new pod from a model directory `make pack-model` packed with its engine files;
  9. the server's overhead: milliseconds per clip beyond its engine, on a model with AST's input
     (128 mel bins x 1024 frames) and a tiny encoder, so that decoding, the filterbank, the queue and
     the protocol are most of what is timed; with section 2, that overhead as a share of each
     precision's fastest engine alone;
  10. what a user gets without choosing: the pipeline, optimum-intel with its defaults and the server
     with default flags, in one short run (`--only default` alone; a full run has them in 1 and 3);
  11. the host side with frontends: the model of section 9 served by one process and by
     `--frontends 2`, single-clip requests over V2 binary from clients in several processes: requests/s,
     and each process's CPU per request (what one frontend's core can take, and what the model's
     process spends per request beyond its engine: the ceilings on a GPU node); then `--frontends 2`
     with passes of up to 16 windows, as a GPU batches them;
  12. what the embedding output costs: the full-size model's ONNX graph asked for both outputs against
     for the logits alone, at batch 1; and the server's throughput with `return_embedding` against
     without, over V2 binary and V1 JSON at concurrency 4;
  13. what an explanation costs: seconds for a V1 :explain (occlusion, default grid) of a 10 s clip with
     sound throughout, and of 10 s of silence with a 1 s tone burst (its silent cells are free), and
     by attention rollout, against a :predict of the same clip, one request at a time;
  14. what one more model costs: a model repository of two full-size models against one model alone
     (fp32 ONNX Runtime, engine files cached: a restart), in seconds to ready and peak RSS.
`--only main` runs 1-6, `--only long` runs 7, `--only start` runs 8, `--only overhead` runs 9,
`--only frontends` runs 11, `--only embedding` runs 12, `--only explain` runs 13, `--only models` runs 14
(`--only main start`: both). Results go to benchmarks/results/<time>.json, and
a full run's (no --only) also to benchmarks/results/latest.json. Nothing here is asserted: tests
check behaviour, this measures speed.
"""

import argparse
import base64
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import requests
import soundfile as sf
import torch
from transformers import ASTConfig, ASTFeatureExtractor, pipeline

from benchmarks.clients import Load, timed_clients
from predictor.allocator import keep_freed_memory
from predictor.checkpoint import Checkpoint
from predictor.cpu import cpu_limit
from predictor.engines import EngineOptions, build_engine
from predictor.engines.choice import ISA_FLAGS
from predictor.engines.artifacts import OFFLINE_TIMEOUT_S
from predictor.cpu import multiplies_bf16
from predictor.features import FRAME_LENGTH, HOP_LENGTH, LogMelFilterbank
from predictor.config import GPU_BATCH
from predictor.windows import Windowing
from tools import local_server
from tools.local_server import Server, process_cpu_s
from tools.pack_model import size_mb
from tools.random_ast import AUDIOSET_INPUT, save_random_ast

from . import gpu

logger = logging.getLogger("bench")
REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
RATE = 16000
SECTIONS = ("main", "long", "start", "overhead", "default", "frontends", "embedding", "explain", "models", "gpu")
LONG_SECONDS = 600.0


@dataclass
class Row:
    section: str
    name: str
    value: float
    unit: str
    baseline: Optional[float] = None
    baseline_name: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> Optional[float]:
        return None if not self.baseline else self.value / self.baseline


# ---- inputs -------------------------------------------------------------------------------


def make_clips(count: int, seconds: float = 10.0) -> list[np.ndarray]:
    """Tones over noise, different per clip: content does not change AST's cost, only its length does."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * RATE)) / RATE
    return [
        (0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
        for i in range(count)
    ]


def wav(clip: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, clip, RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def tones_file(seconds: float, rate: int, channels: int, subtype: str = "PCM_16", format_: str = "WAV") -> bytes:
    """Tones over noise as `make_clips` makes them, at any rate and channel count (a tone per channel),
    written 10 s at a time: 10 minutes of 48 kHz stereo would be 460 MB of float64 in one piece."""
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", rate, channels, subtype=subtype, format=format_) as file:
        total, block = round(seconds * rate), round(10 * rate)
        for first in range(0, total, block):
            t = np.arange(first, min(first + block, total))[:, None] / rate
            tones = 0.3 * np.sin(2 * np.pi * (440 + 220 * np.arange(channels)) * t)
            file.write((tones + 0.05 * rng.standard_normal(tones.shape)).astype(np.float32))
    return buffer.getvalue()


def best_of(runs: int, work: Callable[[], object]) -> float:
    work()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


# ---- machine and model --------------------------------------------------------------------


def gemm_peaks() -> dict[str, float]:
    """The best GEMM rate per precision, in G(FL)OP/s, of a square 2048 product and of AST's own MLP
    product (1216x768 @ 768x3072): fp32 and bf16 through torch.matmul (bf16 is emulated, and slow,
    without AVX512-BF16 or AMX), int8 through torch._int_mm (int32 sums)."""
    kinds = {
        "fp32": (lambda shape: torch.randn(*shape), torch.matmul),
        "bf16": (lambda shape: torch.randn(*shape).bfloat16(), torch.matmul),
        "int8": (lambda shape: torch.randint(-128, 128, shape, dtype=torch.int8), torch._int_mm),
    }
    peaks = {}
    for precision, (make, multiply) in kinds.items():
        rates = []
        for m, k, n in ((2048, 2048, 2048), (1216, 768, 3072)):
            a, b = make((m, k)), make((k, n))
            rates.append(2 * m * k * n / best_of(5, lambda: multiply(a, b)) / 1e9)
        peaks[precision] = max(rates)
    return peaks


def ast_gflops(config: ASTConfig, pooled_last_layer: bool = False) -> float:
    """Multiply-adds x 2 of one clip through AST: patch embedding, 12 encoder layers, classifier.
    With `pooled_last_layer`, as `predictor.engines.ast_forward` computes it: the last layer's keys and
    values for every token, the rest of it for the 2 pooled tokens only."""
    freq = (config.num_mel_bins - config.patch_size) // config.frequency_stride + 1
    time_ = (config.max_length - config.patch_size) // config.time_stride + 1
    patches, tokens, d, ff = freq * time_, freq * time_ + 2, config.hidden_size, config.intermediate_size

    def layer(queries: int) -> int:
        return 2 * tokens * d * d + 2 * queries * d * d + 2 * queries * d * ff + 2 * queries * tokens * d

    layers = config.num_hidden_layers * layer(tokens)
    if pooled_last_layer:
        layers += layer(2) - layer(tokens)
    embedding = patches * config.patch_size**2 * d
    return 2 * (embedding + layers + d * config.num_labels) / 1e9


# ---- the server ---------------------------------------------------------------------------


QUIET = ("--enable_latency_logging", "false")  # kserve logs every request's latency by default: a cost per request


def start_server(model_dir: Path, http_port: int, grpc_port: int, *flags: str) -> Server:
    """The server on the given ports, its log in results/, latency logging off."""
    return local_server.start_server(model_dir, RESULTS / f"server-{http_port}.log", (*QUIET, *flags), timeout=600,
                                     http_port=http_port, grpc_port=grpc_port)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def v1_b64_call(port: int, parameters: Optional[dict] = None) -> Callable[[bytes], None]:
    session = requests.Session()

    def call(data: bytes) -> None:
        body = {"instances": [{"b64": base64.b64encode(data).decode()}], **({"parameters": parameters} if parameters else {})}
        response = session.post(f"http://127.0.0.1:{port}/v1/models/ast:predict", json=body, timeout=600)
        response.raise_for_status()

    return call


def v1_raw_call(port: int, content_type: str = "audio/wav") -> Callable[[bytes], None]:
    """The file itself as the V1 body: no base64, no JSON."""
    session = requests.Session()

    def call(data: bytes) -> None:
        response = session.post(f"http://127.0.0.1:{port}/v1/models/ast:predict", data=data,
                                headers={"Content-Type": content_type}, timeout=600)
        response.raise_for_status()

    return call


def v2_binary_call(port: int, parameters: Optional[dict] = None) -> Callable[[bytes], None]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=600)

    def call(data: bytes) -> None:
        tensor = httpclient.InferInput("audio", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=np.object_), binary_data=True)
        client.infer("ast", [tensor], parameters=parameters).as_numpy("label")

    return call


def grpc_call(port: int) -> Callable[[bytes], None]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")

    def call(data: bytes) -> None:
        tensor = grpcclient.InferInput("audio", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
        client.infer("ast", [tensor], client_timeout=600).as_numpy("label")

    return call


def probe_latencies(port: int, stop: threading.Event) -> list[float]:
    """What Kubernetes' liveness and readiness probes would see, polled until `stop`."""
    seen = []
    while not stop.is_set():
        for path in ("/v2/health/live", "/v2/models/ast/ready"):
            start = time.perf_counter()
            requests.get(f"http://127.0.0.1:{port}{path}", timeout=30).raise_for_status()
            seen.append(time.perf_counter() - start)
        time.sleep(0.2)
    return seen


def load_test(make_call: Callable[[], Callable[[bytes], None]], files: list[bytes], concurrency: int,
              requests_: int) -> dict:
    """`requests_` one-clip requests, `concurrency` in flight at a time: throughput and latency.

    Each client thread has a client of its own, as concurrent users would (tritonclient's HTTP
    client is not thread-safe)."""
    latencies: list[float] = []
    local = threading.local()

    def one(i: int) -> None:
        if not hasattr(local, "call"):
            local.call = make_call()
        start = time.perf_counter()
        local.call(files[i % len(files)])
        latencies.append(time.perf_counter() - start)

    make_call()(files[0])  # warm-up: the server's first-request paths
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests_)))
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "clips_per_s": requests_ / wall,
        "p50_s": statistics.median(latencies),
        # With fewer than 100 requests the 99th percentile is the slowest one: say so.
        ("p99_s" if len(latencies) >= 100 else "max_s"): latencies[int(0.99 * (len(latencies) - 1) + 0.5)],
    }


# ---- the run ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[Row]:
    """The sections asked for, their models and engine files in a scratch folder removed after
    (a full run writes a gigabyte or more there)."""
    with tempfile.TemporaryDirectory(prefix="ast-bench-") as scratch:
        return sections(args, Path(scratch))


def sections(args: argparse.Namespace, work: Path) -> list[Row]:
    threads = cpu_limit()
    torch.set_num_threads(threads)
    if args.rehearse or (torch.cuda.is_available() and (args.only is None or "gpu" in args.only)):
        return gpu_section(work, gpu.REHEARSAL if args.rehearse else gpu.ON_GPU, args.results / "server-gpu.log")
    if args.only and "gpu" in args.only:
        logger.warning("--only gpu: torch %s sees no GPU here, so the GPU section does not run (--rehearse: on the "
                       "CPU, short)", torch.__version__)
    model_dir = save_random_ast(work / "ast")
    config = ASTConfig.from_pretrained(model_dir)
    rows: list[Row] = []
    if args.only is None or "main" in args.only:
        rows += clip_sections(args, work, model_dir, config, threads)
    if args.only is None or "long" in args.only:
        rows += long_sections(args, work, model_dir, config)
    if args.only is None or "start" in args.only:
        rows += start_section(work, model_dir)
    if args.only is None or "overhead" in args.only:
        rows += overhead_section(work, threads, rows)
    if args.only is not None and "default" in args.only:
        rows += default_section(args, work, model_dir, threads)
    if args.only is None or "frontends" in args.only:
        rows += frontends_section(work)
    if args.only is None or "embedding" in args.only:
        rows += embedding_section(args, work, model_dir, threads)
    if args.only is None or "explain" in args.only:
        rows += explain_section(work, model_dir)
    if args.only is None or "models" in args.only:
        rows += models_section(work, model_dir)
    return rows


def gpu_section(work: Path, plan: gpu.Plan, log: Path) -> list[Row]:
    """On a machine with a GPU (`benchmarks/gpu.py`): the pipeline there, the model alone per
    precision and batch, the default server end to end (its log in `log`, beside the results, which
    a lent machine brings back). Rehearsed on the CPU (`plan`), short."""
    logger.info("%s", gpu.describe(plan))
    model_dir = plan.save_model(work / "ast")
    config = ASTConfig.from_pretrained(model_dir)
    clips = make_clips(64 if plan.on_gpu else 8)
    rows = []
    peer = gpu.pipeline_peer(model_dir, clips, plan)
    base = peer["fp32, one clip at a time"]
    for name, rate in peer.items():
        rows.append(Row("gpu peer", f"transformers pipeline on the GPU, {name}", rate, "clips/s", base,
                        "pipeline fp32 on the GPU"))
    logits, alone = gpu.model_alone(model_dir, plan, gpu.BATCHES if plan.on_gpu else (1, GPU_BATCH))
    for (precision, batch), measured in alone.items():
        rows.append(Row("gpu model alone", f"torch {precision}, batch {batch}", measured["clips_per_s"], "clips/s",
                        base, "pipeline fp32 on the GPU", {"peak_gib": measured["peak_gib"]}))
    for name, cosine in gpu.cosines(logits, config.num_labels).items():
        rows.append(Row("gpu precision", f"{name} vs fp32 on the GPU: min cosine", cosine, ""))
    logger.info("before the server (in the output of a run cut short):\n%s", report(rows))
    windowing = Windowing(RATE, config.max_length * HOP_LENGTH, FRAME_LENGTH)
    windows = len(windowing.starts(round(LONG_SECONDS * RATE), windowing.seconds))
    server = local_server.start_server(model_dir, log, (*QUIET, "--device", plan.device, *plan.serving,
                                                         "--onnx_cache_dir", str(work)), timeout=600)
    try:
        served = server.precision
        results = gpu.server_rows(server, wav(clips[0]), wav(make_clips(1, LONG_SECONDS)[0]), windows, plan)
    finally:
        local_server.stop_server(server)
    reference = alone[(served, GPU_BATCH)]["clips_per_s"]
    for protocol, kinds in ((k, v) for k, v in results.items() if isinstance(v, dict)):
        for kind, measured in kinds.items():
            rate = measured.get("clips_per_s", measured.get("windows_per_s"))
            rows.append(Row("gpu server", f"default flags ({served}), {protocol}, {kind}", rate,
                            "clips/s" if "clips_per_s" in measured else "windows/s", reference,
                            f"model alone {served} batch {GPU_BATCH}", measured))
    memory = results["gpu_memory_mib"]  # "1234", "5678 (all processes)" or "unknown"
    rows.append(Row("gpu server", "GPU memory held after the runs (nvidia-smi)",
                    float(memory.split()[0]) if memory[:1].isdigit() else float("nan"), "MiB", extra={"nvidia_smi": memory}))
    return rows


def default_section(args: argparse.Namespace, work: Path, model_dir: Path, threads: int) -> list[Row]:
    """Section 10 (`--only default`; a full run has it in 1 and 3): what a user gets without
    choosing anything, in minutes: the pipeline, optimum-intel's with its defaults, and the server
    with default flags (`--precision auto`, `--backend auto`), in one run."""
    clips = make_clips(args.clips)
    classify = pipeline("audio-classification", model=str(model_dir))
    base = args.baseline_clips / best_of(1, lambda: [classify(c) for c in clips[: args.baseline_clips]])
    rows = [Row("baseline", "transformers pipeline, 1 clip at a time", base, "clips/s"),
            *peer_rows(work, model_dir, clips[: args.baseline_clips], threads, base)]
    server = start_server(model_dir, 18180, 18181, "--onnx_cache_dir", str(work))
    try:
        served = server.precision
        result = load_test(lambda: v2_binary_call(18180), [wav(c) for c in clips], 4, 8)
    finally:
        local_server.stop_server(server)
    extra = {**result, "precision": served, **({"vs_optimum_intel": result["clips_per_s"] / rows[1].value}
                                              if len(rows) > 1 else {})}
    rows.append(Row("server default", "V2 binary (HTTP), concurrency 4", result["clips_per_s"], "clips/s", base,
                    "pipeline", extra))
    return rows


def clip_sections(args: argparse.Namespace, work: Path, model_dir: Path, config: ASTConfig, threads: int) -> list[Row]:
    """Sections 1-6, on 10 s clips."""
    rows: list[Row] = []
    clips = make_clips(args.clips)
    files = [wav(c) for c in clips]
    logger.info("full-size random AST in %s, %d clips of 10 s, %d threads", model_dir, len(clips), threads)

    # 1. the baseline
    classify = pipeline("audio-classification", model=str(model_dir))
    base = args.baseline_clips / best_of(1, lambda: [classify(c) for c in clips[: args.baseline_clips]])
    rows.append(Row("baseline", "transformers pipeline, 1 clip at a time", base, "clips/s"))
    peer = peer_rows(work, model_dir, clips[: args.baseline_clips], threads, base)
    rows += peer

    # 4. features
    extractor = ASTFeatureExtractor()
    filterbank = LogMelFilterbank.from_extractor(extractor)
    theirs = best_of(10, lambda: extractor(clips, sampling_rate=RATE, return_tensors="np")) / len(clips)
    ours = best_of(10, lambda: filterbank(clips)) / len(clips)
    ours_1 = best_of(30, lambda: filterbank(clips[:1]))
    rows.append(Row("features", f"ours, batch of {len(clips)}", 1 / ours, "clips/s", 1 / theirs, "ASTFeatureExtractor"))
    rows.append(Row("features", "ours, one clip", 1 / ours_1, "clips/s", 1 / theirs, "ASTFeatureExtractor"))
    features = filterbank(clips)
    keep_freed_memory()  # as the server does at start; the baseline above ran with glibc's defaults, as a notebook would

    # 2. the model alone, and the roofline (the GEMM peaks are measured again at the end: the higher count)
    peaks = gemm_peaks()
    flops = ast_gflops(config)
    checkpoint = Checkpoint.open(str(model_dir))

    def build(backend: str, precision: str):
        # ahead of serving, as make pack-model does: no probe limits the export or quantization; a
        # checkpoint of its own for each, since torch's bf16 and int8 convert its module in place
        return build_engine(checkpoint.unloaded(),
                            EngineOptions(backend, precision, threads, work, OFFLINE_TIMEOUT_S))

    engines = {
        "torch fp32": build("torch", "fp32"),
        "torch bf16": build("torch", "bf16"),
        "torch int8": build("torch", "int8"),
        "onnxruntime fp32": build("onnxruntime", "fp32"),
        "onnxruntime int8": build("onnxruntime", "int8"),
        "openvino fp32": build("openvino", "fp32"),
        "openvino int8": build("openvino", "int8"),
    }
    if multiplies_bf16():
        engines["openvino bf16"] = build("openvino", "bf16")
    alone: dict[str, float] = {}
    for name, engine in engines.items():
        for batch in (1, 4, 8):
            if batch > len(features) or (batch > 1 and name != "torch fp32"):
                continue  # ONNX Runtime and OpenVINO run clip by clip; torch's bf16 and int8 (emulated, and
                # very slow, without AVX512-BF16/VNNI) show their cost at batch 1
            seconds = best_of(args.repeats if batch == 1 else 1, lambda: engine(features[:batch]))
            alone[f"{name} b{batch}"] = batch / seconds
            rows.append(Row("model alone", f"{name}, batch {batch}", batch / seconds, "clips/s", base, "pipeline"))

    # 5. bf16 and int8 against fp32, on 4 clips: torch's emulated bf16 (no AVX512-BF16/AMX) takes minutes a clip
    compared = features[:4]
    reference = engines["torch fp32"](compared)
    for name in ("torch bf16", "openvino bf16", "torch int8", "onnxruntime int8", "openvino int8"):
        if name not in engines:
            continue
        approximate = engines[name](compared)
        cosine = torch.nn.functional.cosine_similarity(approximate, reference, dim=-1)
        overlap = [len(set(q.topk(5).indices.tolist()) & set(r.topk(5).indices.tolist())) / 5
                   for q, r in zip(approximate, reference)]
        rows.append(Row("precision", f"{name} vs torch fp32: min cosine of logits", float(cosine.min()), "",
                        extra={"max_abs_logit_diff": float((approximate - reference).abs().max()),
                               "mean_top5_overlap": float(np.mean(overlap)), "clips": len(compared)}))
    del engines
    peaks = {precision: max(rate, again) for (precision, rate), again in zip(peaks.items(), gemm_peaks().values())}
    roofline = peaks["fp32"] / flops
    for row in rows:
        if row.section == "model alone" and "fp32" in row.name:
            row.extra["roofline_fraction"] = row.value / roofline
    for precision, rate in peaks.items():
        rows.append(Row("machine", f"{precision} GEMM peak, {threads} threads", rate,
                        "GOP/s" if precision == "int8" else "GFLOP/s"))
    rows.append(Row("machine", "AST forward pass, one clip", flops, "GFLOP"))
    rows.append(Row("machine", "AST forward pass as computed (last layer for the pooled tokens)",
                    ast_gflops(config, pooled_last_layer=True), "GFLOP"))
    rows.append(Row("machine", "fp32 roofline (GEMM peak / FLOPs)", roofline, "clips/s", base, "pipeline"))

    def engine_alone(precision: str) -> float:
        """The model alone as the server runs it: the fastest engine for the precision (what
        --backend auto picks), batch 1."""
        return max(v for k, v in alone.items() if k.endswith(f" {precision} b1"))

    def against(result: dict, precision: str) -> dict:
        """A server row's details: its throughput over the model alone's, and over the peer's."""
        ratios = {"vs_model_alone": result["clips_per_s"] / engine_alone(precision)}
        if peer:
            ratios["vs_optimum_intel"] = result["clips_per_s"] / peer[0].value
        return {**result, **ratios}

    # 3. the server end to end, and 6. its peak RSS
    http_port, grpc_port = 18180, 18181
    server = start_server(model_dir, http_port, grpc_port, "--onnx_cache_dir", str(work), "--precision", "fp32")
    try:
        calls = {"V2 binary (HTTP)": lambda: v2_binary_call(http_port), "V1 base64 (HTTP)": lambda: v1_b64_call(http_port),
                 "V2 gRPC": lambda: grpc_call(grpc_port)}
        for protocol, make_call in calls.items():
            for concurrency in args.concurrency:
                count = args.repeats if concurrency == 1 else max(4, 2 * concurrency)
                result = load_test(make_call, files, concurrency, count)
                rows.append(Row("server fp32", f"{protocol}, concurrency {concurrency}", result["clips_per_s"], "clips/s",
                                base, "pipeline", against(result, "fp32")))
        stop = threading.Event()
        with ThreadPoolExecutor(1) as prober:
            probes = prober.submit(probe_latencies, http_port, stop)
            load_test(lambda: v1_b64_call(http_port), files, 4, 8)
            stop.set()
            seen = sorted(probes.result())
        rows.append(Row("server fp32", "health probes with 4 clips in flight, slowest", seen[-1], "s",
                        extra={"probes": len(seen), "median_s": statistics.median(seen)}))
        rows.append(Row("server fp32", "peak RSS after load and all requests", peak_rss_mib(server.process.pid), "MiB"))
    finally:
        local_server.stop_server(server)
    # The default (auto: bf16 where the CPU multiplies it natively, else fp32), then int8
    for precision in ("auto", "int8"):
        server = start_server(model_dir, http_port, grpc_port, "--onnx_cache_dir", str(work), "--precision", precision)
        served = server.precision
        try:
            result = load_test(lambda: v2_binary_call(http_port), files, 4, 8)
            rows.append(Row(f"server {precision}", "V2 binary (HTTP), concurrency 4", result["clips_per_s"], "clips/s",
                            base, "pipeline", {**against(result, served), "served": served}))
            rows.append(Row(f"server {precision}", "peak RSS", peak_rss_mib(server.process.pid), "MiB"))
        finally:
            local_server.stop_server(server)
    return rows


def long_sections(args: argparse.Namespace, work: Path, model_dir: Path, config: ASTConfig) -> list[Row]:
    """Section 7: does a 10-minute clip cost in proportion to its length, in time and in memory?

    Each precision's server is fresh. On the fp32 one, memory comes first: the peak RSS after one
    10 s 48 kHz stereo WAV, then after a 10-minute one (both V1 raw bodies; the peak is a high-water
    mark, so the 10-minute growth shows over what a short clip already needed). Then speed, on both:
    one clip of exactly one window (10.24 s, best of --repeats after a warm-up) as the baseline,
    then one 10-minute clip, 16 kHz mono, over V2 binary."""
    rows: list[Row] = []
    windowing = Windowing(RATE, config.max_length * HOP_LENGTH, FRAME_LENGTH)
    window_s = windowing.seconds
    short, long_ = (wav(make_clips(1, seconds)[0]) for seconds in (window_s, LONG_SECONDS))
    windows = len(windowing.starts(round(LONG_SECONDS * RATE), window_s))
    stereo_rate, stereo_short_s = 48000, 10.0
    stereo_short, stereo_long = (tones_file(seconds, stereo_rate, 2) for seconds in (stereo_short_s, LONG_SECONDS))
    logger.info("long clips: %d windows of %g s in %g s; 10-minute 48 kHz stereo WAV of %.0f MB",
                windows, window_s, LONG_SECONDS, len(stereo_long) / 1e6)
    http_port, grpc_port = 18180, 18181
    speed: dict[str, float] = {}
    for precision in ("fp32", "int8"):
        # The 115 MB WAV is past the default 32 MiB body limit: the memory row raises it on purpose.
        flags = ("--max_request_mb", "128") * (precision == "fp32") + ("--precision", precision)
        server = start_server(model_dir, http_port, grpc_port, "--onnx_cache_dir", str(work), *flags)
        try:
            if precision == "fp32":
                raw = v1_raw_call(http_port)
                raw(stereo_short)
                before = peak_rss_mib(server.process.pid)
                start = time.perf_counter()
                raw(stereo_long)
                seconds = time.perf_counter() - start
                after = peak_rss_mib(server.process.pid)
                sizes = {"body_mb": len(stereo_long) / 1e6,
                         "source_as_float32_mib": LONG_SECONDS * stereo_rate * 2 * 4 / 2**20,
                         "mono_16k_float32_mib": LONG_SECONDS * RATE * 4 / 2**20,
                         "request_s": seconds}
                rows.append(Row("long clip memory", "fp32 peak RSS after a 10-minute 48 kHz stereo WAV (V1 raw body)",
                                after, "MiB", before, f"after a {stereo_short_s:g} s one", sizes))
                rows.append(Row("long clip memory", "fp32 peak RSS growth, 10-minute file over 10 s file",
                                after - before, "MiB", extra={k: v for k, v in sizes.items() if k != "request_s"}))
            call = v2_binary_call(http_port)
            one_window = best_of(args.repeats, lambda: call(short))
            start = time.perf_counter()
            call(long_)
            seconds = time.perf_counter() - start
        finally:
            local_server.stop_server(server)
        speed[precision] = LONG_SECONDS / seconds
        section, baseline_name = f"long clip {precision}", f"one {window_s:g} s clip"
        extra = {"request_s": seconds, "one_window_request_s": one_window, "windows": windows,
                 # the ratio if time followed windows exactly: the last window is only part full
                 "proportional_ratio": LONG_SECONDS / (windows * window_s)}
        if precision != "fp32":
            extra["vs_fp32"] = speed[precision] / speed["fp32"]
        rows.append(Row(section, "10-minute clip, V2 binary (HTTP): audio classified per second", speed[precision],
                        "s audio/s", window_s / one_window, baseline_name, extra))
        rows.append(Row(section, "10-minute clip: cost per minute of audio", 60 * seconds / LONG_SECONDS, "s",
                        60 * one_window / window_s, baseline_name))
    return rows


def peer_rows(work: Path, model_dir: Path, clips: list[np.ndarray], threads: int, base: float) -> list[Row]:
    """optimum-intel's OpenVINO model inside the pipeline, run by the peer virtualenv's Python
    (`make peer-venv`, or PEER_PYTHON), on the clips the baseline classified."""
    python = Path(os.environ.get("PEER_PYTHON", REPO / ".peer-venv" / "bin" / "python"))
    if not python.exists():
        logger.warning("no %s (make peer-venv): the optimum-intel peer is left out", python)
        return []
    np.save(work / "peer-clips.npy", np.stack(clips))
    done = subprocess.run([str(python), str(REPO / "benchmarks" / "peer_optimum.py"), str(model_dir),
                           str(work / "peer-clips.npy"), "--threads", str(threads)],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        logger.warning("the optimum-intel peer failed:\n%s", done.stderr[-3000:])
        return []
    peer = json.loads(done.stdout.splitlines()[-1])
    rate = peer.pop("optimum_intel_clips_per_s")
    return [Row("peer", "optimum-intel OVModelForAudioClassification in the pipeline", rate, "clips/s", base,
                "pipeline", peer)]


def start_section(work: Path, model_dir: Path) -> list[Row]:
    """Section 8: seconds from process start to ready on the full-size model, default flags (auto
    backend and precision), each with a cache directory of its own: a new pod with nothing cached (it exports and
    times the engines), a restart with that cache, and a new pod whose model directory
    `make pack-model` packed with its engine files; and what packing adds to the download."""
    packed = work / "packed"
    subprocess.run([sys.executable, "-m", "tools.pack_model", str(model_dir), str(packed)], cwd=REPO, check=True,
                   capture_output=True)
    seconds = {}
    for name, directory, cache in (("new", model_dir, "cold"), ("restart", model_dir, "cold"),
                                   ("packed", packed, "packed")):
        start = time.perf_counter()
        server = start_server(directory, 18180, 18181, "--onnx_cache_dir", str(work / f"{cache}-cache"))
        seconds[name] = time.perf_counter() - start
        local_server.stop_server(server)
    cold = "new pod, nothing packed or cached"
    plain_mb, packed_mb = size_mb(model_dir), size_mb(packed)
    return [
        Row("start", cold, seconds["new"], "s to ready"),
        Row("start", "restart, cache kept (a volume)", seconds["restart"], "s to ready", seconds["new"], cold),
        Row("start", "new pod, engine files packed with the model", seconds["packed"], "s to ready", seconds["new"],
            cold, {"model_dir_mb": packed_mb, "without_engines_mb": plain_mb}),
    ]


def overhead_section(work: Path, threads: int, rows: list[Row], requests_: int = 40) -> list[Row]:
    """Section 9: seconds per clip through the server (V2 binary, concurrency 1 and 4) less its engine's
    alone (the mean over the same clips: the server's figure is a mean too), on a model whose forward
    pass takes milliseconds; then, for each precision section 2 timed, that overhead over the fastest
    engine's seconds per clip alone (the server's target: at most 10 %)."""
    skinny = save_random_ast(work / "skinny", tiny=True, **AUDIOSET_INPUT)
    clips = make_clips(8)
    features = LogMelFilterbank.from_extractor(ASTFeatureExtractor())(clips)
    engine = build_engine(Checkpoint.open(str(skinny)), EngineOptions("onnxruntime", "fp32", threads, work, OFFLINE_TIMEOUT_S))
    engine_s = best_of(1, lambda: [engine(features[i % len(clips)][None]) for i in range(requests_)]) / requests_
    del engine
    out = []
    server = start_server(skinny, 18180, 18181, "--onnx_cache_dir", str(work), "--backend", "onnxruntime")
    try:
        for concurrency in (1, 4):
            result = load_test(lambda: v2_binary_call(18180), [wav(c) for c in clips], concurrency, requests_)
            out.append(Row("server overhead", f"V2 binary (HTTP), concurrency {concurrency}",
                           1000 * (1 / result["clips_per_s"] - engine_s), "ms per clip",
                           extra={"server_s_per_clip": 1 / result["clips_per_s"], "engine_s_per_clip": engine_s}))
    finally:
        local_server.stop_server(server)
    worst_ms = max(row.value for row in out)
    for precision in ("fp32", "bf16", "int8"):
        alone = [row.value for row in rows if row.section == "model alone" and f" {precision}, batch 1" in row.name]
        if alone:
            out.append(Row("server overhead", f"share of the fastest {precision} engine's time per clip",
                           100 * worst_ms / 1000 * max(alone), "%", extra={"engine_clips_per_s": max(alone)}))
    return out


GPU_LIKE_BATCH = 16  # windows per pass in section 11's last run, as a GPU takes them


def frontends_section(work: Path, concurrency: int = 16, seconds: float = 15.0) -> list[Row]:
    """Section 11: one process against `--frontends 2` on the skinny model, and where the CPU went:
    each frontend whole (HTTP, decoding, answers), and the model process's event loop (its main
    thread: the channel to the frontends and the queue's schedule; the passes run on threads of
    their own, and on a GPU on the GPU). Then the same with passes of several windows, as a GPU
    takes them, over which the loop's cost per pass is shared."""
    skinny = save_random_ast(work / "skinny-frontends", tiny=True, **AUDIOSET_INPUT)
    clip = wav(make_clips(1)[0])
    rows: list[Row] = []
    for frontends, batch in ((1, 1), (2, 1), (2, GPU_LIKE_BATCH)):
        passes = ("--max_batch_size", str(batch), "--max_batch_wait_ms", "5") if batch > 1 else ()
        server = start_server(skinny, 18180, 18181, "--onnx_cache_dir", str(work), "--backend", "onnxruntime",
                              "--precision", "fp32", "--frontends", str(frontends), *passes)
        try:
            roles = server.roles
            cpu = lambda pid: process_cpu_s(pid, main_thread_only=roles[pid] == "model")  # noqa: E731
            before = {pid: cpu(pid) for pid in roles}
            result = timed_clients(Load("v2", server.url, (clip,), concurrency, seconds))
            ms = {pid: 1000 * (cpu(pid) - before[pid]) / result["requests"] for pid in roles}
        finally:
            local_server.stop_server(server)
        by_role = {role: sum(v for pid, v in ms.items() if roles[pid] == role) for role in set(roles.values())}
        extra = {"p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
                 **{f"{role}_cpu_ms_per_request": v for role, v in sorted(by_role.items())}}
        name = ("one process" if frontends == 1 else f"--frontends {frontends}") + (" " + " ".join(passes) if passes else "")
        rows.append(Row("frontends", f"{name}, V2 binary single clips, concurrency {concurrency}",
                        result["requests_per_s"], "requests/s", rows[0].value if rows else None,
                        "one process" if rows else "", extra))
        if frontends > 1:
            how = f", passes of up to {batch} windows" if batch > 1 else ""
            rows.append(Row("frontends", f"CPU per request in the frontends (HTTP, decoding, answers){how}",
                            by_role["frontend"], "ms", extra={"requests_per_s_per_frontend_core": 1000 / by_role["frontend"]}))
            rows.append(Row("frontends", f"CPU per request on the model process's event loop{how}", by_role["model"], "ms",
                            extra={"requests_per_s_it_can_take": 1000 / by_role["model"]}))
    return rows


def embedding_section(args: argparse.Namespace, work: Path, model_dir: Path, threads: int,
                      concurrency: int = 4, requests_: int = 24) -> list[Row]:
    """Section 12: the embedding is the classifier's input, so the pass computes it either way; what
    it can cost is handing it out of the graph and answering with it. The engine rows ask one
    exported fp32 graph for both outputs and for the logits alone; the server rows send the same
    clips to one fp32 ONNX Runtime server with and without `return_embedding`, alternating arms."""
    clips = make_clips(args.clips)
    features = LogMelFilterbank.from_extractor(ASTFeatureExtractor())(clips).numpy()
    engine = build_engine(Checkpoint.open(str(model_dir)), EngineOptions("onnxruntime", "fp32", threads, work, OFFLINE_TIMEOUT_S))

    def per_second(outputs: Optional[list[str]]) -> float:
        return len(clips) / best_of(args.repeats, lambda: [engine.session.run(outputs, {"input_values": features[i : i + 1]})
                                                            for i in range(len(clips))])

    alone = per_second(["logits"])
    rows = [Row("embedding", "ONNX Runtime fp32, batch 1: logits and embedding", per_second(None), "clips/s", alone,
                "logits alone")]
    del engine
    files = [wav(c) for c in clips]
    server = start_server(model_dir, 18180, 18181, "--onnx_cache_dir", str(work), "--backend", "onnxruntime",
                          "--precision", "fp32")
    try:
        for name, make_call in (("V2 binary", v2_binary_call), ("V1 JSON", v1_b64_call)):
            seen: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(2):  # alternating arms, so that a drift of the machine falls on both
                for embedding in (False, True):
                    parameters = {"return_embedding": True} if embedding else None
                    result = load_test(lambda: make_call(18180, parameters), files, concurrency, requests_)
                    seen[embedding].append(result["clips_per_s"])
            rows.append(Row("embedding", f"server, {name}, concurrency {concurrency}, with return_embedding",
                            max(seen[True]), "clips/s", max(seen[False]), "without"))
    finally:
        local_server.stop_server(server)
    return rows


def explain_section(work: Path, model_dir: Path) -> list[Row]:
    """Section 13: an explanation is a pass per cell, so its cost is that of the cells that are not
    silence, in windows; timed here against classifying the same clip, on one fp32 ONNX Runtime
    server, a request at a time."""
    sound = make_clips(1)[0]
    burst = np.zeros_like(sound)
    burst[2 * RATE : 3 * RATE] = sound[2 * RATE : 3 * RATE]
    server = start_server(model_dir, 18180, 18181, "--onnx_cache_dir", str(work), "--backend", "onnxruntime",
                          "--precision", "fp32")
    session = requests.Session()

    def call(verb: str, clip: np.ndarray, parameters: Optional[dict] = None) -> None:
        url = f"http://127.0.0.1:18180/v1/models/ast:{verb}"
        if parameters:
            body = {"instances": [{"b64": base64.b64encode(wav(clip)).decode()}], "parameters": parameters}
            session.post(url, json=body, timeout=600).raise_for_status()
        else:
            session.post(url, data=wav(clip), headers={"Content-Type": "audio/wav"}, timeout=600).raise_for_status()

    def seconds(verb: str, clip: np.ndarray, parameters: Optional[dict] = None) -> float:
        """Best of two after a warm-up for a predict; one timed call for an occlusion (tens of passes);
        for a rollout, the second call (the first loads its encoder)."""
        if verb == "predict":
            return best_of(2, lambda: call(verb, clip))
        if parameters:
            call(verb, clip, parameters)
        start = time.perf_counter()
        call(verb, clip, parameters)
        return time.perf_counter() - start

    try:
        predict = seconds("predict", sound)
        rows = [Row("explain", "predict, a 10 s clip of tones over noise", predict, "s")]
        for name, clip in (("tones over noise (40 cells)", sound), ("silence with a 1 s tone burst (8 cells with sound)", burst)):
            rows.append(Row("explain", f"explain (occlusion, default grid), 10 s of {name}", seconds("explain", clip), "s",
                            predict, "predict"))
        rows.append(Row("explain", "explain (rollout), 10 s of tones over noise",
                        seconds("explain", sound, {"explain_method": "rollout"}), "s", predict, "predict"))
    finally:
        local_server.stop_server(server)
    return rows


def models_section(work: Path, model_dir: Path) -> list[Row]:
    """Section 14: one full-size model alone, then a repository of it and a second full-size model
    (other weights, other labels), each started twice with the same cache: the second start is
    what a restart (or a pod with packed engine files) pays, the first also exports."""
    repository = work / "repository"
    repository.mkdir()
    (repository / "audioset").symlink_to(model_dir)
    save_random_ast(repository / "second", [f"label {i}" for i in range(50)], seed=7)
    measured = {}
    for name, directory in (("one model", model_dir), ("two models", repository)):
        for _ in range(2):
            start = time.perf_counter()
            server = local_server.start_server(directory, RESULTS / "server-18180.log",
                                               ("--onnx_cache_dir", str(work / "models-cache"), "--backend",
                                                "onnxruntime", "--precision", "fp32"), timeout=900,
                                               http_port=18180, grpc_port=18181,
                                               model_name="audioset" if directory == repository else "ast")
            seconds = time.perf_counter() - start
            rss = peak_rss_mib(server.process.pid)
            local_server.stop_server(server)
        measured[name] = (seconds, rss)
    return [Row("models", "one model alone, restart: seconds to ready", measured["one model"][0], "s"),
            Row("models", "two models from one repository, restart: seconds to ready", measured["two models"][0], "s",
                measured["one model"][0], "one model"),
            Row("models", "one model alone: peak RSS", measured["one model"][1], "MiB"),
            Row("models", "two models from one repository: peak RSS", measured["two models"][1], "MiB",
                measured["one model"][1], "one model")]


def report(rows: list[Row]) -> str:
    lines = ["| section | measurement | value | baseline | ratio | details |", "|---|---|---|---|---|---|"]
    for row in rows:
        baseline = f"{row.baseline:.3g} ({row.baseline_name})" if row.baseline else ""
        ratio = f"{row.ratio:.2f}x" if row.ratio else ""
        details = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.extra.items())
        lines.append(f"| {row.section} | {row.name} | {row.value:.3g} {row.unit} | {baseline} | {ratio} | {details} |")
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU as /proc/cpuinfo names it, with family/model/stepping and the vector extensions that
    set fp32, bf16 and int8 speed: a cloud VM's "AMD EPYC" alone does not say which generation."""
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor is enough
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return "unknown"
    flags = set(fields.get("flags", "").split())
    return (f"{fields.get('model name', 'unknown')} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')} "
            f"stepping {fields.get('stepping', '?')}; {' '.join(f for f in ISA_FLAGS if f in flags) or 'no AVX2'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8, help="distinct 10 s clips")
    parser.add_argument("--baseline_clips", type=int, default=3, help="clips the pipeline classifies")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each batch-1 measurement (best kept)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--only", choices=SECTIONS, nargs="+", default=None,
                        help="main: sections 1-6 (10 s clips); long: section 7 (10-minute clips); start: section 8 "
                        "(time to ready); overhead: section 9 (the server's cost per clip); default: section 10 (default flags "
                        "against the peers'); frontends: section 11 (the host side with frontends); embedding: section 12 "
                        "(what the embedding output costs); explain: section 13 (what an explanation costs); models: "
                        "section 14 (what one more model costs); gpu: the GPU's section (benchmarks/gpu.py). Default: all. "
                        "A partial run does not replace latest.json.")
    parser.add_argument("--rehearse", action="store_true", help="with --only gpu: the GPU's section on the CPU, "
                        "short, with a tiny model: that the run goes through before a GPU is lent (make gpu-rehearsal); "
                        "its numbers say nothing of a GPU")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the results file (and the GPU "
                        "section's server log) is written; the CPU sections' server logs stay in benchmarks/results")
    args = parser.parse_args()
    if args.rehearse and args.only != ["gpu"]:
        parser.error("--rehearse rehearses the GPU's section alone: give --only gpu")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    local_server.unwind_on_sigterm()  # a run cut short (timeout on a lent machine) stops its servers
    args.results.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    cpu = cpu_model()
    logger.info("CPU: %s", cpu)
    rows = run(args)
    table = report(rows)
    logger.info("\n%s\nCPU: %s; load average (1, 5, 15 min) %s before, %s after", table, cpu,
                " ".join(f"{x:.2f}" for x in load_before), " ".join(f"{x:.2f}" for x in os.getloadavg()))
    result = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
              "cpu": cpu, "cpus": cpu_limit(), "node_cpus": os.cpu_count(),
              "load_average": {"before": load_before, "after": os.getloadavg()}, "args": vars(args),
              "rows": [{**asdict(r), "ratio": r.ratio} for r in rows], "table": table}
    paths = [args.results / f"{result['time'].replace(':', '')}.json"]
    if args.only is None:  # latest.json is a full run's
        paths.append(args.results / "latest.json")
    for path in paths:
        path.write_text(json.dumps(result, indent=1, default=str))  # default: --results, a path
        logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
