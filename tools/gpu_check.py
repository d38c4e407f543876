"""`make gpu-check`: the GPU path, checked on a machine with an NVIDIA GPU and a CUDA build of torch.

CI has no GPU, and a session that has one has minutes of it: so this is one prepared run, under
5 minutes on an H100/H200-class GPU, that needs nothing beyond the repository and the packages the
README names. On a full-size random-init AST (speed and parity do not depend on the weights):
- fp32 on the GPU answers as the CPU server does, within 1e-4 (raw logits, 10 s clips);
- a 10-minute recording gets the same windows and the same top labels on both;
- an explanation by rollout (the model's process computes it, on the GPU) draws the CPU's map,
  within 1e-3 of its largest cell;
- bf16 and fp16 on the GPU keep a cosine of at least 0.9999 to fp32 in their logits and 0.999 in
  their embeddings (the engine alone);
- a server squeezed into a sliver of the GPU's memory (--gpu_memory_fraction) with passes too big
  for it splits them, says so once, and answers a 10-minute recording whole;
- a short bench of the server with default flags (frontends: one per host core but one): seconds
  from its start to ready (the directory `save_pretrained` writes: on a GPU the engine is torch,
  which reads no packed engine files), then over V2 binary REST: single-clip requests at
  concurrency 64 (clips/s, p50, p99), then offered open loop at half the rate answered (p50, p99 at
  half load), 32-clip requests (windows/s), against the model alone at the same precision and
  batch, an explanation by rollout (ms, one request after another), and the GPU memory the server
  holds; then single clips to the server in one process (`--frontends 1`), the ratio the frontends
  gain.
It prints the GPU, its driver, torch's and CUDA's versions and the host CPU first. Where torch sees
no GPU it says so and exits 0. Exit 1 when a check fails. `--out DIR` keeps the results as JSON,
written after each step (`complete` once all have run), and the tail of each server's log there, also
when the run is stopped by SIGTERM (a lent machine gives back what is written under its $OUT); the
model and engine files are removed at the end.

`--rehearse` runs the same sequence on the CPU, short: a tiny model with AudioSet's
input and labels, measurements of 5 s, bf16 beside fp32, no memory to squeeze. It proves the
run itself (every server starts, every step and the bench complete, gpu-check.json is written),
where a mistake would otherwise surface only minutes into a session's few minutes of a GPU; its
numbers say nothing about a GPU. `make gpu-rehearsal` runs it as a test.
"""

import argparse
import base64
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
import torch

from benchmarks.clients import Load, single_clips, timed_clients
from benchmarks.gpu import MULTI_CLIPS, ON_GPU, REHEARSAL, Plan, cosines, describe, gpu_memory_mib, model_alone
from predictor.config import GPU_BATCH
from tools.local_server import Server, serving, unwind_on_sigterm
from tools.random_ast import AUDIOSET_NUM_LABELS
from tools.signals import encode, tone

logger = logging.getLogger(__name__)

RATE = 16000
LOG_TAIL_BYTES = 4 << 20
SQUEEZED = ("--gpu_memory_fraction", "0.02", "--max_batch_size", "512")  # about 2.8 GiB of an H200


def clips() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {
        "noise": encode((0.1 * rng.standard_normal(10 * RATE)).astype(np.float32), RATE, "WAV", "PCM_16"),
        "tones": encode(tone(330, 10.0, RATE) + tone(2500, 10.0, RATE, 0.1), RATE, "WAV", "FLOAT"),
        "short": encode(tone(880, 3.0, RATE, 0.3), RATE, "FLAC", "PCM_16"),
    }


def logits(server: Server, clip: bytes, **parameters) -> dict:
    body = {"instances": [{"b64": base64.b64encode(clip).decode()}],
            "parameters": {"top_k": 527, "function_to_apply": "none", **parameters}}
    response = requests.post(server.predict_url, json=body, timeout=600)
    response.raise_for_status()
    return response.json()["predictions"][0]


def by_label(predictions: list[dict]) -> dict[str, float]:
    return {p["label"]: p["score"] for p in predictions}


def ten_minutes() -> bytes:
    rng = np.random.default_rng(1)
    return encode(np.concatenate([tone(200 + 50 * i, 10.0, RATE, 0.2) + 0.02 * rng.standard_normal(10 * RATE)
                                  for i in range(60)]).astype(np.float32), RATE, "FLAC", "PCM_24")


