"""evaluate.py — what social tokens do inside the frozen L (the paper's results sections).

  * Perplexity on held-out clips: L alone (none), [SOC-G] (global), [SOC-L] (local), both (full),
    one trained g; two controls in g's trained layout (projector.json's `inject`): `zero` vectors
    (what the positions do) and `shuffled` frames of another clip (a soft prompt without the right
    frames). Visual gain = shuffled - that layout. exp(sum NLL / sum tokens); 95% bootstrap CIs
    resample utterances, the same resamples for every condition (paired differences).
  * Attention of text queries to [SOC-G], [SOC-L], BOS and text per layer and head, against zero
    vectors at the same positions, and the heads that attend most to social tokens.
  * Decoding with social tokens: does L say who does what to whom; one example beside its frames.
  * A training-free social-aware attention bias (seed 002): log(1 + α·s) on the text-to-[SOC-*]
    logits of heads selected per input, with and without.
RSA, the logit lens, two projectors and the encoder probe: analyze.py.

Writes OUT/eval/{ppl,attention,generate,bias,example}.json, summary.md and plots:
  python evaluate.py --data data/demo --projector out/proj --out out
"""

import argparse
import json
import math
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
import utils
from common import PAD, SOC_G, SOC_L, TEXT
from demo import SCENE_SLOTS, parse_demo_text, scene_labels

CONDITIONS = ("none", "global", "local", "full", "zero", "shuffled")
GROUP_NAMES = ("bos", "text", "soc_g", "soc_l")  # indexed by the roles BOS, TEXT, SOC_G, SOC_L
PARTS = {"ppl": "--data", "attention": "--data, --projector", "generate": "--data, --projector",
         "example": "--text, --frame, --projector",
         "bias": "--data with a val split, --projector"}  # fmt: skip
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def floats(text: str) -> list[float]:
    return [float(x) for x in utils.comma_list(text)]


def get_args_parser() -> argparse.ArgumentParser:
    doc = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser("evaluate.py", description=__doc__, formatter_class=doc)
    # inputs: the data, g (and the V and L it names), the parts to run
    p.add_argument("--data", type=Path, help="prep.py output (manifest.csv, frames.npy, ...)")
    p.add_argument("--out", type=Path, default=Path("out"), help="results go to OUT/eval/")
    p.add_argument("--projector", type=Path, help="train_proj.py --out (without it: L alone)")
    p.add_argument("--encoder", type=Path, help="train_dino.py --out (default: projector.json's)")
    p.add_argument("--lm", help="the frozen L (default: projector.json's, else Gemma 3 270M)")
    p.add_argument("--lm-dtype", default="auto", choices=("auto", *common.LM_DTYPES),
                   help="auto: g's (projector.json)")  # fmt: skip
    p.add_argument("--what", type=utils.comma_list, help="ppl,attention,... (default: given)")
    p.add_argument("--split", default="val", help="held-out split to evaluate (val or test)")
    # perplexity and its intervals
    p.add_argument("--conditions", type=utils.comma_list, default=list(CONDITIONS),
                   help="of %(default)s")  # fmt: skip
    p.add_argument("--steps", type=int, default=0, help="perplexity on N random batches (0: all)")
    p.add_argument("--batch-size", type=int, default=16, help="utterances per forward pass")
    p.add_argument("--max-len", type=int, help="max length with social tokens (default: g's)")
    p.add_argument("--seed", type=int, default=0, help="seeds --steps, derangement, resampling")
    p.add_argument("--device", default=DEVICE, help="cpu or cuda (bf16 autocast)")
    p.add_argument("--compile", action="store_true", help="torch.compile L's layers and loss")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs")
    # attention
    p.add_argument("--attention-examples", type=int, default=64, help="utterances averaged")
    p.add_argument("--top-heads", type=int, default=10, help="heads listed by social attention")
    # decoding with social tokens; the attention bias (its alpha chosen on val)
    p.add_argument("--prompt-words", type=int, default=2, help="decoding: prompt = first N words")
    p.add_argument("--max-new-tokens", type=int, default=12, help="decoding: tokens per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="decoding: 0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="decoding: nucleus of sampling")
    p.add_argument("--two-pass", action="store_true", help="decoding: also [SOC-G] as trained")
    p.add_argument("--bias-alpha", type=floats, default=[1.0, 4.0, 16.0], help="chosen on val")
    p.add_argument("--bias-margin", type=float, default=0.0, help="bias: share over zero's")
    p.add_argument("--bias-topk", type=int, default=0, help="bias: top-k heads a layer instead")
    # one example beside its frames
    p.add_argument("--text", help="one example: a sentence (its nouns and verbs get frames)")
    p.add_argument("--frame", type=Path, nargs="+", help="one example: image(s), one per word")
    return p


# ============ conditions: none, global, local, full and the controls zero, shuffled ============
def derangement(n: int, seed: int) -> np.ndarray:
    """A uniformly random permutation of range(n) without fixed point (rejection, ~e draws): in
    the `shuffled` control clip i takes its frames from clip perm[i] != i."""
    if n < 2:
        raise ValueError(f"the shuffled control needs at least 2 held-out clips with content "
                         f"words, got {n} (leave `shuffled` out of --conditions)")  # fmt: skip
    rng = np.random.default_rng(seed)
    while np.any((perm := rng.permutation(n)) == np.arange(n)):
        pass
    return perm


def shuffle_donors(clips: list[str], seed: int) -> dict[str, str]:
    """`shuffled`'s donor of each clip: another clip, by derangement(len(clips), seed)."""
    return {c: clips[k] for c, k in zip(clips, derangement(len(clips), seed), strict=True)}


