"""`make gpu-check`: the GPU path, checked on a machine with an NVIDIA GPU and a CUDA build of torch.

CI has no GPU, and a session that has one has minutes of it: so this is one prepared run, under
5 minutes on an H100/H200-class GPU, that needs nothing beyond the repository and the packages the
README names. On a full-size random-init AST (speed and parity do not depend on the weights):
- fp32 on the GPU answers as the CPU server does, within 1e-4 (raw logits, 10 s clips);
- a 10-minute recording gets the same windows and the same top labels on both;
- bf16 on the GPU keeps a cosine of at least 0.9999 to fp32 (the engine alone);
- a short bench: single-clip requests at concurrency 16 against the GPU server, clips/s.
It prints the GPU, its driver, torch's and CUDA's versions and the host CPU first. Where torch sees
no GPU it says so and exits 0. Exit 1 when a check fails.
"""

import base64
import json
import logging
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch

from predictor.cpu import cpu_model_name
from tools.local_server import Server, serving
from tools.random_ast import save_random_ast
from tools.signals import encode, tone

logger = logging.getLogger(__name__)

RATE = 16000
BENCH_SECONDS = 20
BENCH_CONCURRENCY = 16


def describe() -> str:
    properties = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        driver = "unknown (no nvidia-smi)"
    return (f"GPU {properties.name} ({properties.total_memory / 2**30:.0f} GiB), driver {driver}, torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}, host CPU {cpu_model_name()}")


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


def parity(cpu: Server, gpu: Server) -> list[tuple[str, bool, str]]:
    checks = []
    for name, clip in clips().items():
        on_cpu, on_gpu = by_label(logits(cpu, clip)), by_label(logits(gpu, clip))
        worst = max(abs(on_cpu[label] - on_gpu[label]) for label in on_cpu)
        checks.append((f"fp32 logits, GPU vs CPU, {name}", worst <= 1e-4, f"max difference {worst:.2e}"))
    rng = np.random.default_rng(1)
    recording = encode(np.concatenate([tone(200 + 50 * i, 10.0, RATE, 0.2) + 0.02 * rng.standard_normal(10 * RATE)
                                       for i in range(60)]).astype(np.float32), RATE, "FLAC", "PCM_24")
    on_cpu, on_gpu = (logits(server, recording, top_k=3, return_segments=True) for server in (cpu, gpu))
    same = [[s["labels"][0]["label"] for s in answer["segments"]] for answer in (on_cpu, on_gpu)]
    checks.append(("10-minute recording: same windows and top labels", same[0] == same[1] and len(same[0]) > 50,
                   f"{len(same[0])} windows on the CPU, {len(same[1])} on the GPU"))
    return checks


def bf16(model_dir: Path, device: str = "cuda:0") -> tuple[str, bool, str]:
    from predictor.checkpoint import Checkpoint, load_feature_extractor
    from predictor.engines import EngineOptions, build_engine
    from predictor.features import LogMelFilterbank

    checkpoint = Checkpoint.open(str(model_dir))
    filterbank = LogMelFilterbank.from_extractor(load_feature_extractor(checkpoint.source, checkpoint.config))
    features = filterbank([np.random.default_rng(seed).standard_normal(10 * RATE).astype(np.float32) * 0.1
                           for seed in range(8)])
    outputs = {precision: build_engine(checkpoint.unloaded(), EngineOptions("torch", precision, device=device))(features)
               for precision in ("fp32", "bf16")}
    cosine = torch.nn.functional.cosine_similarity(outputs["bf16"], outputs["fp32"], dim=-1).min().item()
    return "bf16 logits, cosine to fp32 on the GPU", cosine >= 0.9999, f"min cosine {cosine:.6f}"


def bench(gpu: Server) -> str:
    clip = clips()["noise"]
    deadline = time.monotonic() + BENCH_SECONDS

    def client(_: int) -> int:
        done = 0
        with requests.Session() as session:
            while time.monotonic() < deadline:
                session.post(gpu.predict_url, data=clip, headers={"Content-Type": "audio/wav"},
                             timeout=120).raise_for_status()
                done += 1
        return done

    started = time.monotonic()
    with ThreadPoolExecutor(BENCH_CONCURRENCY) as pool:
        answered = sum(pool.map(client, range(BENCH_CONCURRENCY)))
    return (f"single 10 s clips, V1 raw body, concurrency {BENCH_CONCURRENCY}: "
            f"{answered / (time.monotonic() - started):.1f} clips/s")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu-check: torch {torch.__version__} ({build}) sees no GPU here; nothing to check")
        return 0
    print(describe())
    work = Path(tempfile.mkdtemp(prefix="ast-gpu-check-"))
    model_dir = save_random_ast(work / "ast")
    cache = ("--onnx_cache_dir", str(work / "cache"))
    with serving(model_dir, work / "cpu.log", ("--device", "cpu", "--backend", "torch", "--precision", "fp32", *cache), timeout=600) as cpu, \
            serving(model_dir, work / "gpu.log", ("--device", "cuda", "--precision", "fp32", *cache), timeout=600) as gpu:
        checks = parity(cpu, gpu)
        speed = bench(gpu)
    checks.append(bf16(model_dir))
    for name, passed, detail in checks:
        print(f"{'ok  ' if passed else 'FAIL'} {name}: {detail}")
    print(f"bench: {speed}")
    print(json.dumps({"device": describe(), "checks": [{"check": c[0], "passed": c[1], "detail": c[2]} for c in checks],
                      "bench": speed}))
    return 0 if all(passed for _, passed, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
