"""API-schema tests (schemathesis) against the running server's own /openapi.json: whatever KServe's
schema allows (positive cases) or breaks (negative cases), with the model's real name in the path,
the server never answers with a 5xx (schemathesis' `not_a_server_error` check).

schemathesis runs as its CLI (`python -m schemathesis.cli run`), in the examples, coverage and fuzzing
phases, from a fixed seed with no example database, so every run sends the same requests; a failure
prints schemathesis' report with a curl command per failing case. (Its pytest plugin cannot load a
schema from a fixture under pytest 9.2: it sets `Function._nodeid`, which pytest 9.2 no longer has.)

Left out, each checked against this server (`test_the_operations_left_out_answer_as_described`):
- GET /v2/models/{model_name}/versions/{model_version}/ready, and any value of the `model_version` query
  parameter of /v2/models/{model_name}, .../ready and .../infer: kserve answers 501 "Model versioning not
  supported yet" by design. The parameter is pinned to the empty value, which kserve reads as absent.
Everything else is tested: /, /metrics, /v1/models, /v1/models/{model_name}, /v1/models/{model_name}:predict,
/v1/models/{model_name}:explain, /v2, /v2/health/live, /v2/health/ready, /v2/models, /v2/models/{model_name},
/v2/models/{model_name}/ready, /v2/models/{model_name}/infer, /v2/repository/index (ours: kserve has its
handler, not its route), /v2/repository/models/{model_name}/load and .../unload (a server of one model
refuses to unload it: `protocol.kserve.OneModel`). KServe's schema gives :predict no request body (it reads the raw request), so
`test_v1_predict_with_the_documented_body` adds the V1 body the README documents and runs :predict again.

Bounded for `make test`: SCHEMATHESIS_MAX_EXAMPLES (default 25) examples per operation in the fuzzing
phase (the coverage phase adds its own boundary cases, ~270 requests in all, a few seconds). Heavier:
SCHEMATHESIS_MAX_EXAMPLES=1000 (`make fuzz-api`); another seed: SCHEMATHESIS_SEED.
"""

import base64
import json
import os
import subprocess
import sys

import pytest
import requests

from tools.fuzz_decoder import small_wav

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25"))
SEED = int(os.environ.get("SCHEMATHESIS_SEED", "20261126"))
LEFT_OUT = ["/v2/models/{model_name}/versions/{model_version}/ready"]
PREDICT = "/v1/models/{model_name}:predict"
CONFIG = f"""\
seed = {SEED}
[generation]
max-examples = {MAX_EXAMPLES}
database = "none"
mode = "all"
[parameters]
"model_name" = "ast"      # the model's real name: else nearly every case is a 404
"model_version" = ""      # kserve's 501 for any version by design; empty is read as absent
"""


def schemathesis_run(tmp_path, location: str, *args: str) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run", location,
               "--checks", "not_a_server_error", "--phases", "examples,coverage,fuzzing", "--workers", "1",
               "--request-timeout", "120", *args]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    report = result.stdout[-30000:] + result.stderr[-5000:]
    assert result.returncode == 0, f"schemathesis found server errors (or could not run):\n{report}"
    assert " passed" in result.stdout and "Tested:" in result.stdout, report


@pytest.mark.timeout(900)
def test_no_request_the_schema_describes_gets_a_5xx(server, tmp_path):
    left_out = [arg for path in LEFT_OUT for arg in ("--exclude-path", path)]
    schemathesis_run(tmp_path, f"{server.url}/openapi.json", *left_out)


def documented_v1_body() -> dict:
    """The V1 request body of the README (instances of base64 audio files; the model's parameters)."""
    return {
        "type": "object",
        "required": ["instances"],
        "additionalProperties": False,
        "properties": {
            "instances": {"type": "array", "minItems": 1, "maxItems": 6, "items": {
                "type": "object", "required": ["b64"], "additionalProperties": False,
                "properties": {"b64": {"type": "string", "contentEncoding": "base64",
                                       "examples": [base64.b64encode(small_wav(0.5)).decode()]}}}},
            "parameters": {"type": "object", "additionalProperties": False, "properties": {
                "top_k": {"type": "integer", "minimum": 1, "maximum": 10},
                "function_to_apply": {"enum": ["sigmoid", "softmax", "none"]},
                "hop_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 10.24},
                "aggregate": {"enum": ["max", "mean"]},
                "return_segments": {"type": "boolean"}}},
        },
    }


@pytest.mark.timeout(900)
def test_v1_predict_with_the_documented_body(server, tmp_path):
    """The server's own schema, :predict given the V1 JSON body and the raw audio body it takes."""
    document = requests.get(f"{server.url}/openapi.json", timeout=30).json()
    document["paths"][PREDICT]["post"]["requestBody"] = {"required": True, "content": {
        "application/json": {"schema": documented_v1_body()},
        "audio/wav": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    }}
    schema = tmp_path / "openapi-with-v1-body.json"
    schema.write_text(json.dumps(document))
    schemathesis_run(tmp_path, str(schema), "--url", server.url, "--include-path", PREDICT)


def test_the_operations_left_out_answer_as_described(server):
    """The reasons in the module's docstring, on the live server."""
    assert requests.get(f"{server.url}/v2/models/ast/versions/1/ready", timeout=30).status_code == 501
    assert requests.get(f"{server.url}/v2/models/ast?model_version=1", timeout=30).status_code == 501
    assert requests.get(f"{server.url}/v2/models/ast?model_version=", timeout=30).status_code == 200
    assert requests.get(f"{server.url}/v2/models/ast/ready", timeout=30).status_code == 200


@pytest.mark.parametrize("body, headers", [
    (b"", {}), (b'{"instances":[{"b64":"!!"}]}', {"content-type": "application/json"})], ids=["no-body", "bad-base64"])
def test_explain_refuses_what_predict_refuses_with_a_400(server, body, headers):
    """:explain goes through the model's preprocess as :predict does (its refusal was once a 500)."""
    for url in (server.predict_url, f"{server.url}/v1/models/ast:explain"):
        response = requests.post(url, data=body, headers=headers, timeout=60)
        assert response.status_code == 400 and response.json()["error"], response.text
