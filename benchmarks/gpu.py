"""`make bench` on a machine with a GPU (`--only gpu`; a full run takes this section instead of the
CPU's where torch sees a GPU), on a full-size random-init AST and 10 s clips:
- the peer a GPU user has: the transformers pipeline on the GPU (`device=0`), fp32 one clip at a time,
  fp32 with `batch_size=32`, and the model in fp16 with `batch_size=32`;
- the model alone (features precomputed, on the GPU) per precision (fp32 without TF32: the torch
  engine sets that, bf16, fp16)
  and batch (1, 8, 32, 64, 128): clips/s and the peak GPU memory;
- the server with default flags, end to end, over V2 binary REST and gRPC: single-clip requests at
  concurrency 64, then offered open loop at half the rate answered (the latency at half load),
  32-clip requests at 16 and 10-minute recordings at 8 (clips or windows/s, p50 and p99 latency),
  each against the model alone at the server's precision and batch; and the GPU memory the server
  holds after them.
The GPU, its driver, torch's and CUDA's versions and the host CPU head the output (`describe`).
`tools/gpu_check.py` runs a short version of the server part. Both rehearse on the CPU (`Plan`).
"""

import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.clients import SECONDS, Load, single_clips, timed_clients
from predictor.cpu import cpu_model_name
from tools.local_server import Server
from tools.random_ast import AUDIOSET_INPUT, save_random_ast

logger = logging.getLogger(__name__)

RATE = 16000
CONCURRENCY = 64
MULTI_CLIPS = 32
# 32-clip requests and 10-minute recordings in flight at once, so that their windows stay within what
# the server admits by default on a GPU (--max_queued_windows): beyond it they would be measuring 503s.
MULTI_CONCURRENCY = 16
LONG_CONCURRENCY = 8
PRECISIONS = ("fp32", "bf16", "fp16")
BATCHES = (1, 8, 32, 64, 128)
GPU_CHECK_SECONDS = 10.0  # per measurement in `make gpu-check`: the bench's are longer


@dataclass(frozen=True)
class Plan:
    """Where a GPU run runs, on what and for how long: the GPU, or a rehearsal on the CPU
    (`make gpu-check GPU_CHECK_ARGS=--rehearse`, `bench --only gpu --rehearse`). A session has
    minutes of a GPU, so the run's own mistakes are found here first: a tiny model with AudioSet's
    input and labels, measurements of seconds, loads a 2-core host answers inside them, the GPU's
    engine and the shape of its default (frontends, passes). A rehearsal's numbers say nothing of a GPU."""

    device: str
    precisions: tuple[str, ...]
    check_seconds: float  # per measurement, gpu-check's
    bench_seconds: float  # per measurement, the bench's
    concurrency: int  # clients sending single clips
    multi_concurrency: int  # 32-clip requests in flight
    long_concurrency: int  # 10-minute recordings in flight
    tiny: bool  # a tiny model with AudioSet's input and labels; else AudioSet AST's whole geometry
    serving: tuple[str, ...] = ()  # flags the servers take beyond --device

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"

    def save_model(self, directory: Path) -> Path:
        return save_random_ast(directory, **({"tiny": True, **AUDIOSET_INPUT} if self.tiny else {}))


ON_GPU = Plan("cuda", PRECISIONS, GPU_CHECK_SECONDS, SECONDS, CONCURRENCY, MULTI_CONCURRENCY, LONG_CONCURRENCY, tiny=False)
REHEARSAL = Plan("cpu", ("fp32", "bf16"), 5.0, 5.0, 16, 2, 1, tiny=True,
                 serving=("--backend", "torch", "--frontends", "2", "--max_batch_size", "16"))


def describe(plan: Plan) -> str:
    if not plan.on_gpu:
        return f"rehearsal on the CPU ({cpu_model_name()}), torch {torch.__version__}"
    properties = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # none there, or one that hangs
        driver = "unknown (no answer from nvidia-smi)"
    return (f"GPU {properties.name} ({properties.total_memory / 2**30:.0f} GiB), driver {driver}, torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}, host CPU {cpu_model_name()}")


