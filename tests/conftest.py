"""Shared test fixtures: a small demo data set made by prep.py, small real videos, a tiny
random Gemma 3."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the stage files, common.py and utils.py live at the top

DEMO_ARGS = ["--demo", "8", "--height", "112", "--width", "196", "--seed", "0"]
GEMMA_VOCAB = 262144  # the real tokenizer's vocabulary
TINY_GEMMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    sliding_window=8,
)


def tiny_gemma(vocab_size: int = GEMMA_VOCAB, attn: str = "sdpa", seed: int = 0, **config):
    """A 2-layer random Gemma 3 of width 32 (the embedded model's class), frozen, in eval mode;
    `config` adds or overrides Gemma3TextConfig fields."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=vocab_size, attn_implementation=attn, **TINY_GEMMA | config)
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(cfg).requires_grad_(False).eval()


def frame_level(k: int) -> int:
    """Grey level of frame k of a `write_video` video (distinct for neighbouring frames)."""
    return (40 + 23 * k) % 216 + 20


def write_video(
    path: Path,
    times: list[float],
    size: tuple[int, int] = (96, 64),
    codec: str = "libx264",
    time_base: Fraction = Fraction(1, 1000),
) -> Path:
    """A real video (PyAV) whose k-th frame is shown at times[k] seconds and is grey at
    frame_level(k), with a white bar on its left edge (to see that letterboxing keeps it)."""
    import av

    w, h = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = stream.time_base = time_base  # keep exact pts
        for k, t in enumerate(times):
            img = np.full((h, w, 3), frame_level(k), dtype=np.uint8)
            img[:, :4] = 255
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = round(Fraction(t) / time_base), time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="session")
def make_video():
    """`write_video` for tests: make_video(path, times, size=(96, 64), codec="libx264")."""
    return write_video


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small demo set (8 clips, two in each transcript format, 112 x 196 canvas) written by
    `prep.py --demo`; the folder is what stages take as --data."""
    out = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, str(ROOT / "prep.py"), *DEMO_ARGS, "--out", str(out), "--workers", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return out
