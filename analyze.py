"""analyze.py — what the representations carry: the paper's RSA and the authors' analyses.

  * RSA against human similarity (--index, --sim-rsm, --pool) or odd-one-out triplets: Spearman
    rho of pooled hidden states' correlations, permutation p, bootstrap CI, the layer prespecified
    (--layer) or chosen on half of the items and reported on the other half.
  * The logit lens: what L's final norm and head read at the [SOC-G] and [SOC-L] positions.
  * Two projectors compared: cosine of their [SOC-L] on the same frames (--compare).
  * The encoder probe: a linear probe of V's [CLS] for who does what to whom (the demo's
    scenes.csv), before and after DINO.

Writes OUT/analysis/{rsa,logit_lens,compare,encoder_probe}.json, summary.md and rsa_layers.png:
  python analyze.py --data data/demo --projector out/proj --out out
  python analyze.py --projector out/proj --index items.csv --sim-rsm human.csv --pool all
"""

import argparse
import csv
import json
import math
from functools import partial
from itertools import permutations
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
import utils
from common import BOS, PAD, SOC_G, SOC_L, TEXT
from demo import SCENE_SLOTS, scene_labels

PARTS = {"rsa": "--index, --sim-rsm|triplets", "logit_lens": "--data, --projector",
         "compare": "--data, --projector, --compare",
         "encoder_probe": "--data with scenes.csv, --projector or --encoder"}  # fmt: skip
POOL_MODES = ("all", "exclude_soc", "only_soc", "locals_only", "eos")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def get_args_parser() -> argparse.ArgumentParser:
    doc = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser("analyze.py", description=__doc__, formatter_class=doc)
    # inputs: the data, g (and the V and L it names), the parts to run
    p.add_argument("--data", type=Path, help="prep.py output (manifest.csv, frames.npy, ...)")
    p.add_argument("--out", type=Path, default=Path("out"), help="results go to OUT/analysis/")
    p.add_argument("--projector", type=Path, help="train_proj.py --out (without it: L alone)")
    p.add_argument("--encoder", type=Path, help="train_dino.py --out (default: projector.json's)")
    p.add_argument("--lm", help="the frozen L (default: projector.json's, else Gemma 3 270M)")
    p.add_argument("--lm-dtype", default="auto", choices=("auto", *common.LM_DTYPES),
                   help="auto: g's (projector.json)")  # fmt: skip
    p.add_argument("--what", type=utils.comma_list, help="rsa,logit_lens,... (default: given)")
    p.add_argument("--split", default="val", help="held-out split (logit lens, compare, probe)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences or frames per pass")
    p.add_argument("--max-len", type=int, help="max length with social tokens (default: g's)")
    p.add_argument("--seed", type=int, default=0, help="seeds RSA's halves and resampling")
    p.add_argument("--device", default=DEVICE, help="cpu or cuda (bf16 autocast)")
    p.add_argument("--compile", action="store_true", help="torch.compile L's layers")
    # RSA
    p.add_argument("--index", type=Path, help="RSA items CSV: item_id,clip_id,text")
    p.add_argument("--sim-rsm", type=Path, help="human similarity CSV: item_id, a column an id")
    p.add_argument("--triplets", type=Path, help="odd-one-out CSV: item_a,item_b,item_c,odd")
    p.add_argument("--pool", default="all", choices=POOL_MODES, help="RSA's pooled positions")
    p.add_argument("--inject", choices=common.INJECT_MODES, help="RSA's (default: g's layout)")
    p.add_argument("--layer", type=int, help="RSA layer (0: embeddings; default: chosen on half)")
    p.add_argument("--spacy-model", default=utils.DEFAULT_SPACY_MODEL, help="POS of RSA texts")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CI")
    p.add_argument("--permutations", type=int, default=5000, help="permutations for RSA's p")
    # the logit lens, two projectors
    p.add_argument("--lens-examples", type=int, default=16, help="utterances in the logit lens")
    p.add_argument("--top-k", type=int, default=5, help="tokens per layer in the logit lens")
    p.add_argument("--compare", type=Path, help="another train_proj.py --out: cosine of [SOC-L]")
    return p


