"""`--precision auto`: bf16 where the hardware multiplies it natively, fp32 elsewhere, one rule on every device."""

import pytest
import torch

from predictor import precision
from predictor.cpu import cpu_flags, multiplies_bf16

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags, native", [
    ({"avx2", "fma"}, False),  # AVX2-only EPYC
    ({"avx2", "avx512f", "avx512_vnni"}, False),  # AVX-512 without BF16
    ({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}, True),  # Zen 4, Cooper Lake
    ({"avx2", "avx512f", "amx_bf16", "amx_int8", "amx_tile"}, True),  # Sapphire Rapids
])
def test_native_bf16_is_avx512_bf16_or_amx(flags, native):
    assert multiplies_bf16(flags) is native


@pytest.mark.parametrize("capability, native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((8, 9), True),
                                                ((9, 0), True), ((10, 0), True)])  # V100, T4, A100, L4, H100/H200, B200
def test_gpus_multiply_bf16_natively_from_ampere_on(capability, native):
    assert precision.gpu_multiplies_bf16(capability) is native


def test_auto_on_this_cpu_follows_its_flags_and_the_engine():
    native = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    for backend in ("auto", "torch", "openvino"):
        assert precision.resolve("auto", CPU, backend) == ("bf16" if native else "fp32")
    assert precision.resolve("auto", CPU, "onnxruntime") == "fp32"  # ONNX Runtime runs fp32 or int8
    for named in ("fp32", "bf16", "int8"):
        assert precision.resolve(named, CPU, "auto") == named


@pytest.mark.parametrize("name, device, backend, message", [
    ("fp16", CPU, "auto", "--precision fp16 runs on a GPU only"),
    ("bf16", CPU, "onnxruntime", "--precision bf16 needs --backend openvino, torch or auto"),
    ("int8", torch.device("cuda", 0), "torch", "--precision int8 runs on the CPU engines only"),
])
def test_a_precision_the_device_or_engine_does_not_run_is_refused(name, device, backend, message):
    with pytest.raises(precision.PrecisionError, match=message):
        precision.resolve(name, device, backend)
