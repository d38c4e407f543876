"""Labels, scores, embeddings, segments and explanations → the V1 or V2 answer the request's protocol expects.

kserve 0.21's `InferResponse.to_grpc` fails on numpy outputs when raw outputs are due, so gRPC
outputs are always serialised to raw bytes here, before kserve sees them.
"""

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import orjson
from kserve.protocol.infer_type import InferOutput, InferResponse

from ..errors import ClientInputError
from . import (EMBEDDING_OUTPUT, EXPLANATION_OUTPUT, LABEL_OUTPUT, OUTPUT_TYPES, SCORE_OUTPUT, SEGMENT_EMBEDDING_OUTPUT,
               SEGMENT_END_OUTPUT, SEGMENT_LABEL_OUTPUT, SEGMENT_SCORE_OUTPUT, SEGMENT_START_OUTPUT, AudioRequest)


@dataclass
class Ranked:
    """Top-k labels, best first, with their float32 scores."""

    labels: list[str]
    scores: np.ndarray


@dataclass
class Segments:
    """One clip's windows: seconds of the clip each covers, each window's own top-k, and (if asked
    for) each window's embedding, (windows, hidden)."""

    start: np.ndarray
    end: np.ndarray
    ranked: list[Ranked]
    embeddings: Optional[np.ndarray] = None


@dataclass
class ClipResult:
    ranked: Ranked
    embedding: Optional[np.ndarray] = None
    segments: Optional[Segments] = None
    explanations: Optional[list[dict]] = None  # one per label of `ranked`, in its order (`explanations`)


def respond(request: AudioRequest, model_name: str, results: list[ClipResult]) -> Union[dict, InferResponse]:
    """Each clip's labels and scores (and what else was asked for) → the request's protocol. V1
    explanations come as KServe's V1 explain answer lays them out: beside the predictions, one
    list per instance; V2 carries each label's as JSON text in a BYTES output [N, k]."""
    if request.v2 is None:
        answer: dict = {"predictions": [_v1_prediction(result) for result in results]}
        if results[0].explanations is not None:
            answer["explanations"] = [result.explanations for result in results]
        return answer
    outputs = [
        _output(LABEL_OUTPUT, np.array([r.ranked.labels for r in results], dtype=np.object_)),
        _output(SCORE_OUTPUT, np.stack([r.ranked.scores for r in results])),
    ]
    if results[0].embedding is not None:
        outputs.append(_output(EMBEDDING_OUTPUT, np.stack([r.embedding for r in results])))
    if results[0].segments is not None:
        outputs += _segment_outputs([r.segments for r in results])
    if results[0].explanations is not None:
        outputs.append(_output(EXPLANATION_OUTPUT, np.array(
            [[orjson.dumps(e).decode() for e in r.explanations] for r in results], dtype=np.object_)))
    if request.v2.request_outputs:
        wanted = {o.name for o in request.v2.request_outputs}
        outputs = [o for o in outputs if o.name in wanted]
    if request.v2.from_grpc:
        # tritonclient's as_numpy reads raw_output_contents only; raw bytes suit kserve's clients too.
        for output in outputs:
            output.set_data_from_numpy(output.data, binary_data=True)
    return InferResponse(
        response_id=request.v2.id or "",
        model_name=model_name,
        infer_outputs=outputs,
        use_binary_outputs=request.v2.use_binary_outputs,
        requested_outputs=request.v2.request_outputs,
    )


def _v1_prediction(result: ClipResult) -> Union[list, dict]:
    """Today's list of {label, score}; with an embedding or segments, {"labels": that list,
    "embedding": [...], "segments": [{start, end, labels, embedding}, ...]}."""
    labels = _v1_labels(result.ranked)
    if result.segments is None and result.embedding is None:
        return labels
    prediction: dict = {"labels": labels}
    if result.embedding is not None:
        prediction["embedding"] = result.embedding.tolist()
    if result.segments is not None:
        segments = result.segments
        prediction["segments"] = [
            {"start": float(start), "end": float(end), "labels": _v1_labels(ranked),
             **({"embedding": segments.embeddings[i].tolist()} if segments.embeddings is not None else {})}
            for i, (start, end, ranked) in enumerate(zip(segments.start, segments.end, segments.ranked))
        ]
    return prediction


def _v1_labels(ranked: Ranked) -> list[dict]:
    return [{"label": label, "score": float(score)} for label, score in zip(ranked.labels, ranked.scores)]


def check_padded_segments(windows: list[int], values: int, most: int) -> None:
    """A V2 answer's segments are tensors padded to the clip with most windows, so one long clip
    among many short ones multiplies the answer: 64 clips, one of them 177 windows, at every label
    would be 6M strings, whose encoding holds the event loop for seconds. Refused, before anything
    is decoded, past `most` values (what an unpadded answer within the request limits may hold);
    `values`: each segment's (top_k labels and scores, and its embedding if asked for)."""
    padded = len(windows) * max(windows) * values
    if padded > most:
        raise ClientInputError(
            f"V2 pads every clip's segments to the most windows of any clip: this request's segment outputs would "
            f"hold {len(windows)} clips x {max(windows)} segments x {values} values = {padded}, and this server "
            f"answers at most {most}, what --max_windows_per_request unpadded segments at every label hold: send the "
            "long clips in a request of their own, ask for fewer labels (top_k), or use V1, whose segments are not "
            "padded")


def _segment_outputs(segments: list[Segments]) -> list[InferOutput]:
    """[N, S] times, [N, S, k] labels and scores and [N, S, hidden] embeddings (if asked for), S the
    most windows of any clip; a shorter clip's missing windows are padded with start = end = -1,
    empty labels, and scores and embeddings of 0."""
    count, k = max(len(s.start) for s in segments), len(segments[0].ranked[0].labels)
    start = np.full((len(segments), count), -1, np.float32)
    end = np.full((len(segments), count), -1, np.float32)
    labels = np.full((len(segments), count, k), "", dtype=np.object_)
    scores = np.zeros((len(segments), count, k), np.float32)
    for i, clip in enumerate(segments):
        start[i, : len(clip.start)], end[i, : len(clip.end)] = clip.start, clip.end
        for j, ranked in enumerate(clip.ranked):
            labels[i, j], scores[i, j] = ranked.labels, ranked.scores
    outputs = [_output(SEGMENT_START_OUTPUT, start), _output(SEGMENT_END_OUTPUT, end),
               _output(SEGMENT_LABEL_OUTPUT, labels), _output(SEGMENT_SCORE_OUTPUT, scores)]
    if segments[0].embeddings is not None:
        embeddings = np.zeros((len(segments), count, segments[0].embeddings.shape[1]), np.float32)
        for i, clip in enumerate(segments):
            embeddings[i, : len(clip.embeddings)] = clip.embeddings
        outputs.append(_output(SEGMENT_EMBEDDING_OUTPUT, embeddings))
    return outputs


def _output(name: str, data: np.ndarray) -> InferOutput:
    datatype = next(o["datatype"] for o in OUTPUT_TYPES if o["name"] == name)
    return InferOutput(name=name, shape=list(data.shape), datatype=datatype, data=data)
