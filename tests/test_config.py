"""Configuration from flags and environment variables, as an InferenceService would set them."""

import argparse
from pathlib import Path

import pytest
import torch

from predictor.__main__ import build_parser, main
from predictor.config import Config



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
        (["--top_k", "0"], "argument --top_k: must be positive, got 0"),
        (["--top_k", "five"], "argument --top_k: invalid int value: 'five'"),
        (["--max_request_mb", "2048"], "argument --max_request_mb: must be positive and under 2048 (gRPC's largest "
                                       "message: 2 GiB), got 2048"),
        (["--calibration_dir", "/no/such/clips"], "argument --calibration_dir: /no/such/clips is not a directory"),
        (["--precision", "bf16", "--backend", "onnxruntime"], "--precision bf16 needs --backend openvino, torch or auto"),
        (["--workers", "2"], "--workers must be 1"),
        (["--max_batch_wait_ms", "inf"], "argument --max_batch_wait_ms: must be zero or more, got inf"),
        (["--device", "gpu"], "argument --device: invalid device_name value: 'gpu'"),
        (["--device", "cpu", "--precision", "fp16"], "--precision fp16 runs on a GPU only"),
        (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
        (["--device", "cuda:0", "--backend", "openvino"], "--backend openvino runs on the CPU; on a GPU (--device cuda:0) "
                                                          "the engine is torch"),
    ],
)
def test_a_bad_flag_is_named_at_start(flags, message, capsys):
    assert exit_code(flags) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here: make gpu-check covers it")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_gpu_that_torch_does_not_see_is_refused_at_start(device, capsys):
    assert exit_code(["--device", device]) == 2
    assert f"--device {device}: torch sees no GPU (torch {torch.__version__}" in capsys.readouterr().err


def exit_code(argv: list[str]) -> int:
    """`python -m predictor argv`'s entry point, in this process: every error here comes from
    parsing, before anything is loaded."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    return stopped.value.code


def configured(argv: list[str], environ: dict) -> tuple[argparse.Namespace, Config]:
    """What the server would run with: parsed as `python -m predictor` parses (the environment path
    end to end is the session server's, whose limits come from AST_ variables: see conftest)."""
    arguments = build_parser(environ).parse_args(argv)
    return arguments, Config.from_arguments(arguments)


def test_only_prefixed_environment_variables_configure_the_server():
    """A Service named "http" puts HTTP_PORT=tcp://... into every pod, and a cluster may set BACKEND,
    THREADS or TOP_K for reasons of its own: without the AST_ prefix, the server does not read them."""
    arguments, config = configured([], {
        "HTTP_PORT": "tcp://10.0.0.1:80", "GRPC_PORT": "tcp://10.0.0.2:81", "BACKEND": "tensorrt", "THREADS": "many",
        "TOP_K": "five", "MAX_BATCH_SIZE": "0", "MODEL_DIR": "/nowhere", "MODEL_NAME": "other"})
    assert config == Config() and (arguments.http_port, arguments.grpc_port) == (8080, 8081)


def test_flags_win_over_the_environment():
    _, config = configured(["--top_k", "2"], {"AST_TOP_K": "7", "AST_FUNCTION_TO_APPLY": "none",
                                              "AST_MODEL_NAME": "birds", "AST_ONNX_CACHE_DIR": "/cache"})
    assert config == Config(top_k=2, function_to_apply="none", model_name="birds", onnx_cache_dir=Path("/cache"))


def test_an_empty_path_from_the_environment_is_none():
    """A manifest's `value: ""` leaves the default (the cache under $XDG_CACHE_HOME, synthetic
    calibration clips), not the working directory."""
    _, config = configured([], {"AST_ONNX_CACHE_DIR": "", "AST_CALIBRATION_DIR": ""})
    assert config.onnx_cache_dir is None and config.calibration_dir is None
