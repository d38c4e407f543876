"""Many files: found in folders, sent N at a time, one JSON line each, resumable.

A results file (`--output`, JSON Lines) holds one object per file: `{"file", "answer", "request"}`
or `{"file", "error", "status", "request"}`; with `--embedding`, an answer's record also holds the
file's `"embedding"` as a plain list, the same whichever protocol carried it. `"request"` is what
was asked (the model, the protocol, the parameters, the size limit). A rerun with the same file
skips every file whose record is final for the same request: an answer, or a refusal of the file
itself (`final`). Every other failure (a busy or unreachable server, a timeout, a wrong model
name), and any record of another request (a refusal for a `--hop` past the window is the flag's,
and a rerun that adds `--embedding` wants embeddings), is tried again, its old record removed
first, so the file keeps one record per audio file however many runs it took. The records of
files a rerun does not send are kept as they are.
"""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, TextIO

from . import Client, Result
from .protocols import RequestFailed

FILE_REFUSALS = {400, 413, 415, 422}
# What a directory is searched for (files named on the command line are always sent).
AUDIO_SUFFIXES = {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".mp2", ".m4a", ".m4b", ".mp4", ".m4v",
                  ".mov", ".aac", ".webm", ".weba", ".mkv", ".mka", ".aif", ".aiff", ".aifc", ".caf", ".w64", ".rf64",
                  ".amr", ".3gp", ".3g2"}


class NotResults(Exception):
    """The --output file is not a results file this client wrote: it is left as it is."""


@dataclass
class Outcome:
    file: str
    result: Optional[Result] = None
    error: Optional[str] = None
    status: Optional[int] = None

    def line(self, request: Optional[dict] = None) -> dict:
        asked = {"request": request} if request is not None else {}
        if self.result is not None:
            embedding = self.result.prediction.embedding
            return {"file": self.file, "answer": self.result.answer, **({"embedding": embedding} if embedding else {}),
                    **asked}
        return {"file": self.file, "error": self.error, "status": self.status, **asked}


@dataclass
class Summary:
    classified: int = 0
    failed: int = 0
    skipped: int = 0
    refused_before: int = 0
    """Of those skipped, the files an earlier run's server refused: not answered, so still failures."""
    reencoded: int = 0
    started: float = field(default_factory=time.monotonic)

    def text(self) -> str:
        seconds = time.monotonic() - self.started
        parts = [f"{self.classified} classified", f"{self.failed} failed"]
        if self.skipped:
            refused = f", {self.refused_before} of them refused" if self.refused_before else ""
            parts.append(f"{self.skipped} skipped (already in the results{refused})")
        if self.reencoded:
            parts.append(f"{self.reencoded} re-encoded to fit the size limit")
        rate = f", {self.classified / seconds:.2f} files/s" if seconds > 0 and self.classified else ""
        return f"{', '.join(parts)} in {seconds:.1f} s{rate}"


def audio_files(paths: Iterable[str]) -> list[str]:
    """Named files, and directories searched recursively for audio files in name order; each once,
    as an absolute path with no '..' in it, so that a rerun from another directory finds the same
    names in its results."""
    def found() -> Iterator[str]:
        for name in paths:
            path = Path(os.path.abspath(name))
            if path.is_dir():
                yield from (str(p) for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
            else:
                yield str(path)

    return list(dict.fromkeys(found()))


def final(record: dict, request: dict) -> bool:
    """An answer, or a refusal of the file itself (not audio, too long, a format the server does not
    decode), to this very request: sending it again would get the same. A 404, 401 or 403 says more
    about the command line (a model name, a URL, credentials) than about the file, and so does a
    record of another request (its flags), so a corrected rerun tries again. A record without one
    was written by an earlier version of this client, which skipped it: so does this one."""
    return record.get("request", request) == request and ("answer" in record or record.get("status") in FILE_REFUSALS)


def settle_results(output: Path, request: dict, names: Iterable[str]) -> tuple[TextIO, dict[str, dict]]:
    """The results file rewritten to one record per file, and opened to append to: of the files
    `names` this run sends, the records to try again are dropped (a new one follows); a line cut
    short by a stopped run is dropped; every other file's last record is kept as it was. Returns
    the final records of `names` by file, which a rerun skips. A file with any other line in it is
    no results file of ours (`NotResults`), and is not touched."""
    sending = set(names)
    kept: dict[str, str] = {}
    records: dict[str, dict] = {}
    lines = output.read_text().splitlines() if output.exists() else []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                continue  # the last line, cut short when an earlier run was stopped
            record = None
        if not (isinstance(record, dict) and isinstance(record.get("file"), str)):
            raise NotResults(f"{output} is not a results file of this client (line {number} is no record of one "
                             "file): name a new file, or one an earlier run wrote")
        kept.pop(record["file"], None)
        records.pop(record["file"], None)
        if record["file"] not in sending:
            kept[record["file"]] = line
        elif final(record, request):
            kept[record["file"]], records[record["file"]] = line, record
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text("".join(line + "\n" for line in kept.values()))
    os.replace(temporary, output)
    return output.open("a"), records


def classify_one(client: Client, name: str, parameters: dict) -> Outcome:
    try:
        return Outcome(name, result=client.classify(name, **parameters))
    except RequestFailed as error:
        return Outcome(name, error=str(error), status=error.status)
    except OSError as error:
        return Outcome(name, error=f"cannot read {name}: {error.strerror or error}")
    except Exception as error:  # one file's surprise is that file's failure: the rest of a batch carries on
        return Outcome(name, error=f"{type(error).__name__}: {error}")


def run(client: Client, names: list[str], parameters: dict, concurrency: int, report: Callable[[Outcome], None],
        output: Optional[TextIO] = None, progress: bool = False, request: Optional[dict] = None) -> Summary:
    """Every file through `client`, `concurrency` requests in flight; `report` sees each outcome as
    it lands; `request` goes into each record written to `output`."""
    from tqdm import tqdm

    summary = Summary()
    pool = ThreadPoolExecutor(max(1, concurrency))
    try:
        with tqdm(total=len(names), unit="file", disable=not progress, leave=False) as bar:
            futures = [pool.submit(classify_one, client, name, parameters) for name in names]
            for future in as_completed(futures):
                outcome = future.result()
                if outcome.result is not None:
                    summary.classified += 1
                    summary.reencoded += outcome.result.reencoded_bytes is not None
                else:
                    summary.failed += 1
                if output is not None:
                    output.write(json.dumps(outcome.line(request)) + "\n")
                    output.flush()
                bar.update()
                report(outcome)
    finally:
        # On Ctrl-C the files not yet sent are dropped (a rerun picks them up), not waited for.
        pool.shutdown(wait=False, cancel_futures=True)
    return summary