# ============ RSA: pooled hidden states against human similarity ============
def pool_hidden(hidden: torch.Tensor, group: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, T, D] hidden states -> [B, D] by the authors' --pool: all (but BOS), exclude_soc (text),
    only_soc ([SOC-G] and [SOC-L]), locals_only ([SOC-L]) or eos (the last real position)."""
    if mode == "eos":
        last = (group != PAD).long().cumsum(1).argmax(1)  # last non-pad position, either padding
        return hidden[torch.arange(hidden.shape[0]), last].float()
    keep = dict(all=group > BOS, exclude_soc=group == TEXT, only_soc=group >= SOC_G,
                locals_only=group == SOC_L)[mode]  # fmt: skip
    if empty := torch.nonzero(keep.sum(1) == 0).flatten().tolist():
        why = "no social tokens: check --inject and that the items have content words"
        raise ValueError(f"--pool {mode}: sequence(s) {empty} have no position to pool ({why})")
    w = keep.float().unsqueeze(-1)
    return (hidden.float() * w).sum(1) / w.sum(1)


@torch.no_grad()
def pooled_states(L, items, social, inject, pool, batch_size, device) -> np.ndarray:
    """[layers + 1, n_items, D] pooled hidden states (0: L's input embeddings, k: block k's)."""
    flags = dict(output_hidden_states=True)
    batches = common.forward_batches(L, items, social, inject, batch_size, device, **flags)
    pooled = [[pool_hidden(h, b.roles, pool) for h in out.hidden_states] for b, _, out in batches]
    return torch.cat([torch.stack(p).cpu() for p in pooled], dim=1).numpy()


def model_similarity(x: np.ndarray) -> np.ndarray:
    """1 - correlation distance between the rows of x [n, D] (scipy's 'correlation' metric)."""
    return np.corrcoef(np.asarray(x, dtype=np.float64))


def spearman_upper(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rho between the upper triangles (i < j) of two item x item matrices, over the
    pairs finite in both: the Pearson correlation of average ranks."""
    from scipy.stats import rankdata

    i, j = np.triu_indices(a.shape[0], 1)
    ok = np.isfinite(a[i, j]) & np.isfinite(b[i, j])
    rx, ry = (r - r.mean() for r in (rankdata(a[i, j][ok]), rankdata(b[i, j][ok])))
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def permutation_pvalue(model: np.ndarray, human: np.ndarray, n_perm: int, seed: int) -> float:
    """One-sided p of rho > 0, permuting the model's items (rows and columns together): exact
    over all n! orders when n! <= n_perm, else Monte Carlo with the +1 correction."""
    n, obs = model.shape[0], spearman_upper(model, human)
    if not math.isfinite(obs):  # a constant matrix has no rank order to test
        return float("nan")
    if math.factorial(n) <= n_perm:
        rhos = [spearman_upper(model[np.ix_(p, p)], human) for p in permutations(range(n))]
        return float(np.mean(np.array(rhos) >= obs - 1e-12))
    rng = np.random.default_rng(seed)
    null = (model[np.ix_(p, p)] for p in (rng.permutation(n) for _ in range(n_perm)))
    return (1 + sum(spearman_upper(m, human) >= obs - 1e-12 for m in null)) / (1 + n_perm)


def triplet_similarity(triplets: np.ndarray, n: int) -> np.ndarray:
    """Human similarity of a pair: the fraction of its odd-one-out triplets where neither was the
    odd one; NaN (out of the RSA) for pairs never shown together."""
    together, shown = np.zeros((n, n)), np.zeros((n, n))
    for a, b, c, odd in triplets:
        for i, j in ((a, b), (a, c), (b, c), (b, a), (c, a), (c, b)):
            shown[i, j] += 1
            together[i, j] += odd not in (i, j)
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = np.where(shown > 0, together / shown, np.nan)
    np.fill_diagonal(sim, np.nan)
    return sim


def odd_one_out_accuracy(model: np.ndarray, triplets: np.ndarray) -> float:
    """How often the model's odd one (left out of its most similar pair) is the human's."""
    a, b, c, odd = triplets.T
    pair_sim = np.stack([model[b, c], model[a, c], model[a, b]], axis=1)  # pair without a, b, c
    guess = np.stack([a, b, c], axis=1)[np.arange(len(a)), pair_sim.argmax(1)]
    return float(np.mean(guess == odd))


def rsa_report(sims, human, layer, n_perm, n_boot, seed, triplets=None) -> dict:
    """RSA of per-layer model similarities [layers, n, n] against human [n, n]. A given `layer` is
    reported on all items; else the best layer on a seeded half of the items is reported on the
    other half, so that the choice does not inflate rho. The CI resamples items."""
    n = human.shape[0]
    if layer is not None:
        if not -len(sims) <= layer < len(sims):
            raise ValueError(f"--layer {layer}: the model has layers 0..{len(sims) - 1}")
        layer, report, choice = layer % len(sims), np.arange(n), "prespecified (--layer)"
    else:
        if n < 6:
            raise ValueError(f"{n} items are too few to choose a layer on half; give --layer")
        perm = np.random.default_rng(seed).permutation(n)
        select, report = np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])
        half = np.ix_(select, select)
        layer = int(np.nanargmax([spearman_upper(m[half], human[half]) for m in sims]))
        choice = f"chosen on {len(select)} items, reported on the other {len(report)}"
    m, h = sims[layer][np.ix_(report, report)], human[np.ix_(report, report)]
    pairs = int(np.isfinite(h[np.triu_indices(len(report), 1)]).sum())
    out = dict(layer=layer, layer_choice=choice, rho=spearman_upper(m, h), items=len(report))
    out.update(pairs=pairs, p_value=permutation_pvalue(m, h, n_perm, seed))
    rng, rhos = np.random.default_rng(seed), []
    for idx in (rng.integers(0, len(report), len(report)) for _ in range(n_boot)):
        resampled = h[np.ix_(idx, idx)].copy()
        resampled[idx[:, None] == idx[None, :]] = np.nan  # an item paired with its own copy: out
        rhos.append(spearman_upper(m[np.ix_(idx, idx)], resampled))
    rhos = np.array(rhos)[np.isfinite(rhos)]
    out["ci95"] = utils.percentile_ci(rhos) if len(rhos) else [float("nan"), float("nan")]
    out["per_layer_rho_all_items"] = [spearman_upper(s, human) for s in sims]  # not for choosing
    if triplets is not None:  # those whose three items are all reported on
        pos = {int(k): r for r, k in enumerate(report)}
        kept = [[pos[int(x)] for x in t] for t in triplets if all(int(x) in pos for x in t[:3])]
        if kept:
            acc = odd_one_out_accuracy(m, np.array(kept))
            out["odd_one_out"] = {"accuracy": acc, "chance": 1 / 3, "triplets": len(kept)}
    return out


# ============ the logit lens: what L's head reads at social tokens ============
@torch.no_grad()
def logit_lens(L, tokenizer, items, social, layout, batch_size, k, device) -> dict:
    """Per layer, the k tokens that L's final norm and head read at the [SOC-G] and the [SOC-L]
    positions, by probability averaged over the positions; layer 0 is the input embedding."""
    head, norm = L.get_output_embeddings(), L.get_decoder().norm
    cap, sums, count = getattr(L.config, "final_logit_softcapping", None), {}, {}
    flags = dict(output_hidden_states=True)
    batches = common.forward_batches(L, items, social, layout, batch_size, device, **flags)
    for batch, _, out in batches:
        hidden = [*map(norm, out.hidden_states[:-1]), out.last_hidden_state]
        for role, name in ((SOC_G, "soc_g"), (SOC_L, "soc_l")):
            if not (where := batch.roles == role).any():
                continue
            acc = sums.setdefault(name, hidden[0].new_zeros(len(hidden), head.weight.shape[0]))
            count[name] = count.get(name, 0) + int(where.sum())
            for i, h in enumerate(hidden):  # a layer at a time: [positions, vocabulary] logits
                z = head(h[where].to(head.weight.dtype)).float()
                acc[i] += (cap * torch.tanh(z / cap) if cap else z).softmax(-1).sum(0)
    layers = [{"layer": i} for i in range(len(hidden))]
    for name, acc in sums.items():  # acc [layers, vocabulary]: summed probabilities
        top = (acc / count[name]).topk(k)
        for layer, p, ids in zip(layers, top.values.tolist(), top.indices.tolist(), strict=True):
            tokens = tokenizer.convert_ids_to_tokens(ids)
            layer[name] = [[t, q] for t, q in zip(tokens, p, strict=True)]
    return {"layout": layout, "examples": len(items), "positions": count, "layers": layers}


# ============ two projectors: their [SOC-L] on the same frames ============
@torch.no_grad()
def compare_projectors(g_a, feats_a, g_b, feats_b, frame_rows) -> dict:
    """Cosine, frame by frame, of two projectors' [SOC-L] g_a(v_j) and g_b(v_j) (each g with the V
    it was trained with) on the same frames; and the ratio of their norms."""
    a, b = g_a(feats_a[frame_rows]).float(), g_b(feats_b[frame_rows]).float()
    cos, ratio = F.cosine_similarity(a, b, dim=-1).cpu().numpy(), (b.norm(dim=-1) / a.norm(dim=-1))
    stats = {q: float(np.percentile(cos, p)) for q, p in (("p05", 5), ("median", 50), ("p95", 95))}
    out = {"frames": len(cos), "cosine": {"mean": float(cos.mean()), **stats}}
    return {**out, "norm_ratio_b_over_a": float(ratio.mean()), "per_frame": cos.tolist()}


# ============ the encoder probe (demo): does V's [CLS] tell who does what to whom? ============
def linear_probe(z_train: torch.Tensor, y_train: np.ndarray, z_test: torch.Tensor) -> np.ndarray:
    """Softmax regression (L-BFGS, small L2) on standardised [CLS]: z_test's predicted labels."""
    mu, sd = z_train.mean(0), z_train.std(0) + 1e-6
    classes, y = np.unique(y_train, return_inverse=True)
    w = torch.zeros(z_train.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy((z_train - mu) / sd @ w + b, torch.from_numpy(y))
        (loss + 1e-3 * (w**2).sum()).backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return classes[((z_test - mu) / sd @ w + b).argmax(1).numpy()]


def encoder_probe(feats, rows, labels, split: str) -> tuple[dict, dict, dict]:
    """Accuracy of a linear probe of [CLS] for each slot, fit on the train split's frames and
    read on `split`'s (held-out clips), and the chance of the train split's majority class."""
    keep = [k for k, s in enumerate(labels) if s is not None]
    fit = np.array([k for k in keep if rows[k]["split"] == "train"])
    test = np.array([k for k in keep if rows[k]["split"] == split])
    if len(fit) == 0 or len(test) == 0:
        raise SystemExit(f"encoder probe: no labelled frames in split train or {split!r}")
    z = feats[[rows[k]["frame_idx"] for k in range(len(rows))]].float()
    acc, chance = {}, {}
    for slot in SCENE_SLOTS:
        y = np.array([(labels[k] or {}).get(slot) or "none" for k in range(len(rows))])
        acc[slot] = float(np.mean(linear_probe(z[fit], y[fit], z[test]) == y[test]))
        values, counts = np.unique(y[fit], return_counts=True)
        chance[slot] = float(np.mean(y[test] == values[counts.argmax()]))
    return acc, chance, {"train": len(fit), split: len(test)}


# ============ files: RSA items, human judgments ============
def read_index(path: Path) -> list[dict]:
    """RSA items: CSV `item_id,clip_id,text`; clip_id or text may be empty, not both."""
    items, seen = [], {}
    for line, row in utils.read_csv(path, ("item_id", "clip_id", "text")):
        item = {k: (row[k] or "").strip() for k in ("item_id", "clip_id", "text")}
        if not (name := item["item_id"]):
            raise ValueError(f"{path}: line {line}: empty item_id")
        if name in seen:
            raise ValueError(f"{path}: line {line}: item_id {name!r} repeats line {seen[name]}")
        if not item["clip_id"] and not item["text"]:
            raise ValueError(f"{path}: line {line}: item {name!r} has neither clip_id nor text")
        seen[name] = line
        items.append(item)
    if len(items) < 3:
        raise ValueError(f"{path}: {len(items)} item(s); RSA needs at least 3")
    return items


def read_similarity_matrix(path: Path, ids: list[str]) -> np.ndarray:
    """Human similarity CSV (item_id, a column per id) in the order of `ids`, square, symmetric."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [[c.strip() for c in r] for r in csv.reader(f) if r]
    if not rows or rows[0][0] != "item_id":
        raise ValueError(f"{path}: first header cell must be 'item_id'")
    cols = rows[0][1:]
    for what, found in (("column", cols), ("row", [r[0] for r in rows[1:]])):
        for why, bad in (
            ("appears more than once", [i for i in found if found.count(i) > 1]),
            ("is not in the index", [i for i in found if i not in ids]),
            ("is missing: the index has more items", [i for i in ids if i not in found]),
        ):
            if bad:
                raise ValueError(f"{path}: {what} id {bad[0]!r} {why}")
    values = {}
    for line, r in enumerate(rows[1:], start=2):
        if len(r) != len(cols) + 1:
            raise ValueError(f"{path}: line {line} (item {r[0]!r}) has {len(r) - 1} values")
        for col, cell in zip(cols, r[1:], strict=True):
            try:
                values[r[0], col] = float(cell)
            except ValueError:
                where = f"{path}: line {line}, column {col!r}"
                raise ValueError(f"{where}: {cell!r} is not a number") from None
    m = np.array([[values[a, b] for b in ids] for a in ids])
    for i, j in np.argwhere(np.abs(m - m.T) > 1e-6 * np.maximum(1.0, np.abs(m)))[:1]:
        a, b = ids[i], ids[j]
        raise ValueError(f"{path}: not symmetric: ({a!r}, {b!r}) = {m[i, j]} != {m[j, i]}")
    return m


def read_triplets(path: Path, ids: list[str]) -> np.ndarray:
    """Odd-one-out CSV `item_a,item_b,item_c,odd` -> [m, 4] item indices (odd is one of a, b, c)."""
    pos, out = {i: k for k, i in enumerate(ids)}, []
    for line, row in utils.read_csv(path, ("item_a", "item_b", "item_c", "odd")):
        cells = [(row[k] or "").strip() for k in ("item_a", "item_b", "item_c", "odd")]
        if unknown := [c for c in cells if c not in pos]:
            raise ValueError(f"{path}: line {line}: item id {unknown[0]!r} is not in the index")
        if len(set(cells[:3])) < 3:
            raise ValueError(f"{path}: line {line}: a triplet needs three different items")
        if cells[3] not in cells[:3]:
            raise ValueError(f"{path}: line {line}: odd {cells[3]!r} is not one of the triplet")
        out.append([pos[c] for c in cells])
    if not out:
        raise ValueError(f"{path}: no triplets")
    return np.array(out, dtype=np.int64)


def rsa_items(index, index_path, tokenizer, data, clip_index, tagger, max_len) -> list:
    """One sequence per RSA item. Text and clip: the text, its nouns and verbs (`tagger`; None:
    no social tokens) spread over the clip's time; text alone: no social tokens; clip alone: the
    clip's last turn in --data, its earlier turns as context."""
    turns: dict[str, list[dict]] = {}
    for it in (it for it in index if it["clip_id"]):
        where = f"{index_path}: item {it['item_id']!r}"
        if data is None:
            raise SystemExit(f"{where} names a clip: give --data")
        if it["clip_id"] not in clip_index:
            raise ValueError(f"{where}: clip {it['clip_id']!r} has no frames")
        for u in [] if turns else utils.read_utterances(data):
            turns.setdefault(u["clip_id"], []).append(u)
    texts = [it["text"] for it in index if it["text"] and it["clip_id"]]
    tags, items = iter(tagger.tag(texts) if tagger and texts else []), []
    for it in index:
        clip, text = it["clip_id"], it["text"]
        if not text:
            if clip not in turns:
                raise ValueError(f"{index_path}: {it['item_id']!r}: no text, no turn in {data}")
            t = sorted(turns[clip], key=lambda u: u.get("turn", 0))
            items.append(common.tokenize_utterance(tokenizer, t[-1], t[:-1], max_len))
            continue
        words = next(tags) if clip and tagger else []
        if words:  # each word at its middle character, over the clip's first to last frame time
            times, spans = clip_index[clip][1], [(w["char_start"], w["char_end"]) for w in words]
            t, _ = utils.word_times(spans, len(text), start=times[0], end=times[-1])
            words = [{**w, "t_sec": tw} for w, tw in zip(words, t, strict=True)]
        utt = {"clip_id": clip, "text": text, "words": words, "turn": it["item_id"]}
        items.append(common.tokenize_utterance(tokenizer, utt, max_len=max_len))
    return items


# ============ outputs: the RSA plot and summary.md ============
def plot_rsa(rsa: dict, path: Path) -> None:
    """rho per layer on all items (descriptive, not for choosing), and the reported layer's rho
    with its 95% CI."""
    fig, (ax,) = utils.figure()
    y, rho, (lo, hi) = rsa["per_layer_rho_all_items"], rsa["rho"], rsa["ci95"]
    ax.plot(y, "o-", color="tab:gray", label="all items (descriptive)")
    ax.errorbar([rsa["layer"]], [rho], [[rho - lo], [hi - rho]], fmt="o", color="tab:red",
                label=f"reported ({rsa['layer_choice']})")  # fmt: skip
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set(xticks=range(len(y)), xlabel="layer", ylabel="Spearman rho (model vs human)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def summary_markdown(rsa=None, encoder_probe=None, logit_lens=None, compare=None) -> str:
    """A markdown digest of the parts' JSON (those given)."""
    md, ci = ["# Analysis summary"], utils.ci_text
    if rsa:
        md.append(f"\n## RSA (--pool {rsa['pool']}, --inject {rsa['inject']}) against humans")
        rows = []
        for r in rsa["results"]:
            ooo = f"{r['odd_one_out']['accuracy']:.3f}" if "odd_one_out" in r else "—"
            stats = f"{r['rho']:.3f}", ci(r["ci95"], ".3f"), f"{r['p_value']:.4f}", r["items"]
            rows.append([r["human"], r["layer"], *stats, r["pairs"], ooo])
        head = "human", "layer", "rho", "95% CI", "p", "items", "pairs", "odd-one-out"
        md += utils.markdown_table(head, rows)
        md.append(f"\nLayer: {rsa['results'][0]['layer_choice']}.")
    if encoder_probe:
        n = " / ".join(f"{v} {k}" for k, v in encoder_probe["frames"].items())
        md.append(f"\n## Encoder probe: linear probe of V's [CLS] ({n} frames)")
        kinds = [k for k in ("untrained", "fine_tuned", "chance") if k in encoder_probe]
        rows = [[k, *(f"{encoder_probe[k][s]:.3f}" for s in SCENE_SLOTS)] for k in kinds]
        md += utils.markdown_table(("V", *SCENE_SLOTS), rows)
    if logit_lens:
        names = [n for n in ("soc_g", "soc_l") if n in logit_lens["layers"][0]]
        md.append(f"\n## Logit lens: what L's head reads at social tokens (top 3 of {names})")
        rows = []
        for r in logit_lens["layers"]:
            top3 = (" ".join(repr(t) for t, _ in r[n][:3]) for n in names)
            rows.append([r["layer"], *(t.replace("|", "\\|") for t in top3)])
        md += utils.markdown_table(("layer", *names), rows)
    if compare:
        c = compare["cosine"]
        md.append(f"\n## Two projectors: cosine of [SOC-L] on {compare['frames']} frames")
        spread = f"5-95% [{c['p05']:.3f}, {c['p95']:.3f}]"
        md.append(f"\nmean {c['mean']:.3f}, median {c['median']:.3f}, {spread}; "
                  f"{compare['b']} against {compare['a']}.")  # fmt: skip
    return "\n".join(md) + "\n"


# ============ main ============
def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)

    # ============ the parts asked for (--what), or those whose inputs are given ============
    with_g = bool(args.data and args.projector)
    scenes_csv = args.data and args.data / "scenes.csv"
    given = dict(rsa=args.index and (args.sim_rsm or args.triplets), logit_lens=with_g)
    given["compare"] = with_g and args.compare
    given["encoder_probe"] = scenes_csv and scenes_csv.exists() and (args.projector or args.encoder)
    parts = utils.chosen_parts("analyze", args.what, PARTS, given)
    utils.seed_everything(args.seed)
    device, out = torch.device(args.device), args.out / "analysis"
    out.mkdir(parents=True, exist_ok=True)

    # ============ g, and L in the dtype g was trained against ============
    g, cfg = common.load_projector(args.projector, device) if args.projector else (None, {})
    layout = cfg.get("inject", "none")  # where g's vectors went in training
    L = tokenizer = None  # L reads text in RSA and the logit lens only
    if {"rsa", "logit_lens"} & set(parts):
        L, tokenizer, source = common.load_trained_lm(cfg, args.lm, args.lm_dtype, device)
        source["projector"] = str(args.projector) if args.projector else None
        if args.compile:
            utils.compile_lm(L)
    max_len = args.max_len or cfg.get("max_len", 256)
    clip_index = utils.clip_frame_index(utils.read_manifest(args.data)) if args.data else {}

    # ============ held-out utterances with a content word (logit lens), RSA items ============
    items, index, r_items = [], [], []
    if "logit_lens" in parts:
        task, turns = cfg.get("task", "utterance"), cfg.get("context_turns", 3)
        utts = utils.read_utterances(args.data, args.split)
        items = common.tokenize_split(utts, tokenizer, clip_index, task, turns, max_len)[0]
        if not (items := [it for it in items if len(it.t_p)][: args.lens_examples]):
            why = "has a content word (the logit lens reads social tokens)"
            raise SystemExit(f"{args.data}: no {args.split} utterance {why}")
    if "rsa" in parts:
        if (rsa_inject := args.inject or layout) != "none" and g is None:
            raise SystemExit(f"--inject {rsa_inject} needs --projector (g makes the social tokens)")
        index = read_index(args.index)
        pos = utils.PosTagger(args.spacy_model) if rsa_inject != "none" else None
        r_items = rsa_items(index, args.index, tokenizer, args.data, clip_index, pos, max_len)

    # ============ V: v_j = V(F_j)[CLS] of every frame (train_proj's cache) ============
    feats = None
    if g is not None and (any(len(it.t_p) for it in [*items, *r_items]) or "compare" in parts):
        if (encoder := args.encoder or cfg.get("encoder")) is None:
            raise SystemExit(f"{args.projector}: projector.json names no encoder: give --encoder")
        feats = utils.frame_features(encoder, args.data, device, args.batch_size).to(device)
    social = partial(common.social_vectors, g, feats, clip_index, layout, None)

    if "rsa" in parts:  # ============ RSA against human similarity ============
        ids, targets = [it["item_id"] for it in index], []
        if args.sim_rsm:
            human = read_similarity_matrix(args.sim_rsm, ids)
            targets.append((f"sim-rsm {args.sim_rsm}", human, None))
        if args.triplets:
            trip = read_triplets(args.triplets, ids)
            targets.append((f"triplets {args.triplets}", triplet_similarity(trip, len(ids)), trip))
        kinds = {"only_soc": ("global", "local", "full"), "locals_only": ("local", "full")}
        for i, it in zip(ids, r_items, strict=True):  # --pool only_soc/locals_only need tokens
            if args.pool in kinds and (rsa_inject not in kinds[args.pool] or not len(it.t_p)):
                why = "gets no such social token (it needs a clip, a content word, --inject)"
                raise SystemExit(f"--pool {args.pool} with --inject {rsa_inject}: item {i!r} {why}")
        states = pooled_states(L, r_items, social, rsa_inject, args.pool, args.batch_size, device)
        sims = np.stack([model_similarity(x) for x in states])  # [layers + 1, n, n]
        stats = (args.layer, args.permutations, args.bootstrap, args.seed)
        results = [{"human": name, **rsa_report(sims, h, *stats, t)} for name, h, t in targets]
        rsa = dict(pool=args.pool, inject=rsa_inject, index=str(args.index), items=len(ids))
        rsa["similarity"] = "1 - correlation distance of pooled hidden states"
        utils.write_json(out / "rsa.json", {**rsa, "results": results, **source})
        plot_rsa(results[0], out / "rsa_layers.png")

    if "logit_lens" in parts:  # ============ what L's head reads at social tokens ============
        lens = logit_lens(L, tokenizer, items, social, layout, args.batch_size, args.top_k, device)
        utils.write_json(out / "logit_lens.json", {**lens, **source})

    if "compare" in parts:  # ============ two projectors' [SOC-L] on the same frames ============
        g_b, cfg_b = common.load_projector(args.compare, device)
        if cfg_b["out_dim"] != cfg["out_dim"] or not cfg_b.get("encoder"):
            raise SystemExit(f"--compare {args.compare}: its out_dim is not {args.projector}'s "
                             f"({cfg['out_dim']}), or its projector.json names no encoder")  # fmt: skip
        feats_b = utils.frame_features(cfg_b["encoder"], args.data, device, args.batch_size)
        rows = [r["frame_idx"] for r in utils.read_manifest(args.data) if r["split"] == args.split]
        pair = compare_projectors(g, feats, g_b, feats_b.to(device), torch.tensor(rows))
        names = {"a": str(args.projector), "b": str(args.compare), "split": args.split}
        utils.write_json(out / "compare.json", {**names, **pair})

    if "encoder_probe" in parts:  # ============ what DINO adds to V: a linear probe ============
        encoder = Path(args.encoder or cfg["encoder"])
        encoder = encoder if encoder.is_file() else encoder / "encoder.safetensors"
        rows = utils.read_manifest(args.data)
        labels = scene_labels(scenes_csv, rows)
        probe = {"split": args.split, "encoder": str(encoder), "frames": {}}
        start = encoder.with_name("start.safetensors")  # V before DINO (older train_dino: none)
        for name, path in (("untrained", start), ("fine_tuned", encoder)):
            if path.exists():
                z = utils.frame_features(path, args.data, device, args.batch_size)
                fit = encoder_probe(z, rows, labels, args.split)
                probe[name], probe["chance"], probe["frames"] = fit
        utils.write_json(out / "encoder_probe.json", probe)

    # ============ summary.md of every part's JSON in OUT/analysis (earlier runs' too) ============
    done = {k: json.loads(p.read_text()) for k in PARTS if (p := out / f"{k}.json").exists()}
    text = summary_markdown(**done)
    utils.atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(text))
    print(text)


if __name__ == "__main__":
    main()
