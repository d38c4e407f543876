"""`predictor.engines.ast_forward`: the pruned last layer gives transformers' logits."""

import pytest
import torch
from transformers import ASTConfig, ASTForAudioClassification

from predictor.engines.ast_forward import PooledLogits
from tools.random_ast import TINY, TINY_FEATURES


@pytest.mark.parametrize("config", [
    {},
    {"qkv_bias": False, "hidden_act": "relu", "num_hidden_layers": 1},
    {"num_hidden_layers": 3, "num_attention_heads": 4},
])
def test_pooled_logits_equal_the_transformers_model(config):
    torch.manual_seed(0)
    model = ASTForAudioClassification(ASTConfig(num_labels=7, **{**TINY, **TINY_FEATURES, **config})).eval()
    features = torch.randn(3, model.config.max_length, model.config.num_mel_bins)
    with torch.inference_mode():
        expected = model(input_values=features).logits
        torch.testing.assert_close(PooledLogits(model)(features), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(PooledLogits(model)(features[1:2]), expected[1:2], atol=1e-5, rtol=0)
