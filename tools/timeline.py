"""Draw what `return_segments` answers for a long clip: a picture of the server's per-window timeline.

    python -m tools.timeline                         # random-init full-size AST, served here, then stopped
    python -m tools.timeline --tiny                  # the same with a tiny random AST (seconds, not minutes)
    python -m tools.timeline --url http://127.0.0.1:8080 --top_k 10   # a server that is already running

The clip (about 74 s at 16 kHz) is made here, in distinct stretches: espeak-ng speech, silence, a
440 Hz tone, a siren-like sweep, white noise, and speech again. It is sent once, as a WAV in a V1
request with `return_segments: true` and a hop shorter than the window, and the picture shows:
  - top: the clip's spectrogram, each stretch named, so one can see what each window heard;
  - bottom: every label's score in every window (one column per window, drawn at the window's
    centre), as the server answered it.
The server's answer is kept beside the picture (`--json`, default the PNG's name with .json), so
the picture can be checked against it.

Why: so that the README can show what long-clip segments look like. By default the model is written here
with random weights (no real AST weights are at hand), so its scores are noise and only the
timeline's shape (where windows fall, how they overlap, what one response holds) is meaningful;
the picture's caption says so.
"""

import argparse
import base64
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import requests
import soundfile as sf
import soxr

from tools.local_server import serving

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
RATE = 16000
LABELS = ["Speech", "Music", "Siren", "Dog", "Silence", "Vehicle", "Bird", "Rain", "Wind", "Applause"]
FIRST_SPEECH = (
    "Good morning. This is a test of the audio classifier. It listens to a long recording, "
    "in windows of about ten seconds, and says what it hears in each one. First you will hear "
    "some silence, then a tone, a siren, and some noise."
)
LAST_SPEECH = (
    "And now the recording comes back to speech. The weather today is cloudy, with a chance of rain "
    "in the evening, and a light wind from the west. Tomorrow will be sunny and warm. Thank you for "
    "listening, and goodbye."
)
FADE_S = 0.02


@dataclass(frozen=True)
class Stretch:
    name: str
    start: float
    end: float


# ---- the clip ---------------------------------------------------------------------------------


