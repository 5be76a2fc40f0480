"""Throughput of evaluate.py's perplexity loop: utterances/s over all six conditions.

Times `evaluate.run_ppl` (social_vectors + insert_social_tokens + L's forward + the chunked NLL
of the scored tokens, per condition) on random utterances with content words, with an L of random
weights shaped like the embedded Gemma 3 270M or like Gemma-2-2B (the paper's L): only the times
mean anything. bf16 on CUDA. MFU = L's forward FLOPs (train_proj.lm_flops without backward, on
the inserted lengths) / time / the measured bf16 matmul peak. --compile times eager, then the
compiled L (its layers and the loss), and checks that both give the same NLL.

  python bench/bench_eval.py                                  # CPU, tiny shape
  python bench/bench_eval.py --shape gemma-2-2b --device cuda --utterances 2048 --batch-size 64 \
      --compile
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import date
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import evaluate as ev  # noqa: E402
import train_proj  # noqa: E402
import utils  # noqa: E402

SHAPES = {  # decoder shapes; the vocabulary matters: the output head dominates short sequences
    "tiny": dict(
        family="gemma3", vocab_size=1024, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        sliding_window=64,
    ),
    "gemma3-270m": dict(
        family="gemma3", vocab_size=262144, hidden_size=640, intermediate_size=2048,
        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        sliding_window=512,
    ),
    "gemma-2-2b": dict(
        family="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
    ),
}  # fmt: skip


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("bench_eval.py", description=__doc__)
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="L's shape (random)")
    p.add_argument("--utterances", type=int, default=128, help="utterances timed")
    p.add_argument("--length", type=int, default=32, help="mean text tokens per utterance")
    p.add_argument("--words", type=int, default=4, help="content words per utterance")
    p.add_argument("--batch-size", type=int, default=16, help="utterances per forward")
    p.add_argument("--clips", type=int, default=16, help="clips the utterances come from")
    p.add_argument("--cls-dim", type=int, default=384, help="width of V's [CLS] (ViT-S: 384)")
    p.add_argument("--conditions", default=",".join(ev.CONDITIONS), help="conditions timed")
    p.add_argument("--seed", type=int, default=0, help="seed of the random data and weights")
    p.add_argument("--compile", action="store_true", help="eager, then compiled: time and NLL")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        choices=("cpu", "cuda"),
        help="bf16 autocast on cuda",
    )
    return p


def random_lm(shape: str, device: torch.device) -> torch.nn.Module:
    """L with random weights, frozen, bf16 on CUDA."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    cfg = dict(SHAPES[shape])
    family = cfg.pop("family")
    config_cls, model_cls = {
        "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
        "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    }[family]
    # transformers runs Gemma 2 (soft-capped attention logits) only with eager attention
    attn = "eager" if family == "gemma2" else "sdpa"
    config = config_cls(**cfg, max_position_embeddings=8192, attn_implementation=attn)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        L = model_cls(config).to(dtype)
    return L.requires_grad_(False).eval()


def random_items(args: argparse.Namespace, vocab: int) -> tuple[list, dict]:
    """Utterances of random tokens (BOS first) with `--words` content words, and the frame index
    of their clips (one frame per second, 30 s each)."""
    rng = np.random.default_rng(args.seed)
    clips = [f"clip{k}" for k in range(args.clips)]
    times = np.arange(30, dtype=np.float64)
    clip_index = {c: (k * 30 + np.arange(30, dtype=np.int64), times) for k, c in enumerate(clips)}
    items = []
    for _ in range(args.utterances):
        n = max(args.words + 2, int(rng.poisson(args.length)))
        ids = np.concatenate([[2], rng.integers(3, vocab, n - 1)]).astype(np.int64)
        t_p = np.sort(rng.choice(np.arange(1, n), size=args.words, replace=False))
        word_t = np.sort(rng.uniform(0, 29, args.words))
        items.append(common.TokenizedUtterance(ids, 1, t_p, word_t, str(rng.choice(clips))))
    return items, clip_index


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    L = random_lm(args.shape, device)
    items, clip_index = random_items(args, L.config.vocab_size)
    g = common.Projector(args.cls_dim, L.config.hidden_size).to(device).eval()
    feats = torch.randn(30 * len(clip_index), args.cls_dim, device=device)  # v_j of every frame
    donors = ev.shuffle_donors(list(clip_index), args.seed)
    social = partial(common.social_vectors, g, feats, clip_index, "full", donors)
    conditions = [c for c in args.conditions.split(",") if c]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    lengths = {
        c: np.array([common.social_length(it, layout(c)) for it in items]) for c in conditions
    }
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # L's
    peak, nll = utils.matmul_peak_tflops(device, dtype), {}
    for mode in ("eager", "compiled") if args.compile else ("eager",):
        if mode == "compiled":
            utils.compile_lm(L)
        warm, compiled = items[: 2 * args.batch_size], mode == "compiled"  # kernels, autotuning
        ev.run_ppl(L, warm, ev.length_batches(warm, args.batch_size), conditions, social, device,
                   compiled)  # fmt: skip
        batches = ev.length_batches(items, args.batch_size)
        nll[mode], tok, seconds = ev.run_ppl(
            L, items, batches, conditions, social, device, compiled
        )
        flops = sum(
            train_proj.lm_flops(L.config, lengths[c], int(tok[c].sum()), backward=False)
            for c in conditions
        )
        n, c = len(items), len(conditions)
        print(
            f"{date.today()} | {name or device.type} | L {args.shape} (random weights) | {mode} | "
            f"batch {args.batch_size} | ~{args.length} tokens, {args.words} content words | "
            f"{c} conditions | {n / seconds:.1f} utterances/s | {n * c / seconds:.1f} forwards/s | "
            f"MFU {flops / seconds / (peak * 1e12):.1%} of {peak:.3g} TFLOP/s | "
            f"peak memory {utils.peak_memory_gb(device):.2f} GiB"
        )
    if "compiled" in nll:
        diff = max(np.abs(nll["compiled"][k] / nll["eager"][k] - 1).max() for k in conditions)
        print(f"compiled vs eager: largest relative difference of an utterance's NLL {diff:.2e}")


def layout(condition: str) -> str:  # where the social tokens of a condition sit
    return {"none": "none", "zero": "full", "shuffled": "full"}.get(condition, condition)


if __name__ == "__main__":
    main()