# ============ perplexity with intervals ============
def perplexity(nll_sum, tokens) -> float:
    """exp(sum NLL / sum tokens): the ratio of sums, not a mean of per-utterance ratios."""
    return float(math.exp(float(np.sum(nll_sum)) / float(np.sum(tokens))))


def bootstrap_ratio(num: np.ndarray, den: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """sum num / sum den over resampled utterances, [C, n] each -> [C, n_boot]; column b of every
    row resamples the same utterances, so differences of rows are paired."""
    num, den = np.atleast_2d(num).astype(np.float64), np.atleast_2d(den).astype(np.float64)
    n, rng, out = num.shape[1], np.random.default_rng(seed), np.empty((num.shape[0], n_boot))
    for start in range(0, n_boot, 256):  # chunks keep the [chunk, n] counts small
        b = min(256, n_boot - start)
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(b)])
        out[:, start : start + b] = (num @ counts.T) / (den @ counts.T)
    return out


def paired(point: dict, boot: dict, a, b, key: str) -> dict:
    """a - b, with the 95% CI of the difference over the same resamples of utterances."""
    return {key: float(point[a] - point[b]), "ci95": utils.percentile_ci(boot[a] - boot[b])}


def ppl_report(nll: dict, tokens: dict, n_boot: int, seed: int, layout: str = "full") -> dict:
    """ppl.json's body from per-utterance nll[c], tokens[c] (the same utterances for every c):
    ppl, CI, paired difference to none; the controls and the visual gain against g's `layout`."""
    names = list(nll)
    stacked = np.stack([nll[c] for c in names]), np.stack([tokens[c] for c in names])
    boot = dict(zip(names, np.exp(bootstrap_ratio(*stacked, n_boot, seed)), strict=True))
    point, conds = {c: perplexity(nll[c], tokens[c]) for c in names}, {}
    for c in names:
        ci95, n_tokens = utils.percentile_ci(boot[c]), int(np.sum(tokens[c]))
        conds[c] = dict(ppl=point[c], ci95=ci95, tokens=n_tokens, utterances=len(nll[c]))
        if "none" in names and c != "none":
            conds[c]["minus_none"] = paired(point, boot, c, "none", "ppl")
        plain = c.removesuffix("+bias")  # a control with the bias against the layout with it
        if plain in ("zero", "shuffled") and (ref := layout + c[len(plain) :]) in names:
            conds[c]["minus_layout"] = {**paired(point, boot, c, ref, "ppl"), "against": ref}
        if c != plain and plain in names:
            conds[c]["minus_unbiased"] = paired(point, boot, c, plain, "ppl")
    if "shuffled" in names and layout in names:  # the visual gain: shuffled - trained layout
        return {"conditions": conds, "visual_gain": conds["shuffled"]["minus_layout"]}
    return {"conditions": conds}


def length_batches(items, batch_size: int, steps: int = 0, seed: int = 0) -> list[np.ndarray]:
    """Item indices in batches sorted by length (little padding); with `steps`, of a seeded random
    subset of steps·batch_size items, so that a short run is not biased to short utterances."""
    idx = np.arange(len(items))
    if 0 < steps * batch_size < len(items):
        idx = np.sort(np.random.default_rng(seed).choice(idx, steps * batch_size, replace=False))
    idx = idx[np.argsort([common.social_length(items[i], "full") for i in idx], kind="stable")]
    return [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]


@torch.no_grad()
def run_ppl(L, items, batches, conditions, social, device, compiled=False, bias=None):
    """(nll, tokens, seconds): per condition, each utterance's summed NLL (train_proj's loss
    `token_nll`) and scored tokens, in item order; bias(batch) -> L's kwargs. The sums stay on
    L's device: no host sync per batch."""
    from tqdm import tqdm

    sums = torch.zeros(2, len(conditions), len(items), dtype=torch.float64, device=device)
    utils.sync(device)
    t0 = time.perf_counter()
    for idx in tqdm(batches, desc="perplexity", disable=len(batches) < 5):
        part, where = [items[i] for i in idx], torch.from_numpy(idx).to(device)
        for k, c in enumerate(conditions):
            with utils.autocast(device):
                inject, soc_l = social(part, c)
                batch = common.insert_social_tokens(part, soc_l, L.get_input_embeddings(), inject)
                kw = bias(batch) if bias else {}
                nll = common.token_nll(L, batch, compiled, **kw).double()  # [n_scored]
            item = where[batch.loss_row]  # the utterance of each scored token
            sums[0, k].index_add_(0, item, nll)
            sums[1, k].index_add_(0, item, torch.ones_like(nll))
    utils.sync(device)
    seconds = time.perf_counter() - t0
    nll, tok = sums.cpu().numpy()[:, :, np.sort(np.concatenate(batches))]
    tok = tok.astype(np.int64)
    return dict(zip(conditions, nll, strict=True)), dict(zip(conditions, tok, strict=True)), seconds


# ============ attention to social tokens ============
def attention_mass(attn: torch.Tensor, key_group: torch.Tensor) -> torch.Tensor:
    """Mass each query gives to each group of keys: attn [B, H, Q, K] of one layer, key roles
    [B, K] (PAD keys in no group) -> [B, H, Q, 4] in GROUP_NAMES order."""
    onehot = F.one_hot(key_group.clamp(min=0), len(GROUP_NAMES)).float()
    return torch.einsum("bhqk,bkg->bhqg", attn.float(), onehot * (key_group >= 0).unsqueeze(-1))


def attention_share_sums(attentions, group: torch.Tensor) -> tuple[torch.Tensor, int]:
    """([layers, H, 4] group mass summed over the text queries, their number): the text queries
    are what L reads while it predicts words."""
    query = (group == TEXT).float()  # [B, T]
    mass = [torch.einsum("bhqg,bq->hg", attention_mass(a, group), query) for a in attentions]
    return torch.stack(mass).cpu(), int(query.sum().item())


