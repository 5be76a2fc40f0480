"""What the social tokens carry, slot by slot: teacher-forced NLL of the demo's actor colour,
actor kind, verb and target colour (demo.py's vocabulary) under none / full / shuffled, the
conditions and derangement of evaluate.py's perplexity, with 95% bootstrap intervals of
shuffled − full over utterances. Chance for a colour is ln 6 = 1.79 nats.

  python bench/slot_nll.py --data data/demo --projector out/demo/proj [--by-first-word]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import demo  # noqa: E402
import evaluate as ev  # noqa: E402
import utils  # noqa: E402

SLOTS = ("actor colour", "actor kind", "verb", "target colour", "other")


def token_slots(tokenizer, it: common.TokenizedUtterance) -> list[str]:
    """The slot of each scored token of `it` (Gemma's pieces carry their leading space)."""
    ids = it.input_ids[it.score_from :].tolist()
    text = tokenizer.decode(ids)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if offsets["input_ids"] != ids:
        raise SystemExit(f"{it.clip_id}: {text!r} does not tokenize back to its scored tokens")
    people = list(demo.PERSON.finditer(text))
    spans = [(people[0].span(1), "actor colour")] if people else []
    spans += [(people[0].span(2), "actor kind")] if people else []
    spans += [(v.span(), "verb")] if (v := demo.VERB.search(text)) else []
    spans += [(people[1].span(1), "target colour")] if len(people) > 1 else []
    return [next((s for (lo, hi), s in spans if a >= lo - 1 and b <= hi), "other")
            for a, b in offsets["offset_mapping"]]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="prep.py --demo output")
    p.add_argument("--projector", type=Path, required=True, help="train_proj.py --out")
    p.add_argument("--split", default="test", help="held-out split")
    p.add_argument("--seed", type=int, default=0, help="the derangement's and bootstrap's seed")
    p.add_argument("--by-first-word", action="store_true", help="a table per first word too")
    args = p.parse_args()
    g, cfg = common.load_projector(args.projector, "cpu")
    if cfg.get("task", "utterance") != "utterance":
        raise SystemExit(f"{args.projector}: slot NLL reads --task utterance projectors only")
    L, tokenizer = utils.load_lm(cfg["lm"], "cpu", getattr(torch, cfg.get("lm_dtype", "float32")))
    feats = utils.frame_features(cfg["encoder"], args.data, "cpu")
    clip_index = utils.clip_frame_index(utils.read_manifest(args.data))
    utts = utils.read_utterances(args.data, args.split)
    items, _ = common.tokenize_split(utts, tokenizer, clip_index, "utterance", 0, cfg["max_len"])
    donors = ev.shuffle_donors(sorted({it.clip_id for it in items if len(it.t_p)}), args.seed)
    social = partial(common.social_vectors, g, feats, clip_index, cfg["inject"], donors)
    slots = [np.array(token_slots(tokenizer, it)) for it in items]
    nll = {}  # condition -> [utterance, slot] mean NLL (nan: no such token)
    with torch.no_grad():
        for cond in ("none", "full", "shuffled"):
            nll[cond] = np.full((len(items), len(SLOTS)), np.nan)
            for lo in range(0, len(items), 16):
                part = items[lo : lo + 16]
                inject, soc_l = social(part, cfg["inject"] if cond == "full" else cond)
                batch = common.insert_social_tokens(part, soc_l, L.get_input_embeddings(), inject)
                x, rows = common.token_nll(L, batch).numpy(), batch.loss_row.numpy()
                for r in range(len(part)):
                    s = slots[lo + r]
                    if len(s) != (rows == r).sum():
                        raise SystemExit(f"{part[r].clip_id}: scored tokens differ from the text's")
                    for k, name in enumerate(SLOTS):
                        if (s == name).any():
                            nll[cond][lo + r, k] = x[rows == r][s == name].mean()
    first = np.array([tokenizer.decode(it.input_ids[it.score_from :][:1]).strip() for it in items])
    groups = {"all": np.ones(len(items), bool)}
    if args.by_first_word:  # the demo's templates: "Look, the …", "Now the …", "The …"
        groups.update({f'"{w} …"': first == w for w in np.unique(first)})
    for label, sel in groups.items():
        print(f"\n{args.split} split, {label}: {sel.sum()} utterances; mean NLL per token (nats)\n")
        print_table({c: x[sel] for c, x in nll.items()}, np.random.default_rng(args.seed))


def print_table(nll: dict, rng: np.random.Generator) -> None:
    print("| slot | n | none | full | shuffled | shuffled − full (95% CI) |")
    print("|---|---|---|---|---|---|")
    for k, name in enumerate(SLOTS):
        ok = ~np.isnan(nll["full"][:, k])
        d = nll["shuffled"][ok, k] - nll["full"][ok, k]
        boot = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(2000)]
        lo, hi = np.percentile(boot, [2.5, 97.5])
        means = " | ".join(f"{np.nanmean(nll[c][ok, k]):.2f}" for c in nll)
        print(f"| {name} | {ok.sum()} | {means} | {d.mean():+.2f} [{lo:+.2f}, {hi:+.2f}] |")


if __name__ == "__main__":
    main()
