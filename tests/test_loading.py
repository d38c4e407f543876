"""Where the model comes from: a directory, KServe's /mnt/models layout, a hub id, or nothing usable."""

import os
import shutil
import socket
import subprocess
import sys

import pytest
import requests

from predictor.__main__ import main
from predictor.checkpoint import ModelLoadError
from predictor.config import Config
from predictor.model import ASTModel

from .conftest import REPO, encode, start_server, stop_server, tone


def run_server_expecting_failure(*args: str, env: dict | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    result = subprocess.run([*prefix, sys.executable, "-m", "predictor", "--http_port", "0", "--grpc_port", "0", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
    assert result.returncode == 1, result.stdout + result.stderr
    return result


def refused_at_once(capsys, *args: str) -> str:
    """The server's command line (its `main`, in this process: nothing is started) refused before
    anything loads: exit 2, with argparse's one line."""
    with pytest.raises(SystemExit) as exited:
        main(["--configure_logging", "false", *args])
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_a_port_taken_is_said_before_the_model_loads(tiny_model_dir, capsys):
    """Once found by kserve after loading (minutes, with an export), in 70 to 170 lines of tracebacks."""
    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = taken.getsockname()[1]
        for flag, other in (("--http_port", "--grpc_port"), ("--grpc_port", "--http_port")):
            stderr = refused_at_once(capsys, "--model_dir", str(tiny_model_dir), flag, str(port), other, "0")
            assert f"{flag} {port} cannot be listened on: Address already in use" in stderr, stderr


@pytest.mark.parametrize("args, env, message", [
    ((), {"AST_MODEL_DIR": ""}, "environment variable AST_MODEL_DIR='': must not be empty"),  # once the working directory
    ((), {"AST_MODEL_NAME": ""}, "environment variable AST_MODEL_NAME='': must not be empty"),
    (("--model_name", ""), {}, "argument --model_name: must not be empty"),  # once kserve's traceback after loading
    (("--http_port", "70000"), {}, "--http_port 70000 cannot be listened on: bind(): port must be 0-65535"),
])
def test_an_empty_name_or_an_impossible_port_is_refused_at_once(args, env, message, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    stderr = refused_at_once(capsys, *args)
    assert message in stderr, stderr


def test_missing_directory_names_the_path(tmp_path):
    """The same `ModelLoadError` the server logs before it exits 1 (see the hub id test below)."""
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=f"model directory '{missing}' does not exist"):
        ASTModel(Config(model_dir=str(missing))).load()


@pytest.mark.parametrize("uri", ["gs://bucket/models/ast", "s3://bucket/ast", "pvc://models/ast"])
def test_a_storage_uri_as_model_dir_is_named_as_one(uri):
    with pytest.raises(ModelLoadError, match=f"--model_dir '{uri}' is a {uri.split(':')[0]}:// URI, which this server "
                                             "does not fetch: set it as the InferenceService's storageUri"):
        ASTModel(Config(model_dir=uri)).load()


def test_directory_without_a_model_says_what_it_holds(tmp_path):
    (tmp_path / "README.txt").write_text("weights go here")
    with pytest.raises(ModelLoadError, match=r"holds no config.json .*README.txt"):
        ASTModel(Config(model_dir=str(tmp_path))).load()


def test_unreachable_hub_id_says_how_to_point_at_a_directory():
    # MODEL_DIR from the environment, and the hub offline as it is here (HF_HUB_OFFLINE makes it fail fast).
    result = run_server_expecting_failure(env={"AST_MODEL_DIR": "MIT/ast-finetuned-audioset-10-10-0.4593",
                                               "HF_HUB_OFFLINE": "1"})
    assert "could not load an AST model from 'MIT/ast-finetuned-audioset-10-10-0.4593'" in result.stderr
    assert "Point --model_dir (or AST_MODEL_DIR) at a local directory" in result.stderr


def test_a_directory_without_weights_says_so(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"holds config.json but no weights \(\*.safetensors or \*.bin\)"):
        ASTModel(Config(model_dir=str(tmp_path / "m"))).load()


def test_weights_the_servers_user_may_not_read_are_named_with_the_fix(tiny_model_dir, tmp_path):
    """A root-owned model.safetensors of mode 600 under a server running as uid 1000, as a copy from
    a root-owned volume leaves it. Run as root, the test drops the capability that lets root read
    any file, and gives the file to another user."""
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        os.chown(weights, 1000, 1000)
        prefix = ("setpriv", "--inh-caps=-all", "--bounding-set=-all", "--")
    weights.chmod(0o600 if prefix else 0o000)
    result = run_server_expecting_failure("--model_dir", str(tmp_path / "m"), prefix=prefix)
    assert f"{weights} exists, but this server's user (uid " in result.stderr, result.stderr
    assert "securityContext.fsGroup" in result.stderr and "hub id" not in result.stderr


def test_weights_cut_short_are_named_not_a_traceback(tiny_model_dir, tmp_path):
    """A copy that stopped midway: safetensors' own error names no file, and it was no OSError, so
    the server ended with a traceback. It exits 1 naming the directory and its weight files."""
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run_server_expecting_failure("--model_dir", str(tmp_path / "m"), "--backend", "torch")
    assert f"could not load the weights of '{tmp_path / 'm'}' (model.safetensors): SafetensorError" in result.stderr, \
        result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("change", [("\"hidden_size\": 32", "\"hidden_size\": \"32\""), ("{", "{{")],
                         ids=["a-number-as-a-string", "not-json"])
def test_a_config_json_transformers_cannot_read_is_named_as_the_directory_s(tiny_model_dir, tmp_path, change):
    """Not "not a local directory ... fetching it as a hub id failed": the directory is there, and
    its config.json is what to fix."""
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    assert change[0] in config.read_text()
    config.write_text(config.read_text().replace(*change, 1))
    with pytest.raises(ModelLoadError, match=f"^{config} is not a model config transformers can read: "):
        ASTModel(Config(model_dir=str(tmp_path / "m"))).load()


def test_storage_initializer_layout_one_level_down(tiny_model_dir, tmp_path):
    """gs://bucket/models/ copied to /mnt/models with the model in models/ast/: found and served."""
    mount = tmp_path / "mnt-models"
    shutil.copytree(tiny_model_dir, mount / "ast")
    server = start_server(mount, tmp_path / "server.log", extra_args=("--top_k", "2"), model_name="birds")
    try:
        body = encode(tone(440, 1.0, 16000), 16000, "WAV", "PCM_16")
        response = requests.post(server.predict_url, data=body)
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"][0]) == 2
    finally:
        stop_server(server)


def test_without_preprocessor_config_features_follow_the_model(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    (tmp_path / "m" / "preprocessor_config.json").unlink()
    model = ASTModel(Config(model_dir=str(tmp_path / "m"), backend="torch"))  # the features are under test
    assert model.load() and model.ready
    assert (model.filterbank.num_mel_bins, model.filterbank.max_length) == (64, 1024)


def test_mismatched_preprocessor_config_is_refused(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    config = tmp_path / "m" / "preprocessor_config.json"
    config.write_text(config.read_text().replace('"num_mel_bins": 64', '"num_mel_bins": 128'))
    with pytest.raises(ModelLoadError, match="128 mel bins x 1024 frames but the model expects 64 x 1024"):
        ASTModel(Config(model_dir=str(tmp_path / "m"))).load()


def test_a_damaged_preprocessor_config_is_refused_not_replaced_by_defaults(tiny_model_dir, tmp_path):
    """Its mean, std and rate are the fine-tune's: AST's defaults in their place would serve wrong
    features without a word."""
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    config = tmp_path / "m" / "preprocessor_config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(ModelLoadError, match=f"{config} is not a feature extractor's config transformers can read"):
        ASTModel(Config(model_dir=str(tmp_path / "m"), backend="torch")).load()