def received_attention(attentions, group: torch.Tensor) -> torch.Tensor:
    """[layers, T] attention each key of ONE example receives, mean over heads and text queries."""
    query = group[0] == TEXT
    return torch.stack([a[0][:, query].float().mean(dim=(0, 1)) for a in attentions]).cpu()


def top_heads(shares: np.ndarray, baseline: np.ndarray, k: int) -> list[dict]:
    """The k (layer, head) whose text queries give most mass to [SOC-G] + [SOC-L] (shares [layers,
    H, 4]); `excess` over the zero-vector baseline is what position does not explain."""
    social = shares[..., SOC_G] + shares[..., SOC_L]
    base = baseline[..., SOC_G] + baseline[..., SOC_L]
    order = np.unravel_index(np.argsort(-social, axis=None, kind="stable")[:k], social.shape)
    return [dict(layer=int(i), head=int(h), social_share=float(social[i, h]),
                 zero_baseline=float(base[i, h]), excess=float(social[i, h]) - float(base[i, h]))
            for i, h in zip(*order, strict=True)]  # fmt: skip


@torch.no_grad()
def run_attention(L, tokenizer, items, social, layout, batch_size, top_k, device):
    """(attention.json's body, heatmaps of items[0]) with g's vectors in its layout and zero
    vectors at the same positions. Eager attention: the one that returns the probabilities."""
    sums, rows, heat, flags = {}, {}, {}, dict(output_attentions=True)
    before = L.config._attn_implementation
    L.set_attn_implementation("eager")
    try:
        for c in (layout, "zero"):
            batches = common.forward_batches(L, items, social, c, batch_size, device, **flags)
            for k, (batch, _, out) in enumerate(batches):
                sm, n = attention_share_sums(out.attentions, batch.roles)
                sums[c], rows[c] = sums.get(c, 0.0) + sm, rows.get(c, 0) + n
                if k == 0:  # the heatmap of the first item, padding dropped
                    real = batch.roles[0] != PAD
                    one = [a[:1][..., real][..., real, :] for a in out.attentions]
                    heat[c] = received_attention(one, batch.roles[:1, real]).numpy()
                    roles = batch.roles[0][real].tolist()
    finally:
        L.set_attn_implementation(before)
    text = iter(tokenizer.convert_ids_to_tokens(items[0].input_ids.tolist()))
    tokens = [{SOC_G: "[SOC-G]", SOC_L: "[SOC-L]"}.get(r) or next(text) for r in roles]
    shares, conds = {c: (sums[c] / rows[c]).numpy() for c in rows}, {}
    for c, sh in shares.items():  # sh [layers, H, 4]
        mean = dict(zip(GROUP_NAMES, sh.mean(axis=(0, 1)).tolist(), strict=True))
        conds[c] = {"mean": mean, "per_layer": sh.mean(1).tolist(), "per_layer_head": sh.tolist()}
    report = dict(examples=len(items), layout=layout, groups=list(GROUP_NAMES), query_rows=rows)
    report["baseline"] = "zero: social vectors set to 0 at the same positions"
    report.update(conditions=conds, top_heads=top_heads(shares[layout], shares["zero"], top_k))
    return {**report, "example": {"clip_id": items[0].clip_id, "tokens": tokens}}, heat


# ============ decoding with social tokens: does L say who does what to whom? ============
def prompt_of(utt: dict, n_words: int, context=()) -> dict:
    """The utterance cut after its first n_words words, with clip, time span and earlier turns."""
    spans = utils.split_words(utt["text"])
    end = spans[min(n_words, len(spans)) - 1][1]
    keep = {k: utt[k] for k in ("clip_id", "start", "end")}
    return keep | {"text": utt["text"][:end], "context": list(context)}


def earlier_turns(utts: list[dict], n: int) -> list[list[dict]]:
    """Per utterance, the up to n well-formed turns of its clip before it (tokenize_split's)."""
    by_clip, out = common.clip_turns(utts)[0], []
    for u in utts:
        before = [t for t in by_clip.get(u["clip_id"], []) if t.get("turn", 0) < u.get("turn", 0)]
        out.append(before[max(0, len(before) - n) :])
    return out


def clip_social(g, feats: torch.Tensor, clip_index: dict, clip_id: str):
    """(g(v_j) [n, D], t_sec [n]) of a clip's frames in time order, what decode_social reads (a
    donor clip's for `shuffled`: its frames at the same times)."""
    rows, times = clip_index[clip_id]
    return g(feats[torch.from_numpy(rows).to(feats.device)]), times


def training_soc_g(tokenizer, embed, tagger, utts, social) -> list:
    """[SOC-G] as in training (two-pass decoding): the mean of the [SOC-L] of the nouns and verbs
    of whole utterances (a first pass's, times spread over its length); None without any."""
    words, n_chars = tagger.tag([u["text"] for u in utts]), [len(u["text"]) for u in utts]
    items, soc_l, _ = common.social_items(tokenizer, utts, words, social, n_chars)
    inject = "full" if soc_l is not None else "none"
    batch = common.insert_social_tokens(items, soc_l, embed, inject)
    x, at = batch.inputs_embeds, batch.roles == SOC_G
    return [x[b][at[b]][0] if at[b].any() else None for b in range(len(utts))]


def prompt_social(g, feats, clip_index, donors, prompts, condition) -> list:
    """Per prompt: clip_social of its clip (of its donor clip: `shuffled`), None for `none`."""
    if condition == "none":
        return [None] * len(prompts)
    clips = [donors[p["clip_id"]] if condition == "shuffled" else p["clip_id"] for p in prompts]
    return [clip_social(g, feats, clip_index, c) for c in clips]


