"""A clip's relevance maps (`occlusion`, `rollout`) → what the answer carries for each label
explained, and the optional picture: the clip's spectrogram with a label's map over it, as a PNG.

The picture is drawn with Pillow (kserve already installs it): the spectrogram in grey, low
frequencies at the bottom, each cell tinted red by its share of the largest drop (a cell whose
masking raised the score is left untinted). matplotlib would draw axes too, but is a 40 MB
dependency the server image does not otherwise need.
"""

import base64
import io
from typing import Optional

import numpy as np
from PIL import Image

from . import occlusion
from .errors import ClientInputError, shown

FORMATS = ("json", "png")
METHODS = ("occlusion", "rollout")


def check_method(name: object) -> str:
    if name not in METHODS:
        raise ClientInputError(f"explain_method must be one of {', '.join(METHODS)}; got {shown(name)}")
    return name  # type: ignore[return-value]


def check_format(name: object) -> str:
    if name not in FORMATS:
        raise ClientInputError(f"explain_format must be one of {', '.join(FORMATS)}; got {shown(name)}")
    return name  # type: ignore[return-value]


def check_pictures(clips: int, top_k: int, most: int) -> None:
    """An answer carries a picture per clip and label explained (rollout's map is every label's,
    drawn once, but each label carries it): each a PNG of a pixel per frame and mel bin in base64,
    and drawing them is host work admission does not count. Refused before anything is opened past `most`."""
    if clips * top_k > most:
        raise ClientInputError(
            f"explain_format png answers a picture for each clip and label explained: this request asks for "
            f"{clips} clips x top_k {top_k} = {clips * top_k}, and this server draws at most {most} per request "
            "(--explain_max_pictures): ask for fewer labels (top_k) or clips, or explain_format json")


def explained(method: str, labels: list[str], scores: np.ndarray, relevance: np.ndarray, cells: occlusion.Grid,
              rate: int, mel_bins: int, features: Optional[np.ndarray] = None) -> list[dict]:
    """One object per label: label, score, method, times (s), bands_hz, relevance [times][bands],
    and with `features` (the clip's (frames, bins) spectrogram) a base64 PNG of the map over it,
    drawn once per distinct map (rollout's is every label's)."""
    times, bands = occlusion.times_s(cells, rate), occlusion.bands_hz(cells, mel_bins, rate)
    drawn: dict[bytes, str] = {}

    def png(drops: np.ndarray) -> str:
        key = drops.tobytes()
        if key not in drawn:
            drawn[key] = base64.b64encode(picture(features, drops, cells)).decode()
        return drawn[key]

    return [
        {"label": label, "score": float(score), "method": method, "times": times, "bands_hz": bands,
         "relevance": drops.tolist(), **({"png": png(drops)} if features is not None else {})}
        for label, score, drops in zip(labels, scores, relevance)
    ]


def picture(features: np.ndarray, drops: np.ndarray, cells: occlusion.Grid) -> bytes:
    """(frames, bins) spectrogram and (times, bands) drops → PNG bytes, one pixel per frame and bin."""
    low, high = float(features.min()), float(features.max())
    grey = ((features - low) / max(high - low, 1e-6) * 255).astype(np.uint8).T[::-1]  # bins up, frames across
    heat = np.zeros(features.shape, np.float32)
    peak = float(drops.max())
    if peak > 0:
        for (t, b) in cells.cells:
            (first, last), (bottom, top) = cells.frames[t], cells.bins[b]
            heat[first:last, bottom:top] = max(float(drops[t, b]), 0.0) / peak
    heat = heat.T[::-1]
    base = np.stack([grey] * 3, axis=-1).astype(np.float32)
    red = np.array([255.0, 0.0, 0.0])
    tinted = base * (1 - 0.6 * heat[..., None]) + red * 0.6 * heat[..., None]
    buffer = io.BytesIO()
    Image.fromarray(tinted.astype(np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()
