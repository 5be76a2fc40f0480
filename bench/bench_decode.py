"""Speed of decoding with social tokens (common.decode_social, greedy, spaCy tagging included):
new tokens/s on the held-out prompts of a trained run, `full` condition, for each batch size and
L's dtype. Needs run_all.sh's outputs (the data, g, its V) and the embedded Gemma.

  python bench/bench_decode.py --data data/demo --projector out/demo/proj --batch-size 1,16 \
      --lm-dtype float32,bfloat16
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import evaluate as ev  # noqa: E402
import utils  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("bench_decode.py", description=__doc__)
    p.add_argument("--data", type=Path, required=True, help="prep.py output")
    p.add_argument("--projector", type=Path, required=True, help="train_proj.py --out")
    p.add_argument("--split", default="test", help="held-out split of the prompts")
    p.add_argument("--prompts", type=int, default=16, help="prompts timed (the split's first)")
    p.add_argument("--batch-size", type=utils.comma_list, default=["1"], help="e.g. 1,16")
    p.add_argument("--lm-dtype", type=utils.comma_list, default=["float32"], help="e.g. float32")
    p.add_argument("--max-new-tokens", type=int, default=12, help="tokens per prompt at most")
    p.add_argument("--device", default=ev.DEVICE, help="cpu or cuda")
    return p


def main() -> None:
    args = get_args_parser().parse_args()
    device = torch.device(args.device)
    g, cfg = common.load_projector(args.projector, device)
    feats = utils.frame_features(cfg["encoder"], args.data, device)
    clip_index = utils.clip_frame_index(utils.read_manifest(args.data))
    utts = utils.read_utterances(args.data, args.split)
    turns = cfg["context_turns"] if cfg.get("task") == "next-utterance" else 0
    context = ev.earlier_turns(utts, turns)  # as evaluate reads the prompts
    prompts = [ev.prompt_of(u, 2, c) for u, c in zip(utts, context, strict=True)][: args.prompts]
    tagger = utils.PosTagger()
    rows = []
    for dtype in args.lm_dtype:
        L, tokenizer = utils.load_lm(
            cfg.get("lm", utils.EMBEDDED_LM), device, getattr(torch, dtype)
        )
        with torch.no_grad():
            social = ev.prompt_social(g, feats.to(device), clip_index, None, prompts, "full")
            social = [(s.to(L.dtype), t) for s, t in social]
            for bs in map(int, args.batch_size):
                kw = dict(
                    batch_size=bs,
                    max_new_tokens=args.max_new_tokens,
                    stop=(".", "\n"),
                    inject=cfg["inject"],
                )
                ev.run_generate(L, tokenizer, prompts[:bs], social[:bs], tagger, **kw)  # warm-up
                utils.sync(device)
                t0 = time.perf_counter()
                out = ev.run_generate(L, tokenizer, prompts, social, tagger, **kw)
                utils.sync(device)
                sec = time.perf_counter() - t0
                new = sum(
                    len(tokenizer(o["text"], add_special_tokens=False)["input_ids"]) for o in out
                )
                rows.append((dtype, bs, len(prompts), new, sec))
    print(f"\n{date.today()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}\n")  # fmt: skip
    print("| L dtype | batch | prompts | new tokens | s | tokens/s |\n|---|---|---|---|---|---|")
    for dtype, bs, n, new, sec in rows:
        print(f"| {dtype} | {bs} | {n} | {new} | {sec:.1f} | {new / sec:.2f} |")


if __name__ == "__main__":
    main()
