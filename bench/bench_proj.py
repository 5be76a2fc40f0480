"""Speed of a train_proj.py step with a Gemma-2-2B-shaped frozen L, against the plain HF path.

One step = g on the batch's [CLS] features + insert_social_tokens + frozen L forward +
input-gradient backward + loss + AdamW on g. Two ways to compute the loss, same data, same run:

  ours   common.token_nll: L's decoder, then only the positions that predict a scored token go
         through the 256k-vocabulary head, in chunks, gradient formed chunk by chunk
  plain  model(inputs_embeds=..., attention_mask=..., labels=...): Hugging Face's forward with
         the full [B, T, vocab] logits (soft-capped, upcast to float32) and its loss

MFU counts L's forward plus its input-gradient backward (train_proj.lm_flops: L frozen, no
weight gradients; the head on scored positions only) over the bf16 matmul peak measured here.
Both paths get the same FLOP count, so their MFU ratio is their speed ratio.

  CUDA_VISIBLE_DEVICES=0 python bench/bench_proj.py            # GPU, random 2B weights, bf16
  python bench/bench_proj.py --tiny --device cpu --steps 2      # smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import train_proj  # noqa: E402
import utils  # noqa: E402

GEMMA2_2B = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    final_logit_softcapping=30.0,
)
TINY = dict(
    vocab_size=4096,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    final_logit_softcapping=30.0,
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("bench_proj.py", description=__doc__)
    p.add_argument("--lengths", default="128,512", help="sequence lengths (social tokens in)")
    p.add_argument("--tokens", type=int, default=8192, help="positions per batch (B = tokens/T)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per path (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--word-every", type=int, default=6, help="one content word per N text tokens")
    p.add_argument("--enc-dim", type=int, default=768, help="width of V's [CLS] (ViT-B: 768)")
    p.add_argument(
        "--paths",
        default="plain,ours,ours+compile,ours+compile+flex",
        help="paths to time, in this order (+compile: train_proj --compile; "
        "+flex: --attn flex_attention)",
    )
    p.add_argument("--tiny", action="store_true", help="a tiny Gemma 2 (smoke test on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def build_lm(tiny: bool, device: torch.device, attn: str = "eager"):
    """A frozen Gemma 2 with random weights (2B shape unless tiny), bf16 on CUDA. Attention:
    eager (transformers gives Gemma 2 no SDPA: its attention logits are soft-capped) or
    flex_attention (a fused kernel that does the soft-capping)."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = Gemma2Config(**(TINY if tiny else GEMMA2_2B))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    return model.requires_grad_(False).eval()


def make_items(n_seq: int, length: int, vocab: int, every: int, seed: int):
    """n_seq tokenized utterances whose length with [SOC-G] and the [SOC-L] is exactly `length`:
    BOS, then text tokens with a content word ending every `every` tokens."""
    rng = np.random.default_rng(seed)
    n_words = (length - 2) // (every + 1)
    n_text = length - 2 - n_words  # BOS + [SOC-G] + text + locals = length
    items = []
    for _ in range(n_seq):
        ids = np.concatenate([[2], rng.integers(3, vocab, n_text)]).astype(np.int64)
        t_p = np.arange(1, n_words + 1, dtype=np.int64) * every
        item = common.TokenizedUtterance(ids, 1, t_p, np.zeros(n_words), "bench")
        assert common.social_length(item, "full") == length
        items.append(item)
    return items


def step_fn(path: str, L, g, opt, items, feats):
    """One training step of g through the frozen L with the loss of `path` (see the docstring)."""
    embed = L.get_input_embeddings()

    def step() -> None:
        with utils.autocast(feats.device):
            soc_l = g(feats)
            batch = common.insert_social_tokens(items, soc_l, embed, "full")
            if path == "plain":
                loss = L(
                    inputs_embeds=batch.inputs_embeds,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    labels=batch.labels,
                    use_cache=False,
                ).loss
            else:
                loss = common.token_nll(L, batch, compiled="compile" in path).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(step, device: torch.device, args) -> tuple[float, float]:
    """Median seconds per step and peak memory (GiB) of --steps steps after --warmup."""
    for _ in range(args.warmup):
        step()
    utils.sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        utils.sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), utils.peak_memory_gb(device)


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = utils.matmul_peak_tflops(device, dtype)
    L = build_lm(args.tiny, device)
    cfg = L.config
    lengths = [int(x) for x in args.lengths.split(",")]
    data = {}
    for length in lengths:
        n_seq = max(1, args.tokens // length)
        items = make_items(n_seq, length, cfg.vocab_size, args.word_every, seed=length)
        n_words = sum(len(it.t_p) for it in items)
        n_scored = sum(len(it.input_ids) - 1 for it in items)
        flops = train_proj.lm_flops(cfg, np.full(n_seq, length), n_scored)
        data[length] = (items, torch.randn(n_words, args.enc_dim, device=device), flops)
    rows, plain_ms = [], {}
    for path in args.paths.split(","):
        if path == "ours+compile":  # in place, so after the eager paths
            utils.compile_lm(L)
        if path == "ours+compile+flex":
            del L
            L = build_lm(args.tiny, device, "flex_attention")
            utils.compile_lm(L)
        for length in lengths:
            items, feats, flops = data[length]
            torch.manual_seed(0)
            g = common.Projector(args.enc_dim, cfg.hidden_size).to(device)
            opt = torch.optim.AdamW(g.parameters(), lr=1e-4, fused=device.type == "cuda")
            try:
                sec, mem = time_steps(step_fn(path, L, g, opt, items, feats), device, args)
            except Exception as e:  # an OOM or a compile failure costs one row, not the run
                print(f"{path} T={length}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                sec, mem = float("nan"), float("nan")
            del g, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if path == "plain":
                plain_ms[length] = 1e3 * sec
            rows.append(
                {
                    "path": path,
                    "seq_len": length,
                    "batch": len(items),
                    "tokens_per_s": len(items) * length / sec,
                    "tflops": flops / sec / 1e12,
                    "mfu": flops / sec / (peak * 1e12),
                    "peak_mem_gib": mem,
                    "step_ms": 1e3 * sec,
                    "vs_plain": plain_ms.get(length, float("nan")) / (1e3 * sec),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {
        "device": name,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "lm": "tiny Gemma 2" if args.tiny else "Gemma-2-2B shape, random weights",
        "matmul_peak_tflops": peak,
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(f"\n{name}, torch {torch.__version__}, measured {dtype} matmul peak {peak:.1f} TFLOP/s")
    print("| path | T | B | tokens/s | TFLOP/s | MFU | peak mem GiB | step ms | vs plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['path']} | {r['seq_len']} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
            f"{r['tflops']:.0f} | {r['mfu']:.1%} | {r['peak_mem_gib']:.1f} | "
            f"{r['step_ms']:.0f} | {r['vs_plain']:.2f}x |"
        )


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