def speech(text: str, raw: Path) -> np.ndarray:
    """espeak-ng's voice (22.05 kHz) → 16 kHz float32 by soxr, peak 0.5."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is needed: apt-get install espeak-ng")
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(raw), text], check=True)
    samples, rate = sf.read(raw, dtype="float32", always_2d=True)
    samples = soxr.resample(samples.mean(axis=1), rate, RATE, quality="HQ").astype(np.float32)
    return 0.5 * samples / max(float(np.abs(samples).max()), 1e-6)


def tone(freq: float, seconds: float, amplitude: float = 0.4) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def siren(seconds: float, low: float = 650.0, high: float = 1500.0, cycle_s: float = 2.0,
          amplitude: float = 0.4) -> np.ndarray:
    """A 'wail': the pitch glides between low and high and back every cycle_s seconds."""
    t = np.arange(int(seconds * RATE)) / RATE
    freq = low + (high - low) * 0.5 * (1 - np.cos(2 * np.pi * t / cycle_s))
    phase = 2 * np.pi * np.cumsum(freq) / RATE
    return (amplitude * np.sin(phase)).astype(np.float32)


def noise(seconds: float, amplitude: float = 0.15, seed: int = 0) -> np.ndarray:
    return (amplitude * np.random.default_rng(seed).standard_normal(int(seconds * RATE))).astype(np.float32)


def faded(samples: np.ndarray) -> np.ndarray:
    """Short fades in and out, so that no stretch starts or ends with a click."""
    n = min(int(FADE_S * RATE), len(samples) // 2)
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
    out = samples.copy()
    out[:n] *= ramp
    out[len(out) - n:] *= ramp[::-1]
    return out


def build_clip(workdir: Path) -> tuple[np.ndarray, list[Stretch]]:
    """The clip and its stretches, in order."""
    parts = [
        ("speech (espeak-ng)", speech(FIRST_SPEECH, workdir / "speech-1.wav")),
        ("silence", np.zeros(8 * RATE, dtype=np.float32)),
        ("440 Hz tone", tone(440.0, 12.0)),
        ("siren-like sweep\n650-1500 Hz", siren(12.0)),
        ("white noise", noise(12.0)),
        ("speech (espeak-ng)", speech(LAST_SPEECH, workdir / "speech-2.wav")),
    ]
    stretches, position = [], 0
    for name, samples in parts:
        stretches.append(Stretch(name, position / RATE, (position + len(samples)) / RATE))
        position += len(samples)
    return np.concatenate([faded(samples) for _, samples in parts]), stretches


def wav_bytes(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


# ---- the server -------------------------------------------------------------------------------


def classify(url: str, model_name: str, clip: bytes, parameters: dict[str, Any]) -> dict:
    body = {"instances": [{"b64": base64.b64encode(clip).decode("ascii")}], "parameters": parameters}
    response = requests.post(f"{url}/v1/models/{model_name}:predict", json=body, timeout=900)
    if response.status_code != 200:
        raise RuntimeError(f"the server answered {response.status_code}: {response.text[:2000]}")
    return response.json()


def label_count(model_dir: Path) -> Optional[int]:
    config = model_dir / "config.json"
    return len(json.loads(config.read_text())["id2label"]) if config.is_file() else None


# ---- the picture ------------------------------------------------------------------------------


def score_matrix(segments: list[dict], rows: int) -> tuple[list[str], np.ndarray, int]:
    """(labels, (labels, windows) scores, how many labels the segments name): the `rows` labels with
    the highest score in any window, in the order of their best window's score; NaN where a window's
    top-k left a label out."""
    names: list[str] = []
    for segment in segments:
        names += [p["label"] for p in segment["labels"] if p["label"] not in names]
    scores = np.full((len(names), len(segments)), np.nan)
    for column, segment in enumerate(segments):
        for p in segment["labels"]:
            scores[names.index(p["label"]), column] = p["score"]
    keep = np.argsort(-np.nanmax(scores, axis=1), kind="stable")[:rows]
    return [names[i] for i in keep], scores[keep], len(names)


def column_edges(centres: np.ndarray, hop: float) -> np.ndarray:
    """Cell edges halfway between window centres (the last windows, cut at the clip's end, bunch up)."""
    if len(centres) == 1:
        return np.array([centres[0] - hop / 2, centres[0] + hop / 2])
    middle = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[centres[0] - (middle[0] - centres[0])], middle, [centres[-1] + (centres[-1] - middle[-1])]])


