"""`make gpu-check` where torch sees no GPU (CI, and most of our machines): it says so and passes."""

import subprocess
import sys

import pytest
import torch

from .conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here: run make gpu-check itself")
def test_gpu_check_says_there_is_no_gpu_and_passes():
    done = subprocess.run([sys.executable, "-m", "tools.gpu_check"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"gpu-check: torch {torch.__version__} (" in done.stdout and "sees no GPU here; nothing to check" in done.stdout
