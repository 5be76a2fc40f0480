"""Fault tolerance of train_dino.py under torchrun: a rank that dies mid-run is restarted
(--max-restarts=1), the run resumes from its last checkpoint and ends with the weights of an
uninterrupted run. Two processes with a tiny ViT, gloo on the CPU (SOCIAL_TOKENS_TEST_DEVICE=cuda:
NCCL on two GPUs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import utils

REPO = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("SOCIAL_TOKENS_TEST_DEVICE", "cpu")
# test_dino's tiny ViT (imported from there it would cost this test timm's import time)
TINY = [
    "--device", DEVICE, "--depth", "2", "--embed-dim", "64", "--out-dim", "128",
    "--head-hidden", "128", "--bottleneck", "32", "--global-size", "56", "--local-size", "28",
    "--local-crops", "2", "--warmup-epochs", "0", "--log-every", "1", "--lr", "0.05",
    "--batch-size", "8", "--steps", "6", "--save-every", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """32 random training frames in prep.py's format."""
    path = tmp_path_factory.mktemp("restart_data")
    np.save(path / "frames.npy", np.random.default_rng(0).integers(0, 256, (32, 56, 98, 3), "u1"))
    (path / "frames.json").write_text(json.dumps({"height": 56, "width": 98, "count": 32}))
    rows = [f"train,c{i // 4},{i},f{i}.jpg,{i % 4}" for i in range(32)]
    (path / "manifest.csv").write_text("\n".join([",".join(utils.MANIFEST_COLUMNS), *rows]))
    return path


def torchrun(data: Path, out: Path, fail_at: str | None = None) -> subprocess.Popen:
    """train_dino on 2 processes that torchrun restarts once (started, not waited for)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "--max-restarts=1", "--monitor-interval=0.1", str(REPO / "train_dino.py"), *TINY,
        "--data", str(data), "--out", str(out),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != utils.FAIL_AT} | {"OMP_NUM_THREADS": "1"}
    if fail_at:
        env[utils.FAIL_AT] = fail_at
    pipe = subprocess.PIPE
    kw = dict(env=env, text=True, stdout=pipe, stderr=subprocess.STDOUT, start_new_session=True)
    return subprocess.Popen(cmd, **kw)


def finish(run: subprocess.Popen) -> str:
    """Wait for a torchrun; its output. A hang is killed with all its workers."""
    try:
        log, _ = run.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        log, _ = run.communicate()
    assert run.returncode == 0, log[-4000:]
    return log


def test_killed_rank_restarts_and_ends_with_the_uninterrupted_weights(data, tmp_path):
    whole = torchrun(data, tmp_path / "whole")
    broken = torchrun(data, tmp_path / "broken", fail_at="1:3")  # side by side: half the time
    finish(whole)
    log = finish(broken)
    assert f"{utils.FAIL_AT}=1:3: rank 1 dies at step 3" in log  # rank 1 died before step 3
    assert "steps 0->6" in log and "steps 2->6" in log  # restarted from the step-2 checkpoint
    want = load_file(tmp_path / "whole" / "encoder.safetensors")
    got = load_file(tmp_path / "broken" / "encoder.safetensors")
    assert want.keys() == got.keys()
    a, b = (
        torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("whole", "broken")
    )
    assert a["step"] == b["step"] == 6
    pairs = [(got[k], want[k]) for k in want] + [(b["center"], a["center"])]
    diff = max((x.double() - y.double()).abs().max().item() for x, y in pairs)
    rel = max(((x.double() - y.double()).norm() / y.double().norm()).item() for x, y in pairs)
    print(f"restart on {DEVICE}: largest |difference| {diff:.3g}, relative {rel:.3g}")
    if DEVICE == "cpu":  # gloo sums two ranks in a fixed order: bit for bit
        assert diff == 0.0
    else:  # GPU kernels (attention's backward) accumulate in no fixed order: to rounding
        assert rel < 1e-3
    # the steps logged before the failure and again after the restart appear once
    lines = (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 7))
