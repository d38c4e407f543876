"""AST's forward pass, computing only what the logits and the clip embedding read.

AST classifies the mean of two tokens of the last layer (CLS and distillation). In the last
encoder layer every token is still a key and a value for those two, but only those two need a
query, the attention output projection and the MLP. Computing the last layer for 2 rows instead
of all of them saves a share of the model's FLOPs (docs/performance.md has the measured gain) and
gives the same logits up to float summation order (`tests/test_ast_forward.py`).

transformers' `ASTForAudioClassification` has no such option (it returns every token's hidden
state), so `PooledOutputs` calls its modules in the same order with the same weights. It works
with whatever Linear an engine has put in place (`Int8Linear` included) and is what the ONNX
export traces, with two outputs: the logits, and the pooled embedding the classifier head reads
(transformers' `ASTModel(...).pooler_output`). Both come from the same pass, so the embedding costs
no compute; every engine hands them back as one row per window, the logits first (`options.split`),
so the queue and the channel between processes carry one tensor.
"""

import torch
from torch.nn import functional as F
from transformers import ASTForAudioClassification
from transformers.models.audio_spectrogram_transformer.modeling_audio_spectrogram_transformer import ASTLayer

POOLED_TOKENS = 2  # CLS and distillation, the tokens AST's pooler averages


def pooled_layer(layer: ASTLayer, hidden: torch.Tensor) -> torch.Tensor:
    """One encoder layer's output for the first `POOLED_TOKENS` tokens only: (batch, 2, hidden)."""
    batch, tokens, _ = hidden.shape
    attention = layer.attention
    normed = layer.layernorm_before(hidden)

    def heads(states: torch.Tensor, length: int) -> torch.Tensor:
        return states.view(batch, length, -1, attention.head_dim).transpose(1, 2)

    query = heads(attention.q_proj(normed[:, :POOLED_TOKENS]), POOLED_TOKENS)
    key = heads(attention.k_proj(normed), tokens)
    value = heads(attention.v_proj(normed), tokens)
    attended = F.scaled_dot_product_attention(query, key, value, scale=attention.scaling)
    pooled = attention.o_proj(attended.transpose(1, 2).reshape(batch, POOLED_TOKENS, -1)) + hidden[:, :POOLED_TOKENS]
    return pooled + layer.mlp(layer.layernorm_after(pooled))


class PooledOutputs(torch.nn.Module):
    """`(model(input_values).logits, pooler_output)`, with the last layer computed for the pooled tokens only."""

    def __init__(self, model: ASTForAudioClassification):
        super().__init__()
        self.model = model

    def forward(self, input_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.model.audio_spectrogram_transformer
        hidden = encoder.embeddings(input_values)
        for layer in encoder.layers[:-1]:
            hidden = layer(hidden)
        embedding = encoder.layernorm(pooled_layer(encoder.layers[-1], hidden)).mean(dim=1)
        return self.model.classifier(embedding), embedding
