"""Shared test fixtures: a small demo data set made by prep.py, small real videos, a tiny
random Gemma 3, and a g trained briefly by train_proj.py on the demo with a word-level tiny L
(`trained`: what evaluate's and analyze's end-to-end tests read)."""

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


def small_gemma(vocab: int = 50, softcap: float | None = None, attn: str = "eager", **extra):
    """tiny_gemma with a small vocabulary, 512 positions and optional final-logit soft-capping."""
    cap = dict(max_position_embeddings=512, final_logit_softcapping=softcap)
    return tiny_gemma(vocab, attn, **cap, **extra)


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


def word_level_lm_dir(data, out):
    """A tiny random Gemma 3 with a word-level tokenizer over the demo's words (BOS first,
    character offsets), saved as a local folder that --lm accepts."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    import utils

    texts = [u["text"] for u in utils.read_utterances(data)]
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)})
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    ).save_pretrained(out)
    ids = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    small_gemma(len(vocab), attn="sdpa", **ids).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def trained(demo_data, tmp_path_factory):
    """(data, projector dir, LM dir): g trained for a few steps by train_proj.py on the demo."""
    import train_proj
    import utils

    root = tmp_path_factory.mktemp("trained_g")
    lm = word_level_lm_dir(demo_data, root / "lm")
    torch.manual_seed(0)
    overrides = {"depth": 1, "embed_dim": 48, "num_heads": 2}
    V = utils.build_vit(img_size=112, layerscale_init=1.0, **overrides)
    utils.export_encoder(
        V, root / "enc", {"arch": utils.DEFAULT_ARCH, "img_size": 112, "overrides": overrides}
    )
    args = ["--data", str(demo_data), "--out", str(root / "proj"), "--lm", str(lm)]
    args += ["--encoder", str(root / "enc"), "--steps", "6", "--batch-size", "4"]
    train_proj.main([*args, "--device", "cpu", "--lr", "3e-3"])
    return demo_data, root / "proj", lm
