"""The peer a user who knows OpenVINO would pick: optimum-intel's OVModelForAudioClassification in
the transformers pipeline. Run by `make bench` with the peer's own Python (optimum-intel pins a
transformers other than ours, so it lives in a virtualenv of its own: `make peer-venv`).

    PEER_PYTHON benchmarks/peer_optimum.py MODEL_DIR CLIPS_NPY [--threads N]

Prints one JSON object: the pipeline with the OpenVINO model and, in the same process, the plain
pipeline, each in clips/s over the same clips, and how long export and compile took. OpenVINO
picks its inference precision itself (bf16 on CPUs with AMX), as it would for that user.
"""

import argparse
import json
import time

import numpy as np
import torch
from transformers import AutoFeatureExtractor, pipeline


def clips_per_second(classify, clips: list[np.ndarray]) -> float:
    classify(clips[0])  # warm-up
    start = time.perf_counter()
    for clip in clips:
        classify(clip)
    return len(clips) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("clips", help=".npy file: (clips, samples) float32 at 16 kHz")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    from importlib.metadata import version

    from optimum.intel import OVModelForAudioClassification

    if args.threads:
        torch.set_num_threads(args.threads)
    clips = list(np.load(args.clips))
    start = time.perf_counter()
    model = OVModelForAudioClassification.from_pretrained(
        args.model_dir, export=True, ov_config={"INFERENCE_NUM_THREADS": args.threads} if args.threads else None)
    model.compile()
    ready_s = time.perf_counter() - start
    extractor = AutoFeatureExtractor.from_pretrained(args.model_dir)
    optimum_rate = clips_per_second(pipeline("audio-classification", model=model, feature_extractor=extractor), clips)
    plain_rate = clips_per_second(pipeline("audio-classification", model=args.model_dir), clips)
    print(json.dumps({
        "optimum_intel_clips_per_s": optimum_rate, "plain_pipeline_clips_per_s": plain_rate,
        "export_and_compile_s": ready_s, "inference_precision": str(model.request.get_property("INFERENCE_PRECISION_HINT")),
        "versions": {name: version(name) for name in ("optimum-intel", "openvino", "nncf", "torch", "transformers")},
    }))


if __name__ == "__main__":
    main()