def parity(cpu: Server, gpu: Server, recording: bytes) -> list[tuple[str, bool, str]]:
    checks = []
    for name, clip in clips().items():
        on_cpu, on_gpu = by_label(logits(cpu, clip)), by_label(logits(gpu, clip))
        worst = max(abs(on_cpu[label] - on_gpu[label]) for label in on_cpu)
        checks.append((f"fp32 logits, GPU vs CPU, {name}", worst <= 1e-4, f"max difference {worst:.2e}"))
    on_cpu, on_gpu = (logits(server, recording, top_k=3, return_segments=True) for server in (cpu, gpu))
    same = [[s["labels"][0]["label"] for s in answer["segments"]] for answer in (on_cpu, on_gpu)]
    checks.append(("10-minute recording: same windows and top labels", same[0] == same[1] and len(same[0]) > 50,
                   f"{len(same[0])} windows on the CPU, {len(same[1])} on the GPU"))
    maps = [np.array(rollout_map(server, clips()["tones"])) for server in (cpu, gpu)]
    worst = float(np.abs(maps[0] - maps[1]).max() / np.abs(maps[0]).max())
    checks.append(("rollout map (the model's process, on the GPU) vs the CPU's", worst <= 1e-3,
                   f"max difference {worst:.2e} of the map's largest cell"))
    return checks


