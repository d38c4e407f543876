"""V1 and V2 (Open Inference Protocol) requests ↔ clips and parameters; results → responses.

Nothing numeric happens here. `requests.parse` turns whatever a client sent (a V1 JSON body, a raw
audio body, a V2 request from REST JSON, REST binary data or gRPC) into an `AudioRequest`;
`responses.respond` turns labels, scores and segments back into the shape that client expects;
`kserve` holds the DataPlane and ModelServer subclasses: every kserve workaround in one place.
"""

from dataclasses import dataclass, field
from typing import Any, Optional

from kserve.protocol.infer_type import InferRequest

from ..audio import Clip
from ..names import (AUDIO_INPUT, EMBEDDING_OUTPUT, EXPLANATION_OUTPUT, LABEL_OUTPUT, SCORE_OUTPUT,
                     SEGMENT_EMBEDDING_OUTPUT, SEGMENT_END_OUTPUT, SEGMENT_LABEL_OUTPUT, SEGMENT_SCORE_OUTPUT,
                     SEGMENT_START_OUTPUT, WAVEFORM_INPUT)
SEGMENT_OUTPUTS = (SEGMENT_START_OUTPUT, SEGMENT_END_OUTPUT, SEGMENT_LABEL_OUTPUT, SEGMENT_SCORE_OUTPUT,
                   SEGMENT_EMBEDDING_OUTPUT)
EMBEDDING_OUTPUTS = (EMBEDDING_OUTPUT, SEGMENT_EMBEDDING_OUTPUT)
MODEL_PARAMETERS = ("top_k", "function_to_apply", "hop_seconds", "aggregate", "return_segments", "return_embedding",
                    "explain", "explain_method", "explain_format")

INPUT_TYPES = [
    {"name": AUDIO_INPUT, "datatype": "BYTES", "shape": [-1]},
    {"name": WAVEFORM_INPUT, "datatype": "FP32", "shape": [-1, -1]},
]
OUTPUT_TYPES = [
    {"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1, -1]},
    {"name": SCORE_OUTPUT, "datatype": "FP32", "shape": [-1, -1]},
    # Only with the request parameter return_segments: true (or when one of them is requested).
    {"name": SEGMENT_START_OUTPUT, "datatype": "FP32", "shape": [-1, -1], "optional": True},
    {"name": SEGMENT_END_OUTPUT, "datatype": "FP32", "shape": [-1, -1], "optional": True},
    {"name": SEGMENT_LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1, -1, -1], "optional": True},
    {"name": SEGMENT_SCORE_OUTPUT, "datatype": "FP32", "shape": [-1, -1, -1], "optional": True},
    # Only with return_embedding: true (or when one of them is requested): the pooled embedding the
    # classifier reads, per clip (the mean over its windows) and, with segments, per window.
    {"name": EMBEDDING_OUTPUT, "datatype": "FP32", "shape": [-1, -1], "optional": True},
    {"name": SEGMENT_EMBEDDING_OUTPUT, "datatype": "FP32", "shape": [-1, -1, -1], "optional": True},
    # Only with explain: true (or when requested): for each clip's top-k labels, the explanation as
    # JSON text (label, score, method, times, bands_hz, relevance and, with explain_format png, png).
    {"name": EXPLANATION_OUTPUT, "datatype": "BYTES", "shape": [-1, -1], "optional": True},
]


@dataclass
class AudioRequest:
    """What the model needs from a request, whichever protocol carried it."""

    clips: list[Clip]
    parameters: dict[str, Any] = field(default_factory=dict)
    v2: Optional[InferRequest] = None  # None: answer in V1's shape
