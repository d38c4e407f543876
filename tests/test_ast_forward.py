"""`predictor.engines.ast_forward`: the pruned last layer gives transformers' logits and pooled embedding."""

import pytest
import torch
from transformers import ASTConfig, ASTForAudioClassification

from predictor.engines.ast_forward import PooledOutputs
from tools.random_ast import TINY, TINY_FEATURES


@pytest.mark.parametrize("config", [
    {},
    {"qkv_bias": False, "hidden_act": "relu", "num_hidden_layers": 1},
    {"num_hidden_layers": 3, "num_attention_heads": 4},
])
def test_pooled_outputs_equal_the_transformers_model(config):
    torch.manual_seed(0)
    model = ASTForAudioClassification(ASTConfig(num_labels=7, **{**TINY, **TINY_FEATURES, **config})).eval()
    features = torch.randn(3, model.config.max_length, model.config.num_mel_bins)
    with torch.inference_mode():
        expected = model(input_values=features).logits
        pooled = model.audio_spectrogram_transformer(input_values=features).pooler_output
        for rows in (slice(None), slice(1, 2)):
            logits, embedding = PooledOutputs(model)(features[rows])
            torch.testing.assert_close(logits, expected[rows], atol=1e-5, rtol=0)
            torch.testing.assert_close(embedding, pooled[rows], atol=1e-5, rtol=0)
