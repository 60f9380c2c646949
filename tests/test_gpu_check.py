"""`scripts/gpu_check.sh` on a machine without CUDA: it says so and exits 0 without doing anything heavy."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the script runs everything (minutes)")
def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device here" in done.stdout and "Exiting 0" in done.stdout
    assert not (tmp_path / "out").exists()  # nothing written, nothing installed, nothing run


def test_bench_cases_take_a_device():
    """The GPU rows' code path (``--device``) builds every case on the given device (here the CPU)."""
    from benchmarks import inference, loss, postprocess, train
    from benchmarks.runner import CUDA_CASES, SIZES, _synced

    tiny = SIZES["tiny"]
    assert set(CUDA_CASES) == {"loss", "postprocess", "train", "inference"} and "gpu" in SIZES
    for module, params in ((loss, tiny["loss"]), (postprocess, tiny["postprocess"]), (train, tiny["train_r18"]),
                           (inference, tiny["inference_r18"])):
        state = module.setup(**params, device="cpu")
        fns = _synced(module.contenders(state), "cpu")
        for fn in fns.values():
            fn()
