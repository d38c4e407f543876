"""ast-classify FILE... : classify audio files (or folders of them) with a running server.

    ast-classify clip.wav                                     # V2 REST on localhost:8080, a table
    ast-classify --protocol grpc --url localhost:8081 clip.m4a --json
    ast-classify recordings/ --concurrency 4 --output results.jsonl   # resumable: rerun to finish
    ast-classify long.flac --hop 5 --segments                 # each window's labels too
    ast-classify clips/ --embedding --output embeddings.jsonl  # each file's embedding in its record
    ast-classify --url http://$INGRESS --host ast-audio.default.example.com clip.wav   # through an ingress

Exit status: 0 when every file was answered, 1 when any failed (each failure is reported, the
rest carry on; with --output, also one refused in an earlier run and skipped), 2 for a wrong
command line (an --output that cannot be written, or is no results file) or no audio files, 130
when stopped (Ctrl-C), 141 when what reads the output stops reading (`| head`).
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..names import MAX_REQUEST_MB, MODEL_NAME
from . import DEFAULT_URLS, Client
from .batch import AUDIO_SUFFIXES, NotResults, Outcome, audio_files, run, settle_results
from .protocols import PROTOCOLS, Prediction, RequestFailed

BAR_WIDTH = 30
BLOCKS = " ▏▎▍▌▋▊▉█"


def bar(score: float) -> str:
    """A score in [0, 1] as a bar of eighth blocks (raw logits are clamped)."""
    eighths = round(max(0.0, min(1.0, score)) * BAR_WIDTH * 8)
    return "█" * (eighths // 8) + (BLOCKS[eighths % 8] if eighths % 8 else "")


def table(name: str, prediction: Prediction) -> str:
    width = max((len(p["label"]) for p in prediction.labels), default=0)
    lines = [name] + [f"  {p['label']:<{width}}  {p['score']:7.4f}  {bar(p['score'])}" for p in prediction.labels]
    for segment in prediction.segments or []:
        best = ", ".join(f"{p['label']} {p['score']:.2f}" for p in segment["labels"][:3])
        lines.append(f"  {segment['start']:8.2f} - {segment['end']:8.2f} s  {best}")
    if prediction.embedding is not None:
        shown = ", ".join(f"{x:.4f}" for x in prediction.embedding[:4])
        lines.append(f"  embedding ({len(prediction.embedding)} numbers): [{shown}, ...]")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ast-classify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", metavar="FILE", help="audio files, or folders searched recursively")
    parser.add_argument("--url", help=f"http://host:port for v1/v2 (default {DEFAULT_URLS['v2']}), host:port for "
                                      f"grpc (default {DEFAULT_URLS['grpc']})")
    parser.add_argument("--model-name", default=MODEL_NAME, help=f"the model's name on the server (default: {MODEL_NAME})")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="v2",
                        help="v1 (raw body), v2 (REST, binary data) or grpc (default: v2)")
    parser.add_argument("--host", help="the Host header (REST) or authority (gRPC) an ingress routes by")
    parser.add_argument("--top-k", type=int, help="labels per file (default: the server's)")
    parser.add_argument("--function", choices=["sigmoid", "softmax", "none"], help="scores from logits "
                        "(default: the server's)")
    parser.add_argument("--hop", type=float, metavar="SECONDS", help="a long file's windows start this far apart "
                        "(default: the server's, one window)")
    parser.add_argument("--aggregate", choices=["max", "mean"], help="a long file's windows → its labels")
    parser.add_argument("--segments", action="store_true", help="each window's labels and times too")
    parser.add_argument("--embedding", action="store_true", help="each file's embedding too (the vector the "
                        "model's classifier reads): a line of the table, an \"embedding\" list in --json and "
                        "--output records")
    parser.add_argument("--json", action="store_true", help="one JSON object per file (the server's answer) "
                                                             "instead of a table")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default: 300)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight (default: 1)")
    parser.add_argument("--output", type=Path, help="write results to this JSON Lines file, one record per "
                                                    "file; a rerun asking the same (model, protocol, parameters, "
                                                    "size limit) skips files answered or refused for what they "
                                                    "are (400, 413, 415, 422) and tries the rest again")
    parser.add_argument("--max-request-mb", type=float, default=MAX_REQUEST_MB,
                        help="the server's body limit: larger files are re-encoded to 16 kHz mono FLAC first "
                             f"(default: {MAX_REQUEST_MB:g}, the server's default)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # retries after a 503 are warnings
    try:
        return classify(args)
    except (RequestFailed, NotResults, OSError, UnicodeDecodeError) as error:  # the command line's, not a file's
        if isinstance(error, BrokenPipeError):  # the reader of stdout has gone (`| head`): quietly, as a shell would
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        print(f"ast-classify: {error}", file=sys.stderr)
        return 2


def classify(args: argparse.Namespace) -> int:
    client = Client(args.url, args.protocol, args.model_name, args.timeout, args.host, args.max_request_mb)
    parameters = {"top_k": args.top_k, "function_to_apply": args.function, "hop_seconds": args.hop,
                  "aggregate": args.aggregate, "return_segments": args.segments, "return_embedding": args.embedding}
    names = audio_files(args.files)
    if not names:
        print(f"no audio files in {', '.join(args.files)} (looked for {', '.join(sorted(AUDIO_SUFFIXES))})",
              file=sys.stderr)
        return 2
    request = {"model": args.model_name, "protocol": args.protocol, "max_request_mb": args.max_request_mb,
               **{name: value for name, value in parameters.items() if value is not None and value is not False}}
    output, done = settle_results(args.output, request, names) if args.output else (None, {})
    todo = [name for name in names if name not in done]

    def report(outcome: Outcome) -> None:
        if outcome.result is None:
            print(f"{outcome.file}: {outcome.error}", file=sys.stderr)
            return
        if outcome.result.reencoded_bytes is not None:
            print(f"{outcome.file}: over the {args.max_request_mb:g} MB limit; sent as 16 kHz mono FLAC "
                  f"({outcome.result.reencoded_bytes / 2**20:.1f} MB), the samples the server would have classified",
                  file=sys.stderr)
        if args.output is None:
            print(json.dumps(outcome.line()) if args.json else table(outcome.file, outcome.result.prediction),
                  flush=True)

    try:
        summary = run(client, todo, parameters, args.concurrency, report, output,
                      progress=len(todo) > 1 and sys.stderr.isatty(), request=request)
    except KeyboardInterrupt:
        print("stopped: rerun with the same --output to carry on where this run stopped", file=sys.stderr)
        if output is not None:
            output.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # now: at a normal exit, the requests in flight would hold it until their --timeout
    if output is not None:
        output.close()
    summary.skipped = len(names) - len(todo)
    summary.refused_before = sum("answer" not in record for record in done.values())
    if len(names) > 1 or args.output:
        print(summary.text(), file=sys.stderr)
    return 1 if summary.failed or summary.refused_before else 0


if __name__ == "__main__":
    sys.exit(main())
