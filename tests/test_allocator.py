"""`predictor.allocator`: a forward pass reuses the last one's pages instead of faulting them in."""

import os
import platform
import subprocess
import sys

import pytest

FORWARD_FAULTS = """
import resource, sys, threading, torch
from transformers import ASTConfig, ASTForAudioClassification
from predictor.allocator import keep_freed_memory
from predictor.engines.torch_engine import TorchEngine

if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
engine = TorchEngine(ASTForAudioClassification(ASTConfig(num_hidden_layers=2)))  # full width and length
features = torch.randn(1, 1024, 128)


def passes():  # on a thread of their own, as the server runs them
    for _ in range(2):  # the first passes fault their pages in either way (the second still a few thousand
        engine(features)  # first-time allocations, more when other processes share the cores)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        engine(features)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)


worker = threading.Thread(target=passes)
worker.start()
worker.join()
"""


def forward_faults(mode: str) -> int:
    # glibc's defaults, whatever this shell sets: the comparison needs them.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    done = subprocess.run([sys.executable, "-c", FORWARD_FAULTS, mode], capture_output=True, text=True, check=True, env=env)
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_forward_passes_reuse_freed_memory():
    default, kept = forward_faults("default"), forward_faults("keep")
    assert default > 10_000  # glibc's defaults: activation pages faulted in again on every pass
    assert kept * 4 < default