def run_generate(L, tokenizer, prompts, social, tagger, batch_size, two_pass=False, **kw):
    """common.decode_social over batches. two_pass: decode once, then again with [SOC-G] as in
    training, the mean [SOC-L] of the first pass's nouns and verbs (training_soc_g)."""
    out, embed = [], L.get_input_embeddings()
    for s in range(0, len(prompts), batch_size):
        p, so = prompts[s : s + batch_size], social[s : s + batch_size]
        gen = common.decode_social(L, tokenizer, p, so, tagger, **kw)
        if two_pass:
            whole = [u | {"text": u["text"] + r["text"]} for u, r in zip(p, gen, strict=True)]
            soc_g = training_soc_g(tokenizer, embed, tagger, whole, so)
            n = [len(u["text"]) for u in whole]
            gen = common.decode_social(L, tokenizer, p, so, tagger, soc_g=soc_g, n_chars=n, **kw)
        out += gen
    return out


def score_generations(utts, prompts, gens: dict, scenes: list) -> tuple[list, dict]:
    """(generate.jsonl's records, hits[condition] [n, 4]): each generation parsed for actor, action
    and target (parse_demo_text) against the scene at its utterance's mid-time."""
    records, hits = [], {c: [] for c in gens}
    for i, (u, p, scene) in enumerate(zip(utts, prompts, scenes, strict=True)):
        rec = {"clip_id": u["clip_id"], "turn": u.get("turn"), "prompt": p["text"]}
        rec.update(reference=u["text"], scene={k: scene[k] for k in SCENE_SLOTS} if scene else None)
        for c, out in gens.items():
            text = p["text"] + out[i]["text"]
            rec[c] = {"generation": text, "parsed": parse_demo_text(text)}
            rec[c]["soc_l_frames"] = [int(j) for _, j in out[i]["soc_l"]]
            if scene:
                hit = [rec[c]["parsed"][k] == (scene[k] or None) for k in SCENE_SLOTS]
                hits[c].append([*hit, all(hit)])
        records.append(rec)
    return records, hits


def accuracy_report(hits: dict, n_boot: int, seed: int) -> dict:
    """generate.json's body from hits[c] [n, 4] (actor, action, target, all; the same utterances
    for every c): accuracy and 95% CI per condition; visual = full - shuffled, paired."""
    names, slots = list(hits), [*SCENE_SLOTS, "all"]
    keys = [(c, h) for c in names for h in slots]
    x = np.concatenate([np.asarray(hits[c], np.float64).T for c in names])  # [C·4, n]
    acc = dict(zip(keys, x.mean(1), strict=True))
    boot = dict(zip(keys, bootstrap_ratio(x, np.ones_like(x), n_boot, seed), strict=True))
    out = {"conditions": {}, "utterances": len(hits[names[0]])}
    for c in names:
        ci95 = {h: utils.percentile_ci(boot[c, h]) for h in slots}
        out["conditions"][c] = {"accuracy": {h: float(acc[c, h]) for h in slots}, "ci95": ci95}

    def minus(a: str, b: str) -> dict:
        return {h: paired(acc, boot, (a, h), (b, h), "accuracy") for h in slots}

    if "full" in names and "shuffled" in names:
        out["visual"] = minus("full", "shuffled")
    for c in (c for c in names if c.endswith("+bias") and c.removesuffix("+bias") in names):
        out["conditions"][c]["minus_unbiased"] = minus(c, c.removesuffix("+bias"))
    return out


@torch.no_grad()
def example_view(L, tokenizer, g, V, layout, text, images, device) -> tuple[dict, dict]:
    """One sentence beside its frames (the authors' visualize_token_attention): its i-th noun or
    verb takes images[i] (the last once they run out); each token's loss, the attention heatmaps
    and L's greedy continuation without and with the social tokens."""
    tagger, n = utils.PosTagger(), len(images)
    words, k = tagger.tag([text])[0], 0
    for w in words:  # the i-th content word sits at time i: frame i
        w["t_sec"], k = float(min(k, n - 1)), k + w["content"]
    utt = {"clip_id": "example", "text": text, "words": words, "start": 0.0, "end": n - 1.0}
    item, embed = common.tokenize_utterance(tokenizer, utt), L.get_input_embeddings()
    feats = utils.encode_frames(V, np.stack(images), device=device).to(device)
    clip_index = {"example": (np.arange(n), np.arange(n, dtype=np.float64))}
    social = partial(common.social_vectors, g, feats, clip_index, layout, None)
    tokens = tokenizer.convert_ids_to_tokens(item.input_ids[item.score_from :].tolist())
    loss, more = {"token": tokens}, {}
    for c in ("none", layout):
        inject, soc_l = social([item], c)
        batch = common.insert_social_tokens([item], soc_l, embed, inject)
        loss[c] = common.token_nll(L, batch).tolist()
        clip = [None if c == "none" else clip_social(g, feats, clip_index, "example")]
        more[c] = common.decode_social(L, tokenizer, [utt], clip, tagger, inject=layout)[0]["text"]
    att, heat = run_attention(L, tokenizer, [item], social, layout, 1, 5, device)
    out = {"text": text, "layout": layout, "sequence": att["example"]["tokens"], "frames": n}
    out["content_words"] = [w["text"] for w in words if w["content"]]
    return {**out, "loss": loss, "continuation": more, "top_heads": att["top_heads"]}, heat


