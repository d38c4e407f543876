"""The kserve.Model: load AST once, then preprocess → predict → postprocess per request.

Thin by design: protocol parsing lives in `protocol`, decoding in `audio`, the filterbank in
`features`, the inference engine in `engines`, request batching in `batching`, ranking in
`labels`. What lives here is the order of the steps and where they run: decoding in a worker
thread; the filterbank and the model, both torch, on the model's own thread behind the batcher's
queue (beside each other they fought over the same 2 cores); the event loop only parses and
answers, so it keeps answering health probes during inference.
"""

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from kserve import Model
from kserve.protocol.infer_type import InferRequest, InferResponse
from transformers import ASTFeatureExtractor, ASTForAudioClassification

from . import audio, labels, protocol
from .allocator import release_freed_memory
from .batching import Batcher
from .engines import EngineOptions, build_engine
from .errors import ClientInputError
from .features import LogMelFilterbank
from .onnx_export import ExportError

logger = logging.getLogger(__name__)

AST_MODEL_TYPE = "audio-spectrogram-transformer"


class ModelLoadError(RuntimeError):
    """Nothing loadable at the configured location; the message says where we looked."""


@dataclass
class Batch:
    """A request on its way through the model: its features and what the response needs."""

    features: torch.Tensor
    request: protocol.AudioRequest
    top_k: int
    function: str


@dataclass
class Scores:
    scores: torch.Tensor
    batch: Batch


class ASTModel(Model):
    def __init__(
        self,
        name: str,
        model_dir: str,
        top_k: int = 5,
        function_to_apply: Optional[str] = None,
        max_audio_seconds: float = 600.0,
        max_clips_per_request: int = 64,
        max_batch_size: int = 1,
        max_batch_wait_ms: float = 0.0,
        engine: EngineOptions = EngineOptions(),
    ):
        super().__init__(name)
        self.model_dir = model_dir
        self.default_top_k = top_k
        self.requested_function = function_to_apply
        self.max_audio_seconds = max_audio_seconds
        self.max_clips_per_request = max_clips_per_request
        self.max_batch_size = max_batch_size
        self.max_batch_wait_ms = max_batch_wait_ms
        self.engine_options = engine
        self.batcher: Optional[Batcher] = None
        self.filterbank: Optional[LogMelFilterbank] = None
        self.target: Optional[audio.Target] = None
        self.num_labels = 0
        self.id2label: dict[int, str] = {}
        self.default_function = "softmax"

    # ---- loading ---------------------------------------------------------------------------

    def load(self) -> bool:
        source = resolve_model_source(self.model_dir)
        try:
            model = ASTForAudioClassification.from_pretrained(source, attn_implementation="sdpa")
        except OSError as exc:
            raise ModelLoadError(
                f"could not load an AST model from '{self.model_dir}': it is not a local directory holding "
                f"config.json and weights, and fetching it as a hub id failed ({exc}). Point --model_dir "
                "(or MODEL_DIR) at a local directory, e.g. one written by save_pretrained."
            ) from exc
        if model.config.model_type != AST_MODEL_TYPE:
            raise ModelLoadError(f"'{self.model_dir}' holds a {model.config.model_type} model, not AST")
        self.filterbank = LogMelFilterbank.from_extractor(load_feature_extractor(source, model.config))
        self.target = audio.Target(self.filterbank.sampling_rate, self.filterbank.max_samples, self.max_audio_seconds)
        self.num_labels = model.config.num_labels
        self.id2label = {int(k): v for k, v in model.config.id2label.items()}
        self.default_function = self.requested_function or labels.default_function(
            model.config.problem_type, self.num_labels
        )
        self.default_top_k = min(self.default_top_k, self.num_labels)  # the pipeline clamps top_k too
        try:
            engine = build_engine(model.eval(), source, self.engine_options)
        except ExportError as exc:
            raise ModelLoadError(f"{exc}\nPass --backend torch (or BACKEND=torch) to serve without ONNX Runtime.") from exc
        engine(self.filterbank([np.zeros(self.filterbank.sampling_rate, dtype=np.float32)]))  # warm-up
        del model  # an ONNX Runtime engine has its own copy of the weights
        release_freed_memory()
        self.batcher = Batcher(engine, self.max_batch_size, self.max_batch_wait_ms / 1000)
        logger.info(
            "Loaded AST from %s: %d labels, %d mel bins x %d frames, default %s top-%d, %s",
            source, self.num_labels, self.filterbank.num_mel_bins, self.filterbank.max_length,
            self.default_function, self.default_top_k, self.engine_options,
        )
        self.ready = True
        return self.ready

    # ---- the request path ------------------------------------------------------------------

    def validate(self, payload: Any) -> Any:
        """kserve's check looks for V1/V2 dict keys; our preprocess has already validated."""
        return payload

    async def preprocess(self, payload: Union[dict, bytes, InferRequest], headers: Optional[dict] = None) -> Batch:
        request = protocol.parse(payload)
        if len(request.clips) > self.max_clips_per_request:
            raise ClientInputError(
                f"{len(request.clips)} clips in one request; this server takes at most {self.max_clips_per_request}"
            )
        top_k = labels.check_top_k(request.parameters.get("top_k", self.default_top_k), self.num_labels)
        function = labels.check_function(request.parameters.get("function_to_apply", self.default_function))
        waveforms = await asyncio.to_thread(self._decode, request.clips)
        features = await self.batcher.on_model_thread(self.filterbank, waveforms)
        return Batch(features=features, request=request, top_k=top_k, function=function)

    async def predict(self, payload: Batch, headers: Optional[dict] = None) -> Scores:
        logits = await self.batcher(payload.features)
        return Scores(scores=labels.scores(logits, payload.function), batch=payload)

    async def postprocess(self, result: Scores, headers: Optional[dict] = None, response_headers=None) -> Union[dict, InferResponse]:
        names, values = labels.top_k(result.scores, result.batch.top_k, self.id2label)
        return protocol.respond(result.batch.request, self.name, names, values.numpy())

    # ---- compute, off the event loop -------------------------------------------------------

    def _decode(self, clips: list[protocol.Clip]) -> list[np.ndarray]:
        return [
            audio.decode(clip, self.target) if isinstance(clip, bytes) else audio.from_waveform(*clip, self.target)
            for clip in clips
        ]

    def get_input_types(self) -> list[dict]:
        return protocol.INPUT_TYPES

    def get_output_types(self) -> list[dict]:
        return protocol.OUTPUT_TYPES