def gpu_memory_mib(server: Server) -> str:
    """What nvidia-smi says the server's processes hold on the GPU (their whole contexts, not only
    tensors: with frontends, the model's process holds it, not the one started); where it lists
    other PIDs (a container), the GPU's memory in use, every process's together. Never an error:
    it comes after every measurement of a run."""
    try:
        listing = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30).stdout
        pids = {str(pid) for pid in server.roles}
        rows = [[part.strip() for part in line.split(",")] for line in listing.splitlines()]
        used = [int(row[1]) for row in rows if len(row) > 1 and row[0] in pids and row[1].isdigit()]  # "[N/A]" on some
        if used:
            return str(sum(used))
        total = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        return f"{total[0]} (all processes)" if total else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def model_alone(model_dir: Path, plan: Plan, batches: tuple[int, ...]) -> tuple[dict, dict]:
    """Per precision of the plan: the rows (logits, embedding) of 8 clips (for the cosines to fp32),
    and clips/s and peak GPU memory per batch (none on the CPU, in a rehearsal)."""
    from predictor.checkpoint import Checkpoint, load_feature_extractor
    from predictor.engines import EngineOptions, build_engine
    from predictor.features import LogMelFilterbank

    checkpoint = Checkpoint.open(str(model_dir))
    filterbank = LogMelFilterbank.from_extractor(load_feature_extractor(checkpoint.source, checkpoint.config))
    features = filterbank([np.random.default_rng(seed % 8).standard_normal(10 * RATE).astype(np.float32) * 0.1
                           for seed in range(max(batches))]).to(plan.device)
    logits, speed = {}, {}
    for precision in plan.precisions:
        engine = build_engine(checkpoint.unloaded(), EngineOptions("torch", precision, device=plan.device))
        logits[precision] = engine(features[:8])
        for batch in batches:
            engine(features[:batch])
            if plan.on_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            runs = max(3, 256 // batch)
            started = time.perf_counter()
            for _ in range(runs):
                engine(features[:batch])  # the logits come back to the host: each call ends synchronised
            speed[(precision, batch)] = {"clips_per_s": runs * batch / (time.perf_counter() - started),
                                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if plan.on_gpu else None}
        del engine
        if plan.on_gpu:
            torch.cuda.empty_cache()
    return logits, speed


def cosines(rows: dict, num_labels: int) -> dict[str, float]:
    """{"bf16 logits": least cosine to fp32, "bf16 embedding": ..., ...} for each precision but fp32."""
    from predictor.engines.options import split

    parts = {precision: dict(zip(("logits", "embedding"), split(r, num_labels))) for precision, r in rows.items()}
    return {f"{precision} {part}": torch.nn.functional.cosine_similarity(values, parts["fp32"][part], dim=-1).min().item()
            for precision, by_part in parts.items() if precision != "fp32" for part, values in by_part.items()}


def pipeline_peer(model_dir: Path, clips: list[np.ndarray], plan: Plan) -> dict[str, float]:
    """The transformers pipeline on the GPU (the CPU in a rehearsal), as a user would run it: clips/s
    per configuration."""
    from transformers import pipeline

    rates = {}
    for name, options, batch in (("fp32, one clip at a time", {}, 1), ("fp32, batch_size 32", {}, 32),
                                 ("fp16, batch_size 32", {"dtype": torch.float16}, 32)):
        classify = pipeline("audio-classification", model=str(model_dir), device=plan.device, **options)
        classify(clips[:batch], batch_size=batch)  # warm-up
        started = time.perf_counter()
        classify(clips, batch_size=batch)
        rates[name] = len(clips) / (time.perf_counter() - started)
        del classify
        if plan.on_gpu:
            torch.cuda.empty_cache()
    return rates


def server_rows(server: Server, clip: bytes, recording: bytes, windows: int, plan: Plan) -> dict:
    """The default server over V2 binary REST and gRPC; what it holds on the GPU after."""
    results, seconds = {}, plan.bench_seconds
    for protocol, address in (("V2 binary REST", ("v2", server.url)), ("V2 gRPC", ("grpc", server.grpc_url))):
        runs = single_clips(*address, clip, plan.concurrency, seconds)
        results[protocol] = {name: {**run, "clips_per_s": run["requests_per_s"]}
                             for name, run in zip(("single clips", "single clips at half that load"), runs)}
        multi = timed_clients(Load(*address, (clip,) * MULTI_CLIPS, plan.multi_concurrency, seconds))
        long_ = timed_clients(Load(*address, (recording,), plan.long_concurrency, seconds))
        results[protocol].update({
            f"{MULTI_CLIPS}-clip requests": {**multi, "clips_per_s": multi["requests_per_s"] * MULTI_CLIPS},
            "10-minute recordings": {**long_, "windows_per_s": long_["requests_per_s"] * windows},
        })
    results["gpu_memory_mib"] = gpu_memory_mib(server)
    return results
