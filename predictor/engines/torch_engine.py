"""Eager PyTorch: the transformers modules with SDPA attention, in fp32, bf16, or int8 GEMMs."""

import torch
from transformers import ASTForAudioClassification

from .ast_forward import PooledOutputs


class TorchEngine:
    """The model on `device` (a CPU or a GPU); features come in and rows of logits and embedding
    (`options.split`) go out as float32 on the CPU."""

    def __init__(self, model: ASTForAudioClassification, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        self.outputs = PooledOutputs(model.to(device=device, dtype=dtype).eval())
        self.dtype, self.device = dtype, torch.device(device)
        if self.device.type == "cuda" and dtype == torch.float32:
            # fp32 means fp32, the pipeline's answers within 1e-4: torch lets cuDNN's convolutions
            # (AST's patch embedding) take TF32 on Ampere and later unless told otherwise. Through the
            # flags every torch has: from 2.9, setting the newer fp32_precision to "ieee" makes reads
            # of these raise (torch's own cudnn.flags() among them), while these keep both consistent.
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            # On the CPU, the call is the one it was before GPUs: even this changes which pages glibc's
            # default malloc hands back between passes (tests/test_allocator.py measured it).
            placed = features.to(self.dtype) if self.device.type == "cpu" else features.to(self.device, self.dtype)
            return torch.cat(self.outputs(placed), dim=1).float().cpu()


class Int8Linear(torch.nn.Module):
    """A Linear with int8 weights (one scale per output channel) and int8 activations (one scale
    per token, so rows never share a scale): y = (q(x) @ q(W)^T) * sx * sw + b."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight_t", torch.round(weight / scale[:, None]).to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scale)
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(weight.shape[0])
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        quantized = torch.round(rows / scale).to(torch.int8)
        if len(quantized) <= 16:  # _int_mm wants more than 16 rows; pad (rows stay independent)
            quantized = torch.nn.functional.pad(quantized, (0, 0, 0, 17 - len(quantized)))
        output = torch._int_mm(quantized, self.weight_t)[: len(rows)].float()
        output.mul_(scale)  # in place: each full-size temporary costs a pass over memory
        return torch.addcmul(self.bias, output, self.weight_scale, out=output).reshape(*x.shape[:-1], -1)


def quantize_linears(model: ASTForAudioClassification) -> ASTForAudioClassification:
    """Every encoder Linear whose sizes the int8 GEMM takes (multiples of 8) becomes an Int8Linear;
    the classifier head stays fp32, so the logits' last step is exact."""
    for module in model.audio_spectrogram_transformer.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child.in_features % 8 == 0 and child.out_features % 8 == 0:
                setattr(module, name, Int8Linear(child))
    return model