def rollout_map(server: Server, clip: bytes) -> list[list[float]]:
    body = {"instances": [{"b64": base64.b64encode(clip).decode()}],
            "parameters": {"top_k": 1, "explain_method": "rollout"}}
    response = requests.post(f"{server.url}/v1/models/{server.model_name}:explain", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["explanations"][0][0]["relevance"]


def bench(gpu: Server, plan: Plan, multi: bool = True) -> dict:
    """The server over V2 binary REST: single clips (at concurrency 64 on a GPU); then (`multi`)
    single clips offered open loop at half the rate it answered (the latency at half load), and
    32-clip requests. `failed`: failures other than 503s, which are counted apart (`refused_503`)."""
    clip, seconds = clips()["noise"], plan.check_seconds
    runs = single_clips("v2", gpu.url, clip, plan.concurrency, seconds, half_load=multi)
    speed = {"precision": gpu.precision, "single_clips_per_s": runs[0]["requests_per_s"],
             "single_p50_ms": runs[0]["p50_ms"], "single_p99_ms": runs[0]["p99_ms"]}
    if len(runs) > 1:  # at half load too: then 32-clip requests
        runs.append(timed_clients(Load("v2", gpu.url, (clip,) * MULTI_CLIPS, plan.multi_concurrency, seconds)))
        speed.update(half_load_clips_per_s=runs[1]["requests_per_s"], half_load_p50_ms=runs[1]["p50_ms"],
                     half_load_p99_ms=runs[1]["p99_ms"], multi_clips_per_s=runs[2]["requests_per_s"] * MULTI_CLIPS,
                     rollout_ms=rollout_ms(gpu, clip), gpu_memory_mib=gpu_memory_mib(gpu))
    return {**speed, "failed": sum(run["failed"] for run in runs), "refused_503": sum(run["refused_503"] for run in runs)}


def rollout_ms(server: Server, clip: bytes, runs: int = 8) -> float:
    """An explanation by rollout of one clip, one request after another, once the encoder has
    loaded (its first request): the median, in ms. What admission's estimate of a rollout, two
    windows' time until one has been timed, stands against on this GPU."""
    rollout_map(server, clip)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        rollout_map(server, clip)
        times.append(1000 * (time.perf_counter() - started))
    return float(np.median(times))


def squeezed(server: Server, recording: bytes) -> tuple[str, bool, str]:
    answer = logits(server, recording, top_k=1, return_segments=True)
    split = "ran out of GPU memory: split and retried" in server.log.read_text()
    return ("a pass out of GPU memory is split and served", split and len(answer["segments"]) > 50,
            f"split logged: {split}; {len(answer['segments'])} windows answered")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="The GPU path, checked (make gpu-check).")
    parser.add_argument("--out", type=Path, help="a folder for the results (gpu-check.json) and the tail of each "
                        "server's log, kept whether the checks pass, fail or break off (default: a new folder in the "
                        "temporary directory, named at the end)")
    parser.add_argument("--rehearse", action="store_true", help="the same run on the CPU, with a tiny model and "
                        "short measurements: that the run itself goes through, whatever the machine")
    args = parser.parse_args()
    if args.rehearse:
        plan = REHEARSAL
    elif torch.cuda.is_available():
        plan = ON_GPU
    else:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu-check: torch {torch.__version__} ({build}) sees no GPU here; nothing to check")
        return 0
    unwind_on_sigterm()  # the servers stop, their logs are kept under --out
    out = args.out or Path(tempfile.mkdtemp(prefix="ast-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    report = Report(describe(plan), out)
    print(report.device)
    # the model and engine files (gigabytes on a GPU) go with the scratch folder; the logs' tails stay
    with tempfile.TemporaryDirectory(prefix="ast-gpu-check-scratch-") as scratch:
        try:
            check(Path(scratch), plan, report)
        finally:
            keep_logs(Path(scratch), out)
            print(f"results and the servers' logs in {out}")
    print(json.dumps(report.whole))
    return 0 if all(c["passed"] for c in report.results["checks"]) else 1


@dataclass
class Report:
    """The checks printed as they pass or fail, and gpu-check.json (in `out`) written after each
    step, `complete` at the end: a run cut short still brings back what it checked."""

    device: str
    out: Path
    results: dict = field(default_factory=lambda: {"checks": [], "complete": False})

    @property
    def whole(self) -> dict:
        return {"device": self.device, **self.results}

    def checked(self, checks: list[tuple[str, bool, str]]) -> None:
        for name, passed, detail in checks:
            print(f"{'ok  ' if passed else 'FAIL'} {name}: {detail}")
        self.add(checks=self.results["checks"] + [{"check": n, "passed": p, "detail": d} for n, p, d in checks])

    def add(self, **parts) -> None:
        self.results.update(parts)
        (self.out / "gpu-check.json").write_text(json.dumps(self.whole))


def keep_logs(work: Path, out: Path) -> None:
    """The last LOG_TAIL_BYTES of each server's log, where a run on a lent machine brings files back."""
    for log in work.glob("*.log"):
        (out / log.name).write_bytes(log.read_bytes()[-LOG_TAIL_BYTES:])


def check(work: Path, plan: Plan, report: Report) -> None:
    """Every check and the bench, into `report` as they end."""
    model_dir = plan.save_model(work / "ast")
    cache = ("--onnx_cache_dir", str(work / "cache"))
    on_device = ("--device", plan.device, *plan.serving, *cache)
    recording = ten_minutes()
    with serving(model_dir, work / "cpu.log", ("--device", "cpu", "--backend", "torch", "--precision", "fp32", *cache),
                 timeout=600) as cpu, \
            serving(model_dir, work / "gpu.log", (*on_device, "--precision", "fp32"), timeout=600) as gpu:
        report.checked(parity(cpu, gpu, recording))
    if plan.on_gpu:
        with serving(model_dir, work / "squeezed.log", (*on_device, *SQUEEZED), timeout=600) as small:
            report.checked([squeezed(small, recording)])
    rows, alone = model_alone(model_dir, plan, batches=(GPU_BATCH,))
    report.checked([(f"{name}, cosine to fp32 on the GPU", cosine >= (0.9999 if name.endswith("logits") else 0.999),
                     f"min cosine {cosine:.6f}") for name, cosine in cosines(rows, AUDIOSET_NUM_LABELS).items()])
    clips_per_s = {f"{precision} batch {batch}": round(v["clips_per_s"], 1) for (precision, batch), v in alone.items()}
    print(f"model alone, clips/s: {clips_per_s}")
    report.add(model_alone_clips_per_s=clips_per_s)
    started = time.monotonic()
    with serving(model_dir, work / "default.log", on_device, timeout=600) as default:
        speed = {"ready_s": time.monotonic() - started, **bench(default, plan)}
    speed["vs_model_alone"] = speed["single_clips_per_s"] / alone[(speed["precision"], GPU_BATCH)]["clips_per_s"]
    report.add(bench=speed)
    with serving(model_dir, work / "one-process.log", (*on_device, "--frontends", "1"), timeout=600) as one:
        speed["one_process"] = bench(one, plan, multi=False)
    one_process = speed["one_process"]["single_clips_per_s"]
    speed["frontends_gain"] = speed["single_clips_per_s"] / one_process if one_process else None
    print(f"bench (default flags, V2 binary REST; one_process: --frontends 1): {speed}")
    report.add(bench=speed, complete=True)


if __name__ == "__main__":
    sys.exit(main())
