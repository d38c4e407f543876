"""Attention rollout (Abnar & Zuidema 2020, arXiv 2005.00928): the cheap explanation, one pass.

Each layer's attention, averaged over its heads, plus the identity for the residual connection and
renormalised by row, says how much each token of the layer's input flows into each token of its
output; the product over the layers says it from the patches to the last layer. AST classifies
the mean of its CLS and distillation tokens, so a patch's relevance is the mean of those two rows
at the patch's column. A cell's relevance (`occlusion.Grid`) is the mean over the patches of their
relevance weighted by how much of each patch lies in the cell (patches are 16 x 16 frames and mel
bins, every `time_stride` frames and `frequency_stride` bins, so they overlap). Attention does not
depend on the label read from it: every label gets the same map.

Its model is transformers' own encoder with eager attention (SDPA hands no weights out, nor do
the exported graphs the engines run), loaded on first use where the model runs: on its device, in
the model's process under `--frontends` (`ipc`), so a server holds one copy of it, and a GPU
computes it.
"""

import logging
import threading
from typing import TYPE_CHECKING, Callable, Optional, Sequence, TypeVar

import numpy as np
import torch

from .errors import Overloaded, released
from .occlusion import Grid

if TYPE_CHECKING:  # transformers' modelling code takes a second or more to import: only a rollout needs it
    from transformers import ASTConfig, ASTModel

logger = logging.getLogger(__name__)

T = TypeVar("T")
PATCH = 16  # AST's patch side, in frames and in mel bins (its Conv2d kernel)


def rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each layer's attention, (batch, heads, tokens, tokens), first layer first → (batch, patches):
    each patch token's share of what the two pooled tokens read at the end."""
    joint: Optional[torch.Tensor] = None
    for layer in attentions:
        flow = layer.mean(dim=1) + torch.eye(layer.shape[-1], dtype=layer.dtype, device=layer.device)
        flow = flow / flow.sum(dim=-1, keepdim=True)
        joint = flow if joint is None else flow @ joint
    return joint[:, :2, 2:].mean(dim=1)


def overlaps(cells: list[tuple[int, int]], patches: int, stride: int) -> np.ndarray:
    """(cells, patches): how many of each patch's rows (frames or bins) lie in each cell."""
    starts = np.arange(patches) * stride
    return np.array([np.clip(np.minimum(starts + PATCH, last) - np.maximum(starts, first), 0, None)
                     for first, last in cells], dtype=np.float64)


def cell_relevance(patches: torch.Tensor, config: "ASTConfig", cells: Grid) -> np.ndarray:
    """One clip's (patches,) relevance, in the encoder's order (mel-bin rows of time patches) →
    (time cells, band cells): the overlap-weighted mean of the patches over each cell."""
    across = (config.num_mel_bins - PATCH) // config.frequency_stride + 1
    along = (config.max_length - PATCH) // config.time_stride + 1
    relevance = patches.double().reshape(across, along).numpy()
    by_time = overlaps(cells.frames, along, config.time_stride)
    by_band = overlaps(cells.bins, across, config.frequency_stride)
    weight = np.outer(by_time.sum(axis=1), by_band.sum(axis=1))
    return (by_time @ relevance.T @ by_band.T / np.where(weight > 0, weight, 1)).astype(np.float32)


class Rollout:
    """The encoder with eager attention, loaded on first use (a second copy of the weights: the
    engine's may be a graph, or in another precision)."""

    def __init__(self, source: str, config: "ASTConfig", device: str = "cpu"):
        self.source, self.config, self.device = source, config, torch.device(device)
        self.encoder: Optional["ASTModel"] = None
        self.loading = threading.Lock()  # requests arriving together load it once

    def load(self) -> None:
        """The encoder, loaded once (a caller that times the rollout loads it first, apart)."""
        with self.loading:
            if self.encoder is None:
                from transformers import ASTModel

                logger.info("Loading the encoder with eager attention from %s onto %s, for explanations by rollout",
                            self.source, self.device)
                self.encoder = _in_gpu_memory(
                    "to load the encoder for an explanation by rollout",
                    lambda: ASTModel.from_pretrained(self.source, attn_implementation="eager").to(self.device).eval())

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """(clips, frames, mel bins) features → (clips, patches) relevance, on the CPU."""
        self.load()

        @torch.inference_mode()
        def relevance() -> torch.Tensor:  # a clip at a time: every layer's attentions of a clip are held at once
            return torch.cat([rollout(self.encoder(input_values=clip[None].to(self.device),
                                                   output_attentions=True).attentions).cpu()
                              for clip in features])

        return _in_gpu_memory("for an explanation by rollout", relevance)


def _in_gpu_memory(what: str, compute: Callable[[], T]) -> T:
    """A GPU that runs out of memory in `compute` is busy (503, retry), not broken. A function, not
    a context manager: a context manager's `__exit__` keeps the failure's traceback (the frames
    holding the GPU's memory) in its own frame, under the 503's."""
    try:
        return compute()
    except torch.OutOfMemoryError as exc:
        raise Overloaded(f"the GPU has no memory left {what} now", 1) from released(exc)
