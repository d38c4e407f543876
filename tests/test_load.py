"""Short versions of `make load`'s mixed load and of `make soak`, on a real server of the tiny model.

The same functions as benchmarks/load.py and benchmarks/soak.py, with fewer users, seconds and
requests, held to the same criteria: every request gets its status and every 200 the answer the
same request got alone, the liveness probe never fails nor takes 1 s, and over the soak the
server's RSS stays within 5 % while its fds and threads do not grow; and a check that the answer
comparison catches a wrong answer. (The overload run needs the full-size model and minutes:
`make load` only.)
"""

import copy
from typing import Iterator

import pytest

from benchmarks.load import mixed_load
from benchmarks.loadgen import TOLERANCE, Limits, Server, different, fetch_references, mixed_kinds
from benchmarks.soak import soak
from predictor.cpu import multiplies_bf16
from tools.local_server import serving


pytestmark = pytest.mark.serial  # the liveness probe within 1 s, RSS within 5 % over the soak
LIMITS = Limits()


@pytest.fixture(scope="module")
def load_server(tiny_model_dir, tmp_path_factory) -> Iterator[Server]:
    with serving(tiny_model_dir, tmp_path_factory.mktemp("load") / "server.log", LIMITS.flags()) as server:
        yield server


def assert_passed(result: dict) -> None:
    failures = [f"{c['name']}: {c['detail']}" for c in result["criteria"] if not c["passed"]]
    assert not failures, "\n".join(failures)


def test_mixed_load(load_server):
    result = mixed_load(load_server, users=8, duration_s=5, limits=LIMITS)
    assert_passed(result)
    assert result["summary"]["by_status"].get("200", 0) > 0


def test_soak(load_server):
    result = soak(load_server, total=300, clients=4, warmup=100, sample_every=100, limits=LIMITS)
    assert_passed(result)
    assert result["summary"]["requests"] == 300 and len(result["readings"]) == 3


def test_a_wrong_answer_is_caught(load_server):
    """The check the load holds every 200 to is not vacuous: a real answer with one score off by
    2e-4, or two labels swapped, is reported; the same answer with a new V2 `id` is not."""
    kinds = [k for k in mixed_kinds(LIMITS) if k.name in ("v1-raw-wav", "v2-json-bytes")]
    references = fetch_references(load_server.url, kinds)
    v1, v2 = references["v1-raw-wav"], references["v2-json-bytes"]
    off = copy.deepcopy(v1)
    off["predictions"][0][0]["score"] += 2 * TOLERANCE
    swapped = copy.deepcopy(v1)
    swapped["predictions"][0][:2] = swapped["predictions"][0][1::-1]
    assert different(off, v1) and different(swapped, v1)
    assert different(copy.deepcopy(v1), v1) is None
    assert different({**v2, "id": "another"}, v2, ignore=("id",)) is None


def test_the_default_precision_is_the_one_auto_chooses_here(load_server):
    """This server runs with default flags: bf16 where this CPU multiplies it natively, else fp32,
    said at start and in ast_engine_info."""
    chosen = "bf16" if multiplies_bf16() else "fp32"
    assert f"Precision: {chosen} (--precision auto: " in load_server.log.read_text()
    assert load_server.precision == chosen