# ============ a training-free social-aware attention bias (seed 002) ============
def social_attention(module, query, key, value, attention_mask, social_bias=None,
                     social_roles=None, **kw):  # fmt: skip
    """L's eager attention (attn_implementation "social") plus, in layer l, social_bias[l, b, h]
    on the logits from text queries to [SOC-G] and [SOC-L] keys (0 in heads not selected).
    social_roles [B, T]: the whole sequence's roles; its last Q are the queries, its last K keys."""
    import importlib

    if social_bias is not None:
        keys = social_roles[:, -key.shape[2] :]
        text_query = (social_roles[:, -query.shape[2] :] == TEXT)[:, None, :, None]
        social_key = ((keys == SOC_G) | (keys == SOC_L))[:, None, None, :]
        b = social_bias[module.layer_idx][:, :, None, None].to(attention_mask.dtype)
        attention_mask = attention_mask + b * (text_query & social_key)  # [B, H, Q, K]
    eager = importlib.import_module(type(module).__module__).eager_attention_forward
    return eager(module, query, key, value, attention_mask, **kw)


def use_social_attention(L) -> str:
    """Route L's attention through social_attention (its eager mask: additive, [B, 1, Q, K]);
    L's weights and modules stay as they are. Returns the implementation it had."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("social", social_attention)
    AttentionMaskInterface.register("social", eager_mask)
    before = L.config._attn_implementation
    L.set_attn_implementation("social")
    return before


def speaker_roles(batch: common.SocialBatch) -> torch.Tensor:
    """batch.roles with the [SOC-L] of earlier turns (before the first scored token) as PAD: the
    bias reaches the current speaker's social tokens only (the seed's speaker alignment)."""
    roles = batch.roles.clone()
    roles[(roles == SOC_L) & ((batch.labels != -100).cumsum(1) == 0)] = PAD
    return roles


def social_shares(attentions, roles: torch.Tensor) -> torch.Tensor:
    """s [layers, B, H]: per input, each head's mean share of text-query attention on [SOC-*]."""
    query = (roles == TEXT).float()
    mass = [attention_mass(a, roles)[..., SOC_G:] for a in attentions]  # on [SOC-G] and [SOC-L]
    s = [torch.einsum("bhqg,bq->bh", m, query) for m in mass]
    return torch.stack(s) / query.sum(1).clamp(min=1)[None, :, None]


def select_heads(s: torch.Tensor, baseline: torch.Tensor, margin: float, topk: int):
    """Heads chosen per input (seed 002): s [layers, B, H] above the zero-vector baseline [layers,
    H] by `margin`, or (topk > 0) the topk heads of each layer by s."""
    if topk > 0:
        return s >= s.topk(min(topk, s.shape[-1]), dim=-1).values[..., -1:]
    return s > baseline[:, None, :] + margin


@torch.no_grad()
def bias_kwargs(L, batch, baseline, alpha: float, margin: float, topk: int) -> dict:
    """L's kwargs that bias `batch`: a first pass without bias gives s; the selected heads get
    log(1 + alpha·s) on the logits from text queries to this utterance's social keys."""
    roles = speaker_roles(batch)
    attn = common.lm_forward(L, batch, output_attentions=True, social_roles=roles).attentions
    s = social_shares(attn, roles)
    chosen = select_heads(s, baseline, margin, topk)
    return {"social_bias": torch.where(chosen, torch.log1p(alpha * s), 0.0), "social_roles": roles}


@torch.no_grad()
def bias_attention(L, items, social, condition, batch_size, device, bias=None) -> torch.Tensor:
    """s [layers, H, n]: per input, each head's share of text-query attention on social keys
    under `condition` (zero: the baseline of position alone), with `bias` when given."""
    kw = bias or (lambda batch: {"social_roles": speaker_roles(batch)})  # L's kwargs of a batch
    flags = dict(output_attentions=True)
    batches = common.forward_batches(L, items, social, condition, batch_size, device, kw, **flags)
    s = [
        social_shares(o.attentions, k["social_roles"]).permute(0, 2, 1).cpu() for _, k, o in batches
    ]
    return torch.cat(s, -1)


def run_bias(args, L, val, items, social, layout, conditions, decode, score) -> dict:
    """bias.json's body: alpha chosen on `val` by the perplexity of g's layout with the bias, then
    perplexity, decoding accuracy and attention on `items`, with and without the bias, all through
    social_attention. decode(condition, bias=None) -> generations; score(generations) -> hits."""
    device, bs, before = torch.device(args.device), args.batch_size, use_social_attention(L)
    base = bias_attention(L, val, social, "zero", bs, device).mean(-1).to(device)  # [layers, H]
    biased = partial(bias_kwargs, L, baseline=base, margin=args.bias_margin, topk=args.bias_topk)
    tuned = {}  # alpha -> val perplexity of g's layout with the bias
    for a in args.bias_alpha:
        bias = partial(biased, alpha=a)
        nll, tok, _ = run_ppl(L, val, length_batches(val, bs), [layout], social, device, bias=bias)
        tuned[a] = perplexity(nll[layout], tok[layout])
    bias = partial(biased, alpha=(alpha := min(tuned, key=tuned.get)))
    conds = [c for c in ("none", layout, "shuffled") if c in conditions]
    batches = length_batches(items, bs, args.steps, args.seed)
    nll, tok, _ = run_ppl(L, items, batches, conds, social, device)
    nll_b, tok_b, _ = run_ppl(L, items, batches, conds, social, device, bias=bias)
    nll |= {c + "+bias": v for c, v in nll_b.items()}
    tok |= {c + "+bias": v for c, v in tok_b.items()}
    report = ppl_report(nll, tok, args.bootstrap, args.seed, layout)["conditions"]
    gens = {}  # decoding with and without the bias
    for c in (c for c in ("full", "shuffled") if c in conditions):
        gens |= {c: decode(c), c + "+bias": decode(c, bias=bias)}
    if any((hits := score(gens)[1]).values()):
        for c, r in accuracy_report(hits, args.bootstrap, args.seed)["conditions"].items():
            report.setdefault(c, {})["accuracy"] = r
    chosen = [it for it in items if len(it.t_p)][: args.attention_examples]
    s = {c: bias_attention(L, chosen, social, c, bs, device) for c in ("zero", layout)}
    s[layout + "+bias"] = bias_attention(L, chosen, social, layout, bs, device, bias)
    L.set_attn_implementation(before)
    picked = select_heads(s[layout].permute(0, 2, 1), base.cpu(), args.bias_margin, args.bias_topk)
    picked = picked.float().mean(1)  # [layers, H]: how often each head was chosen
    heads = [dict(layer=i, head=j, selected=float(picked[i, j]), zero_baseline=float(base[i, j]))
             for i, j in picked.nonzero().tolist()]  # fmt: skip
    heads.sort(key=lambda h: -h["selected"])
    shares = {c: x.mean(-1).numpy() for c, x in s.items()}  # [layers, H]
    return dict(alpha=alpha, val_ppl_by_alpha=tuned, margin=args.bias_margin, topk=args.bias_topk,
                split=args.split, heads=heads[: args.top_heads], conditions=report,
                attention={c: {"mean": float(x.mean()), "per_layer": x.mean(1).tolist()}
                           for c, x in shares.items()})  # fmt: skip


