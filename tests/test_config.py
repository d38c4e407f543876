"""Configuration from flags and environment variables, as an InferenceService would set them."""

import pytest
import requests

from predictor.__main__ import main

from .conftest import assert_same_predictions, encode, expected, start_server, stop_server, tone


@pytest.mark.parametrize(
    "env, message",
    [
        ({"AST_TOP_K": "five"}, "environment variable AST_TOP_K='five'"),
        ({"AST_FUNCTION_TO_APPLY": "relu"}, "environment variable AST_FUNCTION_TO_APPLY='relu': choose from"),
        ({"AST_MAX_BATCH_SIZE": "0"}, "environment variable AST_MAX_BATCH_SIZE='0': must be positive"),
    ],
)
def test_a_bad_environment_variable_is_named_at_start(env, message, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert exit_code(["--help"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top_k", "0"], "argument --top_k: invalid int value: '0'"),
        (["--precision", "bf16", "--backend", "onnxruntime"], "--precision bf16 needs --backend openvino, torch or auto"),
        (["--workers", "2"], "--workers must be 1"),
        (["--max_batch_wait_ms", "inf"], "argument --max_batch_wait_ms: invalid float value: 'inf'"),
    ],
)
def test_a_bad_flag_is_named_at_start(flags, message, capsys):
    assert exit_code(flags) == 2
    assert message in capsys.readouterr().err


def exit_code(argv: list[str]) -> int:
    """`python -m predictor argv`'s entry point, in this process: every error here comes from
    parsing, before anything is loaded."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    return stopped.value.code


def test_only_prefixed_environment_variables_configure_the_server(tiny_model_dir, tmp_path):
    """A Service named "http" puts HTTP_PORT=tcp://... into every pod, and a cluster may set BACKEND,
    THREADS or TOP_K for reasons of its own: without the AST_ prefix, the server does not read them."""
    server = start_server(tiny_model_dir, tmp_path / "server.log", env={
        "HTTP_PORT": "tcp://10.0.0.1:80", "GRPC_PORT": "tcp://10.0.0.2:81", "BACKEND": "tensorrt", "THREADS": "many",
        "TOP_K": "five", "MAX_BATCH_SIZE": "0", "MODEL_DIR": "/nowhere"})
    try:
        assert server.is_ready()
    finally:
        stop_server(server)


def test_flags_win_over_the_environment(tiny_model_dir, tiny_pipeline, tmp_path):
    server = start_server(tiny_model_dir, tmp_path / "server.log", extra_args=("--top_k", "2"),
                          env={"AST_TOP_K": "7", "AST_FUNCTION_TO_APPLY": "none"})
    try:
        response = requests.post(server.predict_url, data=encode(tone(440, 1.0, 16000), 16000, "WAV", "FLOAT"))
        predictions = response.json()["predictions"][0]
    finally:
        stop_server(server)
    # --top_k 2 beat AST_TOP_K=7; AST_FUNCTION_TO_APPLY=none (raw logits) was taken from the environment.
    assert_same_predictions(predictions, expected(tiny_pipeline, tone(440, 1.0, 16000), 2, "none"))
