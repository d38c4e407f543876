"""Parity at AST's real geometry: 768 wide, 12 layers, 128 mel bins x 1024 frames, 527 labels.

The one place the suite pays for a full-size forward pass (a few seconds each on 2 cores).
"""

import base64

import numpy as np
import pytest
import requests
from transformers import ASTConfig, pipeline

from .conftest import assert_same_predictions, encode, expected, save_random_ast, start_server, stop_server

RATE = 16000


@pytest.fixture(scope="module")
def full_size_dir(tmp_path_factory):
    directory = save_random_ast(tmp_path_factory.mktemp("ast-full"))
    config = ASTConfig.from_pretrained(directory)
    assert (config.hidden_size, config.num_hidden_layers, config.num_mel_bins, config.max_length,
            config.num_labels) == (768, 12, 128, 1024, 527)
    return directory


def test_full_size_model_matches_the_pipeline(full_size_dir, speech_16k, tmp_path):
    rng = np.random.default_rng(3)
    clip = np.concatenate([speech_16k, 0.05 * rng.standard_normal(RATE * 10 - len(speech_16k))]).astype(np.float32)
    server = start_server(full_size_dir, tmp_path / "server.log")
    try:
        body = {"instances": [{"b64": base64.b64encode(encode(clip, RATE, "WAV", "FLOAT")).decode()}],
                "parameters": {"top_k": 10}}
        response = requests.post(server.predict_url, json=body, timeout=120)
        assert response.status_code == 200, response.text
    finally:
        stop_server(server)
    # 527 labels and no function_to_apply: the server's default is sigmoid (AudioSet is multi-label).
    reference = expected(pipeline("audio-classification", model=str(full_size_dir)), clip, 10, "sigmoid")
    assert_same_predictions(response.json()["predictions"][0], reference)