def draw(samples: np.ndarray, stretches: list[Stretch], response: dict, hop: float, model_note: str,
         server_note: str, parameters: dict[str, Any], out: Path, json_name: str, rows: int, seconds_taken: float,
         model_name: str = "ast") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import mlab

    prediction = response["predictions"][0]
    segments = prediction["segments"]
    starts = np.array([s["start"] for s in segments])
    ends = np.array([s["end"] for s in segments])
    window = float((ends - starts).max())
    duration = len(samples) / RATE
    names, scores, distinct = score_matrix(segments, rows)

    plt.rcParams.update({"font.size": 8})
    fig = plt.figure(figsize=(10, 6), dpi=100)
    grid = fig.add_gridspec(2, 2, width_ratios=[1, 0.015], height_ratios=[1, 1.25], left=0.1, right=0.93,
                            top=0.83, bottom=0.175, hspace=0.2, wspace=0.02)
    top = fig.add_subplot(grid[0, 0])
    bottom = fig.add_subplot(grid[1, 0], sharex=top)

    # Top: the spectrogram, stretch by stretch (power averaged over 4 frames, so noise draws smooth
    # and the PNG stays small; floored, so that digital silence draws black rather than blank).
    spectrum, freqs, times = mlab.specgram(samples, NFFT=512, Fs=RATE, noverlap=256)
    frames = spectrum.shape[1] // 4 * 4
    spectrum = spectrum[:, :frames].reshape(len(freqs), -1, 4).mean(axis=2)
    times = times[:frames].reshape(-1, 4).mean(axis=1)
    decibels = 10 * np.log10(np.maximum(spectrum, 1e-13))
    image = top.pcolormesh(times, freqs, decibels, cmap=plt.get_cmap("magma", 48), vmin=-120, vmax=-20,
                           shading="nearest", rasterized=True)
    top.set_ylim(0, 4000)
    top.set_yticks([0, 1000, 2000, 3000, 4000], ["0", "1k", "2k", "3k", "4 kHz"])
    top.set_ylabel("frequency")
    for stretch in stretches:
        if stretch.start > 0:
            top.axvline(stretch.start, color="white", lw=1, ls="--")
        top.text((stretch.start + stretch.end) / 2, 3850, stretch.name, ha="center", va="top", color="black",
                 fontsize=8, bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": "none", "alpha": 0.85})
    # Two windows' extent, to show the window against the hop.
    for k, y in ((0, 2900), (1, 2650)):
        if k < len(segments):
            top.annotate("", xy=(starts[k], y), xytext=(ends[k], y),
                         arrowprops={"arrowstyle": "|-|", "color": "cyan", "lw": 1.2, "shrinkA": 0, "shrinkB": 0})
    if len(segments) > 1:
        top.text(ends[1] + 0.5, 2775, f"windows 1 and 2: {window:g} s each, {hop:g} s apart", color="cyan",
                 va="center", fontsize=7.5, bbox={"boxstyle": "round,pad=0.2", "fc": "black", "ec": "none",
                                                  "alpha": 0.7})
    top.tick_params(labelbottom=False)
    top.set_title("the clip sent (spectrogram), stretch by stretch", loc="left", fontsize=8.5)

    # Bottom: each label's score in each window.
    centres = (starts + ends) / 2
    mesh = bottom.pcolormesh(column_edges(centres, hop), np.arange(len(names) + 1), np.ma.masked_invalid(scores),
                             cmap="viridis", shading="flat")
    mesh.set_rasterized(True)
    bottom.set_yticks(np.arange(len(names)) + 0.5, names)
    bottom.invert_yaxis()
    for stretch in stretches[1:]:
        bottom.axvline(stretch.start, color="white", lw=1, ls="--")
    bottom.set_xlim(0, duration)
    bottom.set_xlabel(f"seconds into the clip (each column: one window, drawn at its centre; "
                      f"the first centre is {centres[0]:.2f} s)")
    function = parameters["function_to_apply"]
    drawn = "" if len(names) == distinct else f"; only the {len(names)} highest of its {distinct} labels drawn"
    bottom.set_title(f"the server's segments: each label's {function} score per window (top_k "
                     f"{parameters['top_k']}{drawn})", loc="left", fontsize=8.5)
    colorbar = fig.colorbar(mesh, cax=fig.add_subplot(grid[1, 1]))
    colorbar.set_label(f"{function} score")
    fig.colorbar(image, cax=fig.add_subplot(grid[0, 1])).set_label("power (dB)")

    fig.suptitle(f"AST server, one real V1 response: {len(segments)} windows of {window:g} s at hop {hop:g} s "
                 f"over a {duration:.1f} s clip", fontsize=11, x=0.1, ha="left", y=0.975)
    fig.text(0.1, 0.935, textwrap.fill(model_note, 150), fontsize=8, ha="left", va="top", color="darkred")
    request = json.dumps(parameters, separators=(", ", ": "))
    caption = [
        f"V1 request: POST /v1/models/{model_name}:predict, one 16 kHz WAV as b64, answered in {seconds_taken:.1f} s "
        f"by {server_note}.",
        f'"parameters": {request}',
        f"The answer itself is in {json_name}. Drawn by tools/timeline.py.",
    ]
    fig.text(0.1, 0.015, "\n".join(caption), fontsize=7.5, ha="left", va="bottom", color="dimgray")
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    # An adaptive 256-colour palette: the same picture at about a third of the bytes.
    from PIL import Image

    Image.open(buffer).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


# ---- the CLI ----------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8080 (default: start one here)")
    where.add_argument("--model_dir", type=Path,
                       help="serve this model directory here (default: write a random-init AST to a temp dir)")
    parser.add_argument("--tiny", action="store_true",
                        help="the default random model tiny (2 layers, 32 wide, 64 mel bins) with AudioSet's "
                        "1024 frames; default: AST's full size")
    parser.add_argument("--model_name", default="ast")
    parser.add_argument("--hop_seconds", type=float, default=2.5)
    parser.add_argument("--top_k", type=int, default=None,
                        help="default: every label of the model served here; with --url, 10")
    parser.add_argument("--rows", type=int, default=12, help="most labels drawn (those with the highest scores)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "timeline.png")
    parser.add_argument("--json", type=Path, default=None, help="the server's answer (default: --out with .json)")
    parser.add_argument("--save_clip", type=Path, default=None, help="also keep the clip sent, as a WAV")
    args = parser.parse_args(argv)
    if args.tiny and (args.url or args.model_dir):
        parser.error("--tiny sizes the random model this tool writes; it means nothing with --url or --model_dir")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    began = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="ast-timeline-") as temp:
        workdir = Path(temp)
        samples, stretches = build_clip(workdir)
        clip = wav_bytes(samples)
        clip_path = args.save_clip or workdir / "clip.wav"
        clip_path.write_bytes(clip)
        logger.info("clip: %.1f s at %d Hz, %s; written to %s", len(samples) / RATE, RATE,
                    ", ".join(f"{s.name.splitlines()[0]} {s.start:.1f}-{s.end:.1f} s" for s in stretches), clip_path)

        if args.url:
            top_k = args.top_k or 10
            note = f"Model: whatever the server at {args.url} serves (this tool does not know its weights)."
            parameters = request_parameters(args.hop_seconds, top_k)
            response, taken = timed_classify(args.url, args.model_name, clip, parameters)
            server_note = f"the server at {args.url}"
        else:
            if args.model_dir:
                model_dir = args.model_dir
                note = f"Model: {model_dir} (as given to this tool)."
            else:
                from tools.random_ast import save_random_ast  # torch and transformers: only when needed

                model_dir = workdir / "model"
                size = "tiny (2 layers x 32 wide, 64 mel bins x 1024 frames)" if args.tiny else \
                    "full-size (12 layers x 768, 128 mel bins x 1024 frames)"
                save_random_ast(model_dir, LABELS, tiny=args.tiny, max_length=1024 if args.tiny else None)
                logger.info("wrote a random-init %s AST to %s", size.split(" ")[0], model_dir)
                note = (f"Model: RANDOM-INIT {size} AST with {len(LABELS)} AudioSet-like labels, written by "
                        "tools/random_ast.py. Its scores are noise (they move with the input, but which label "
                        "scores high means nothing): only the timeline's shape is meaningful.")
            top_k = args.top_k or label_count(model_dir) or 10
            parameters = request_parameters(args.hop_seconds, top_k)
            with serving(model_dir, workdir / "server.log", ("--backend", "torch"), model_name=args.model_name,
                         timeout=300) as server:
                logger.info("server ready at %s after %.1f s", server.url, time.monotonic() - began)
                response, taken = timed_classify(server.url, args.model_name, clip, parameters)
            server_note = f"`python -m predictor --backend torch`, started by this tool on {os.cpu_count()} CPU cores"

    json_path = args.json or args.out.with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(response, separators=(",", ":")) + "\n")
    draw(samples, stretches, response, args.hop_seconds, note, server_note, parameters, args.out, json_path.name,
         args.rows, taken, args.model_name)
    # The CLI's own output: what it wrote.
    for path in (args.out, json_path):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    print(f"parameters: {json.dumps(parameters)}; request {taken:.1f} s, all {time.monotonic() - began:.1f} s")
    return 0


def request_parameters(hop_seconds: float, top_k: int) -> dict[str, Any]:
    return {"hop_seconds": hop_seconds, "aggregate": "max", "return_segments": True, "top_k": top_k,
            "function_to_apply": "sigmoid"}


def timed_classify(url: str, model_name: str, clip: bytes, parameters: dict[str, Any]) -> tuple[dict, float]:
    logger.info("POST %s/v1/models/%s:predict with %s", url, model_name, parameters)
    began = time.monotonic()
    response = classify(url, model_name, clip, parameters)
    taken = time.monotonic() - began
    logger.info("answered in %.1f s: %d segments", taken, len(response["predictions"][0]["segments"]))
    return response, taken


if __name__ == "__main__":
    sys.exit(main())