# ============ outputs: plots and summary.md ============
def plot_attention_heatmaps(maps: dict, tokens: list[str], path: Path, title: str) -> None:
    """One example's attention received, tokens x layers, a panel per condition (real | zero)."""
    fig, axes = utils.figure(max(6, 0.35 * len(tokens)) * len(maps), 5, len(maps))
    vmax = max(float(m.max()) for m in maps.values())
    for ax, (name, m) in zip(axes, maps.items(), strict=True):
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, origin="lower")
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
        ax.set(yticks=range(m.shape[0]), ylabel="layer", title=f"{title}: {name}")
        fig.colorbar(im, ax=ax, label="attention received (mean over heads, text queries)")
    fig.savefig(path, dpi=120)


def plot_layers(path: Path, ylabel: str, lines: dict) -> None:
    """Values over L's layers, lines {label: (values, format, colour)}."""
    fig, (ax,) = utils.figure()
    for label, (y, fmt, colour) in lines.items():
        ax.plot(y, fmt, color=colour, label=label)
    ax.set(xticks=range(len(y)), xlabel="layer", ylabel=ylabel)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def plot_ppl(ppl: dict, path: Path) -> None:
    """Perplexity per condition with its 95% bootstrap interval (log scale: `none` sits far up)."""
    fig, (ax,) = utils.figure()
    conds = ppl["conditions"]
    point, ci95 = np.array([r["ppl"] for r in conds.values()]), [r["ci95"] for r in conds.values()]
    err = np.abs(np.array(ci95).T - point)  # [2, C]: below and above the point
    ax.bar(list(conds), point, yerr=err, capsize=4, color="tab:blue")
    ax.set(yscale="log", ylabel=f"perplexity ({ppl['split']} split, 95% CI)")
    fig.savefig(path, dpi=120)


def summary_markdown(ppl=None, attention=None, generate=None, example=None, bias=None) -> str:
    """A markdown digest of the parts' JSON (those given)."""
    md, ci, table = ["# Evaluation summary"], utils.ci_text, utils.markdown_table

    def minus(d: dict | None) -> str:  # a paired difference and its CI
        return f"{d['ppl']:+.2f} {ci(d['ci95'])}" if d else "—"

    if ppl:
        md.append(f"\n## Perplexity ({ppl['split']} split, {ppl['utterances']} utterances)")
        c = ppl["conditions"]
        rows = [[k, f"{r['ppl']:.2f}", ci(r["ci95"]), minus(r.get("minus_none")), r["tokens"]]
                for k, r in c.items()]  # fmt: skip
        md += table(("condition", "perplexity", "95% CI", "minus none (95% CI)", "tokens"), rows)
        if gain := ppl.get("visual_gain"):
            ref = gain.get("against", "full")  # g's trained layout (an older ppl.json: full)
            line = f"\nVisual gain (shuffled − {ref}): **{gain['ppl']:.2f}** {ci(gain['ci95'])}"
            for k in (k for k in ("shuffled", "none") if k in c):
                line += f"; {ref} / {k} = {c[ref]['ppl'] / c[k]['ppl']:.3f}"
            md.append(line)
    if attention:
        n, layout = attention["examples"], attention["layout"]
        md.append(f"\n## Attention of text queries ({n} examples, mean of layers and heads)")
        rows = [[k, *(f"{r['mean'][g]:.3f}" for g in GROUP_NAMES)]
                for k, r in attention["conditions"].items()]  # fmt: skip
        md += table(("condition", *GROUP_NAMES), rows)
        md.append(f"\nzero: zero vectors at the positions of {layout}. Heads most on [SOC-*]:")
        keys = ("social_share", "zero_baseline", "excess")
        rows = [[h["layer"], h["head"], *(f"{h[k]:.3f}" for k in keys)]
                for h in attention["top_heads"]]  # fmt: skip
        md += table(("layer", "head", "[SOC-*] share", "zero baseline", "excess"), rows)
    if generate and "conditions" in generate:
        n, k = generate["utterances"], generate["prompt_words"]
        md.append(f"\n## Decoding: who does what to whom ({n} utterances, prompt: first {k} words)")
        acc = {c: (r["accuracy"], r["ci95"]) for c, r in generate["conditions"].items()}
        if v := generate.get("visual"):
            acc["visual: full − shuffled"] = ({h: x["accuracy"] for h, x in v.items()},
                                              {h: x["ci95"] for h, x in v.items()})  # fmt: skip
        rows = [[c, *(f"{a[h]:.2f} {ci(i[h])}" for h in a)] for c, (a, i) in acc.items()]
        md += table(("condition", *SCENE_SLOTS, "all three"), rows) + [""]
        for r in generate["examples"]:
            gens = "; ".join(f"{c}: *{r[c]['generation']}*" for c in generate["conditions"])
            md.append(f"- reference *{r['reference']}* — {gens}")
    if bias:
        n = " ".join(f"{float(a):g}: {p:.2f};" for a, p in bias["val_ppl_by_alpha"].items())
        md.append(f"\n## Social-aware attention bias (alpha {bias['alpha']:g} on val; {n[:-1]})")
        cols, rows = ("actor", "action", "all"), []  # decoding accuracy with and without the bias
        for c, r in bias["conditions"].items():  # decoding rows are named `full`: g's layout
            acc = r.get("accuracy", {}).get("accuracy", {})
            ppl_ci = f"{r['ppl']:.2f} {ci(r['ci95'])}" if "ppl" in r else "—"
            hits = (f"{acc[h]:.2f}" if h in acc else "—" for h in cols)
            rows.append([c, ppl_ci, minus(r.get("minus_unbiased")), *hits])
        md += table(("condition", "perplexity (95% CI)", "with − without (95% CI)", *cols), rows)
        against = {c: g for c, r in bias["conditions"].items() if (g := r.get("minus_layout"))}
        gains = [f"{c} − {g['against']} {g['ppl']:.2f} {ci(g['ci95'])}" for c, g in against.items()]
        md.append("\nVisual gain: " + "; ".join(gains) + ".")
        att = " · ".join(f"{c} {r['mean']:.3f}" for c, r in bias["attention"].items())
        md.append(f"\nShare of text-query attention on [SOC-*]: {att}.")
    if example:
        md.append(f"\n## One example: {example['text']!r} ({example['frames']} frame(s))")
        md.append(f"\n{' '.join(example['sequence'])}\n")
        for c, more in example["continuation"].items():
            md.append(f"- {c}: mean loss {np.mean(example['loss'][c]):.2f}; continues *{more}*")
    return "\n".join(md) + "\n"