def resolve_model_source(model_dir: str) -> str:
    """A local directory (or the one model directory inside it), else the string as a hub id.

    KServe's storage initializer copies a bucket prefix into /mnt/models as is, so a model saved
    one level down (`gs://bucket/models/` holding `ast/config.json`) is found too.
    """
    path = Path(model_dir)
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        nested = [p for p in path.iterdir() if (p / "config.json").is_file()]
        if len(nested) == 1:
            return str(nested[0])
        raise ModelLoadError(
            f"'{model_dir}' is a directory but holds no config.json (nor one subdirectory with one); "
            f"it contains: {sorted(p.name for p in path.iterdir())[:20]}"
        )
    if path.is_absolute() or model_dir.startswith(("./", "../", "~")) or os.sep * 2 in model_dir:
        raise ModelLoadError(f"model directory '{model_dir}' does not exist")
    return model_dir


def load_feature_extractor(source: str, config: Any) -> ASTFeatureExtractor:
    """The saved preprocessor config if there is one, else AST's defaults sized to the model."""
    try:
        extractor = ASTFeatureExtractor.from_pretrained(source)
    except OSError:
        extractor = ASTFeatureExtractor(num_mel_bins=config.num_mel_bins, max_length=config.max_length)
    if (extractor.num_mel_bins, extractor.max_length) != (config.num_mel_bins, config.max_length):
        raise ModelLoadError(
            f"feature extractor makes {extractor.num_mel_bins} mel bins x {extractor.max_length} frames "
            f"but the model expects {config.num_mel_bins} x {config.max_length}"
        )
    return extractor
