"""Names and defaults the server and its client share, importing nothing.

The client installs without the server's stack (torch, transformers, kserve, OpenVINO), yet must
agree with the server on the model's name, the ports, the body limit, the tensors' names and how a
busy server says when to come back: each is written here once and imported by both.
"""

import re
from typing import Optional

MODEL_NAME = "ast"
HTTP_PORT = 8080
GRPC_PORT = 8081
MAX_REQUEST_MB = 32.0
"""The server's --max_request_mb default; the client re-encodes larger files before sending them."""

AUDIO_INPUT = "audio"
WAVEFORM_INPUT = "waveform"
LABEL_OUTPUT = "label"
SCORE_OUTPUT = "score"
SEGMENT_START_OUTPUT = "segment_start"
SEGMENT_END_OUTPUT = "segment_end"
SEGMENT_LABEL_OUTPUT = "segment_label"
SEGMENT_SCORE_OUTPUT = "segment_score"
EMBEDDING_OUTPUT = "embedding"
SEGMENT_EMBEDDING_OUTPUT = "segment_embedding"
EXPLANATION_OUTPUT = "explanation"

_RETRY_AFTER = re.compile(r"\bretry_after_s=(\d+)\b")


def retry_after_token(seconds: int) -> str:
    """How a busy server's message states its retry time for programs: over gRPC there is no
    `Retry-After` header, and kserve's servicer sets no trailing metadata of ours."""
    return f"retry_after_s={seconds}"


def retry_after(message: str) -> Optional[int]:
    """The retry time a busy server's message states, if it is one."""
    found = _RETRY_AFTER.search(message)
    return int(found[1]) if found else None