# ============ main ============
def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)

    # ============ the parts asked for (--what), or those whose inputs are given ============
    with_g = bool(args.data and args.projector)  # the parts that read L with g's social tokens
    given = dict(ppl=args.data, attention=with_g, generate=with_g)
    given["example"] = args.text and args.frame and args.projector
    val = utils.read_utterances(args.data, "val") if with_g else []  # the bias tunes alpha on val
    given["bias"] = any(w.get("content") for u in val for w in u.get("words", []))  # a noun or verb
    parts = utils.chosen_parts("evaluate", args.what, PARTS, given)
    if unknown := [c for c in args.conditions if c not in CONDITIONS]:
        raise SystemExit(f"--conditions: unknown {unknown}; expected some of {CONDITIONS}")
    utils.seed_everything(args.seed)
    device, out = torch.device(args.device), args.out / "eval"
    out.mkdir(parents=True, exist_ok=True)

    # ============ g, and L in the dtype g was trained against ============
    g, cfg = common.load_projector(args.projector, device) if args.projector else (None, {})
    L, tokenizer, source = common.load_trained_lm(cfg, args.lm, args.lm_dtype, device)
    source["projector"] = str(args.projector) if args.projector else None
    if args.compile:
        utils.compile_lm(L)
    layout = cfg.get("inject", "none")  # where g's vectors went in training: the controls' layout
    conditions = args.conditions if g is not None else ["none"]  # without g: L alone
    max_len = args.max_len or cfg.get("max_len", 256)
    task, turns = cfg.get("task", "utterance"), cfg.get("context_turns", 3)

    # ============ held-out utterances, shuffled donors ============
    clip_index = utils.clip_frame_index(utils.read_manifest(args.data)) if args.data else {}
    items, skipped, donors = [], [], None
    if {"ppl", "attention", "generate", "bias"} & set(parts):
        utts = utils.read_utterances(args.data, args.split)
        items, skipped = common.tokenize_split(utts, tokenizer, clip_index, task, turns, max_len)
        if not items:
            raise SystemExit(f"{args.data}: no usable utterance in split {args.split!r}")
    if {"ppl", "generate", "bias"} & set(parts) and "shuffled" in conditions:
        try:
            donors = shuffle_donors(sorted({it.clip_id for it in items if len(it.t_p)}), args.seed)
        except ValueError as e:
            raise SystemExit(f"{args.data}, split {args.split!r}: {e}") from None

    # ============ V: v_j = V(F_j)[CLS] of every frame (train_proj's cache) ============
    feats = None
    if g is not None and any(len(it.t_p) for it in items):
        if (encoder := args.encoder or cfg.get("encoder")) is None:
            raise SystemExit(f"{args.projector}: projector.json names no encoder: give --encoder")
        feats = utils.frame_features(encoder, args.data, device, args.batch_size).to(device)
    social = partial(common.social_vectors, g, feats, clip_index, layout, donors)  # (items, c)

    if "ppl" in parts:  # ============ perplexity under every condition ============
        batches = length_batches(items, args.batch_size, args.steps, args.seed)
        nll, tok, seconds = run_ppl(L, items, batches, conditions, social, device, args.compile)
        n = len(nll[conditions[0]])
        print(f"perplexity: {n} utterances x {len(conditions)} conditions, {n / seconds:.1f} utt/s")
        ppl = ppl_report(nll, tok, args.bootstrap, args.seed, layout)
        ppl.update(split=args.split, utterances=n, steps=args.steps, skipped=skipped, donors=donors)
        ppl.update(controls_layout=layout, bootstrap=args.bootstrap, seed=args.seed, **source)
        utils.write_json(out / "ppl.json", {**ppl, "utterances_per_s": n / seconds})
        plot_ppl(ppl, out / "ppl.png")

    if "attention" in parts:  # ============ attention to social tokens ============
        if not (chosen := [it for it in items if len(it.t_p)][: args.attention_examples]):
            raise SystemExit(f"{args.data}: no {args.split} utterance has a content word")
        k, bs = args.top_heads, args.batch_size
        att, heat = run_attention(L, tokenizer, chosen, social, layout, bs, k, device)
        utils.write_json(out / "attention.json", att)
        tokens, title = att["example"]["tokens"], "one held-out example"
        plot_attention_heatmaps(heat, tokens, out / "attention_example.png", title)
        lines = {}  # [SOC-G] and [SOC-L] per layer, a line style per condition
        for (c, v), style in zip(att["conditions"].items(), ("-", "--"), strict=True):
            for r, colour in ((SOC_G, "tab:red"), (SOC_L, "tab:blue")):
                lines[f"{GROUP_NAMES[r]} ({c})"] = (np.array(v["per_layer"])[:, r], style, colour)
        plot_layers(out / "attention_layers.png", "share of attention (text queries)", lines)

    if {"generate", "bias"} & set(parts):  # ============ prompts and scenes ============
        usable = donors if donors is not None else clip_index  # `shuffled` needs a donor clip
        utts = [u for u in utils.read_utterances(args.data, args.split) if u["clip_id"] in usable]
        context = earlier_turns(utts, turns if task == "next-utterance" else 0)
        prompts = [prompt_of(u, args.prompt_words, c) for u, c in zip(utts, context, strict=True)]
        mid = [{"clip_id": u["clip_id"], "t_sec": (u["start"] + u["end"]) / 2} for u in utts]
        scenes_csv = args.data / "scenes.csv"  # the demo's: who does what to whom, when
        scenes = scene_labels(scenes_csv, mid) if scenes_csv.exists() else [None] * len(utts)
        score, tagger = partial(score_generations, utts, prompts, scenes=scenes), utils.PosTagger()
        decoding = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                        stop=(".", "\n"), inject=layout)  # fmt: skip

        def decode(condition: str, **kw) -> list[dict]:  # the prompts continued under `condition`
            social_p = prompt_social(g, feats, clip_index, donors, prompts, condition)
            return run_generate(L, tokenizer, prompts, social_p, tagger, **decoding, **kw)

    if "generate" in parts:  # ============ decoding with social tokens ============
        gens, t0 = {}, time.perf_counter()
        for c in (c for c in ("none", "full", "shuffled") if c in conditions):
            two_pass = args.two_pass and c != "none" and layout in ("global", "full")
            for two in (False, True) if two_pass else (False,):  # [SOC-G] in g's layout
                gens[c + "/two-pass" * two] = decode(c, two_pass=two)
        seconds, texts = time.perf_counter() - t0, [r["text"] for o in gens.values() for r in o]
        new = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        records, hits = score(gens)
        lines = "".join(json.dumps(r) + "\n" for r in records)
        utils.atomic_write(out / "generate.jsonl", lambda tmp: Path(tmp).write_text(lines))
        report = accuracy_report(hits, args.bootstrap, args.seed) if any(hits.values()) else {}
        report.update(split=args.split, prompt_words=args.prompt_words, seconds=seconds,
                      tokens_per_s=new / seconds)  # fmt: skip
        utils.write_json(out / "generate.json", {**report, "examples": records[:6], **source})

    if "bias" in parts:  # ============ the social-aware attention bias (seed 002) ============
        if args.split == "val":
            print("evaluate: bias: alpha is tuned on val and reported on val (use --split test)")
        val = common.tokenize_split(val, tokenizer, clip_index, task, turns, max_len)[0]
        if not (val := [it for it in val if len(it.t_p)]):
            raise SystemExit(f"{args.data}: the bias tunes alpha on split 'val': no utterance "
                             f"there has a content word")  # fmt: skip
        bias = run_bias(args, L, val, items, social, layout, conditions, decode, score)
        utils.write_json(out / "bias.json", {**bias, **source})
        lines = {c: (r["per_layer"], "o-", None) for c, r in bias["attention"].items()}
        plot_layers(out / "bias_attention.png", "share on [SOC-*] (text queries)", lines)

    if "example" in parts:  # ============ one sentence beside its frames ============
        from PIL import Image

        V, _ = utils.load_encoder(args.encoder or cfg["encoder"], device)
        if (size := cfg.get("frame_size")) is None:  # an older projector.json: a guess
            size = [V.patch_embed.img_size[0]] * 2
            print(f"evaluate: {args.projector} names no frame_size; frames letterboxed to {size}")
        images = []
        for path in args.frame:
            with Image.open(path) as im:
                images.append(utils.letterbox(np.asarray(im.convert("RGB")), *size))
        view, heat = example_view(L, tokenizer, g, V, layout, args.text, images, device)
        utils.write_json(out / "example.json", view)
        plot_attention_heatmaps(heat, view["sequence"], out / "example_attention.png", args.text)
        print(json.dumps({k: view[k] for k in ("sequence", "continuation")}, indent=1))

    # ============ summary.md of every part's JSON in OUT/eval (earlier runs' too) ============
    done = {k: json.loads(p.read_text()) for k in PARTS if (p := out / f"{k}.json").exists()}
    text = summary_markdown(**done)
    utils.atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(text))
    print(text)


if __name__ == "__main__":
    main()
