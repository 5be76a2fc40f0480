"""evaluate.py — what social tokens do inside the frozen L: perplexity, attention, RSA.

Companion to the paper's results sections:
  * "Social tokens improve next-word prediction": per-token perplexity on held-out clips under
    the conditions none (L alone), global ([SOC-G] only), local ([SOC-L] only) and full (both),
    all with the one trained g, and two controls at the positions of g's trained layout: `zero`
    (every social vector set to 0: what the positions alone do) and `shuffled` (frames from
    another clip, a seeded derangement: what a learned soft prompt does without the right
    frames). Only `shuffled - full` is the visual gain.
  * "Attention Scores of Social Tokens": with eager attention, the share of attention mass that
    text queries give to [SOC-G], [SOC-L], BOS and text, per layer and head, against the
    zero-vector baseline at the same positions (the paper's positional-bias check), and the heads
    that attend most to social tokens (head selection as in multi-speaker attention alignment).
  * RSA against human similarity judgments (authors' `--index`, `--sim-rsm`, `--pool`), or
    odd-one-out triplets: model similarity = 1 - correlation distance of pooled hidden states,
    Spearman rho on the upper triangle, permutation p-value, bootstrap interval. The layer is
    prespecified (`--layer`) or chosen on one half of the items and reported on the other.

Honest numbers: perplexity = exp(sum NLL / sum scored tokens); 95% percentile bootstrap intervals
resample utterances (ratio of sums), with the same resamples for every condition so differences
are paired.

  python evaluate.py --data data/demo --projector out/proj --out out
  python evaluate.py --data data/demo --what rsa --index items.csv --sim-rsm human.csv \\
      --inject none --out out

Writes OUT/eval/ppl.json ({"conditions": {"none": {"ppl", "ci95", "tokens", ...}, ...},
"visual_gain": {"ppl", "ci95"}}), attention.json, rsa.json, summary.md and PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
from common import BOS, PAD, SOC_G, SOC_L, TEXT, Projector, SocialBatch, TokenizedUtterance

CONDITIONS = ("none", "global", "local", "full", "zero", "shuffled")
POOL_MODES = ("all", "exclude_soc", "only_soc", "locals_only", "eos")
GROUP_NAMES = ("bos", "text", "soc_g", "soc_l")  # indexed by the roles BOS, TEXT, SOC_G, SOC_L


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, help="prep.py output (manifest.csv, frames.npy, ...)")
    p.add_argument("--out", type=Path, default=Path("out"), help="results go to OUT/eval/")
    p.add_argument(
        "--projector",
        type=Path,
        help="train_proj.py --out (projector.safetensors + projector.json); "
        "without it only text-only parts run (none perplexity, RSA with --inject none)",
    )
    p.add_argument(
        "--encoder",
        type=Path,
        help="train_dino.py --out holding encoder.safetensors (default: the one in projector.json)",
    )
    p.add_argument(
        "--lm",
        default=None,
        help="the frozen LLM L (default: the one in projector.json, else the embedded Gemma 3 270M)",
    )
    p.add_argument(
        "--what",
        default=None,
        help="comma list of ppl, attention, rsa (default: each part whose inputs are given: ppl "
        "needs --data, attention --data and --projector, rsa --index with --sim-rsm/--triplets)",
    )
    p.add_argument("--split", default="val", help="held-out split to evaluate (val or test)")
    p.add_argument(
        "--conditions",
        default=",".join(CONDITIONS),
        help="perplexity conditions: none, global, local, full and the controls zero, shuffled",
    )
    p.add_argument(
        "--steps", type=int, default=0, help="perplexity on the first N batches only (0: all)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="utterances per forward pass")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs")
    p.add_argument(
        "--permutations", type=int, default=5000, help="permutations for the RSA p-value"
    )
    p.add_argument(
        "--attention-examples",
        type=int,
        default=64,
        help="held-out utterances (with content words) whose attention is averaged",
    )
    p.add_argument("--top-heads", type=int, default=10, help="heads listed by social attention")
    p.add_argument("--index", type=Path, help="RSA items CSV: item_id,clip_id,text")
    p.add_argument(
        "--sim-rsm",
        type=Path,
        help="human similarity matrix CSV: item_id then one column per item id (square, symmetric)",
    )
    p.add_argument(
        "--triplets",
        type=Path,
        help="odd-one-out CSV item_a,item_b,item_c,odd (similarity = how often a pair was kept)",
    )
    p.add_argument(
        "--pool",
        default="all",
        choices=POOL_MODES,
        help="RSA pooling of hidden states: all positions but BOS, text only (exclude_soc), "
        "[SOC-G]+[SOC-L] (only_soc), [SOC-L] only (locals_only), or the last token (eos)",
    )
    p.add_argument(
        "--inject",
        default=None,
        choices=common.INJECT_MODES,
        help="social tokens for the RSA items (default: the projector's mode, none without one)",
    )
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="prespecified RSA layer (0 = embeddings, k = after block k); "
        "default: choose on one half of the items, report on the other",
    )
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="max sequence length with social tokens (default: the projector's, else 256)",
    )
    p.add_argument(
        "--spacy-model",
        default=common.DEFAULT_SPACY_MODEL,
        help="POS tagger for RSA item texts that get social tokens (nouns/verbs)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the derangement and all resampling")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        choices=("cpu", "cuda"),
        help="bf16 autocast on cuda",
    )
    return p


# --------------------------------------------------------------------------------------------
# Perplexity with intervals
# --------------------------------------------------------------------------------------------


def perplexity(nll_sum: np.ndarray | float, tokens: np.ndarray | float) -> float:
    """Per-token perplexity exp(sum NLL / sum tokens) — the ratio of sums, not a mean of ratios."""
    return float(math.exp(float(np.sum(nll_sum)) / float(np.sum(tokens))))


def bootstrap_ppl(nll: np.ndarray, tokens: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Perplexity of `n_boot` resamples of utterances, the same resamples for every condition.

    `nll`, `tokens`: [C, n] summed NLL and scored tokens of n utterances under C conditions.
    Returns [C, n_boot]; column b of every row uses the same utterances, so differences between
    rows are paired.
    """
    nll, tokens = np.atleast_2d(nll).astype(np.float64), np.atleast_2d(tokens).astype(np.float64)
    n = nll.shape[1]
    rng = np.random.default_rng(seed)
    out = np.empty((nll.shape[0], n_boot))
    for start in range(0, n_boot, 256):  # chunks keep the [chunk, n] counts small
        b = min(256, n_boot - start)
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(b)])
        out[:, start : start + b] = np.exp((nll @ counts.T) / (tokens @ counts.T))
    return out


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> list[float]:
    """Two-sided percentile interval of bootstrap samples."""
    a = (1.0 - level) / 2.0
    lo, hi = np.percentile(samples, [100 * a, 100 * (1 - a)])
    return [float(lo), float(hi)]


def ppl_report(
    nll: dict[str, np.ndarray], tokens: dict[str, np.ndarray], n_boot: int, seed: int
) -> dict:
    """The ppl.json body: per condition ppl, 95% CI, tokens, and the paired difference to `none`;
    the visual gain `shuffled - full` with its paired interval.

    `nll[c]`, `tokens[c]`: per-utterance arrays, the same utterances in the same order for all c.
    """
    names = list(nll)
    boot = bootstrap_ppl(
        np.stack([nll[c] for c in names]), np.stack([tokens[c] for c in names]), n_boot, seed
    )
    point = {c: perplexity(nll[c], tokens[c]) for c in names}
    conds = {}
    for k, c in enumerate(names):
        conds[c] = {
            "ppl": point[c],
            "ci95": percentile_ci(boot[k]),
            "tokens": int(np.sum(tokens[c])),
            "utterances": len(nll[c]),
        }
        if "none" in names and c != "none":
            conds[c]["minus_none"] = {
                "ppl": point[c] - point["none"],
                "ci95": percentile_ci(boot[k] - boot[names.index("none")]),
            }
    report = {"conditions": conds}
    if "shuffled" in names and "full" in names:
        gain = boot[names.index("shuffled")] - boot[names.index("full")]
        report["visual_gain"] = {
            "ppl": point["shuffled"] - point["full"],
            "ci95": percentile_ci(gain),
        }
    return report


def derangement(n: int, seed: int) -> np.ndarray:
    """A uniformly random permutation of range(n) with no fixed point (rejection sampling,
    ~e draws): clip i takes its frames from clip perm[i] != i for the `shuffled` control."""
    if n < 2:
        raise ValueError(
            f"the shuffled control takes frames from another clip, so it needs at least 2 "
            f"held-out clips; got {n} (evaluate more clips or leave `shuffled` out of --conditions)"
        )
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def utterance_nll(L: torch.nn.Module, batch: SocialBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL (float64) and number of scored tokens of every sequence of a batch,
    from `common.token_nll`: the very loss train_proj.py trains and validates with. Both stay
    on L's device (no host sync per batch)."""
    nll = common.token_nll(L, batch).double()
    B = batch.labels.shape[0]
    sums = torch.zeros(B, dtype=torch.float64, device=nll.device).index_add_(0, batch.loss_row, nll)
    return sums, torch.bincount(batch.loss_row, minlength=B)


# --------------------------------------------------------------------------------------------
# Attention to social tokens
# --------------------------------------------------------------------------------------------


def attention_mass(attn: torch.Tensor, key_group: torch.Tensor) -> torch.Tensor:
    """Attention mass each query row gives to each group of keys.

    attn: [B, H, Q, K] attention probabilities of one layer; key_group: [B, K] with BOS, TEXT,
    SOC_G, SOC_L (PAD = -1 keys get no column: the mask gives them zero probability).
    Returns [B, H, Q, 4] in GROUP_NAMES order; a real query row sums to one.
    """
    onehot = F.one_hot(key_group.clamp(min=0), len(GROUP_NAMES)).to(torch.float32)
    onehot = onehot * (key_group >= 0).unsqueeze(-1)
    return torch.einsum("bhqk,bkg->bhqg", attn.float(), onehot)


def attention_share_sums(
    attentions: Sequence[torch.Tensor], group: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Summed per-row group mass over the text query rows of a batch, for every layer and head.

    attentions: L tensors [B, H, T, T] (output_attentions=True); group: [B, T] position roles.
    Queries are the text tokens (not BOS, [SOC-*] or padding): what the model reads while
    predicting words. Returns ([L, H, 4] sums, number of query rows); divide to get shares.
    """
    query = (group == TEXT).to(torch.float32)  # [B, T]
    sums = torch.stack(
        [torch.einsum("bhqg,bq->hg", attention_mass(a, group), query) for a in attentions]
    )
    return sums.cpu(), int(query.sum().item())


def received_attention(attentions: Sequence[torch.Tensor], group: torch.Tensor) -> torch.Tensor:
    """Attention each key position of ONE example receives, per layer: mean over heads and over
    its text query rows. attentions: L tensors [1, H, T, T]; returns [L, T] (heatmap rows)."""
    query = group[0] == TEXT
    return torch.stack([a[0][:, query].float().mean(dim=(0, 1)) for a in attentions]).cpu()


def top_heads(shares: np.ndarray, baseline: np.ndarray | None, k: int) -> list[dict]:
    """The k (layer, head) pairs whose text queries give most mass to [SOC-G] + [SOC-L].

    shares/baseline: [L, H, 4] shares with real and with zero social vectors. `excess` is the part
    not explained by position (real minus zero-vector baseline).
    """
    social = shares[..., SOC_G] + shares[..., SOC_L]
    base = None if baseline is None else baseline[..., SOC_G] + baseline[..., SOC_L]
    order = np.argsort(-social, axis=None, kind="stable")[:k]
    heads = []
    for flat in order:
        layer, head = np.unravel_index(flat, social.shape)
        row = {"layer": int(layer), "head": int(head), "social_share": float(social[layer, head])}
        if base is not None:
            row["zero_baseline"] = float(base[layer, head])
            row["excess"] = row["social_share"] - row["zero_baseline"]
        heads.append(row)
    return heads


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def plot_attention_heatmaps(
    maps: dict[str, np.ndarray], tokens: list[str], path: Path, title: str
) -> None:
    """Heatmap of one example, tokens x layers, one panel per condition (real | zero vectors)."""
    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(maps), figsize=(max(6, 0.35 * len(tokens)) * len(maps), 5), squeeze=False
    )
    vmax = max(float(m.max()) for m in maps.values())
    for ax, (name, m) in zip(axes[0], maps.items(), strict=True):
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, origin="lower")
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(m.shape[0]))
        ax.set_ylabel("layer")
        ax.set_title(f"{title}: {name}")
        fig.colorbar(im, ax=ax, label="attention received (mean over heads, text queries)")
    save_figure(fig, path)


def plot_layer_shares(shares: dict[str, np.ndarray], path: Path) -> None:
    """Per-layer share of attention on [SOC-G] and [SOC-L] (mean over heads), one line style per
    condition: real social vectors against the zero-vector baseline."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ["-", "--", ":", "-."]
    for style, (name, s) in zip(styles, shares.items(), strict=False):
        per_layer = s.mean(axis=1)  # [L, 4]
        for g, color in ((SOC_G, "tab:red"), (SOC_L, "tab:blue")):
            ax.plot(per_layer[:, g], style, color=color, label=f"{GROUP_NAMES[g]} ({name})")
    ax.set_xticks(range(per_layer.shape[0]))
    ax.set_xlabel("layer")
    ax.set_ylabel("share of attention mass (text queries)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# RSA: files
# --------------------------------------------------------------------------------------------


def read_index(path: Path) -> list[dict]:
    """RSA items: CSV `item_id,clip_id,text`; clip_id or text may be empty, not both."""
    items, seen = [], {}
    for line, row in common.read_csv(path, ("item_id", "clip_id", "text")):
        item = {k: (row[k] or "").strip() for k in ("item_id", "clip_id", "text")}
        if not item["item_id"]:
            raise ValueError(f"{path}: line {line}: empty item_id")
        if item["item_id"] in seen:
            raise ValueError(
                f"{path}: line {line}: item_id {item['item_id']!r} repeats line "
                f"{seen[item['item_id']]}"
            )
        if not item["clip_id"] and not item["text"]:
            raise ValueError(
                f"{path}: line {line}: item {item['item_id']!r} has neither clip_id nor text"
            )
        seen[item["item_id"]] = line
        items.append(item)
    if len(items) < 3:
        raise ValueError(f"{path}: {len(items)} item(s); RSA needs at least 3")
    return items


def _check_ids(path: Path, found: Sequence[str], ids: Sequence[str], what: str) -> None:
    """Same item ids as the index, no more, no fewer, each once — else name the offender."""
    dup = sorted({i for i in found if list(found).count(i) > 1})
    if dup:
        raise ValueError(f"{path}: {what} id {dup[0]!r} appears more than once")
    unknown = [i for i in found if i not in set(ids)]
    if unknown:
        raise ValueError(f"{path}: {what} id {unknown[0]!r} is not in the index")
    absent = [i for i in ids if i not in set(found)]
    if absent:
        raise ValueError(
            f"{path}: {len(found)} {what} ids but the index has {len(ids)} items; "
            f"missing id {absent[0]!r}"
        )


def read_similarity_matrix(path: Path, ids: Sequence[str]) -> np.ndarray:
    """Human similarity matrix CSV (first column item_id, one column per item id), returned in
    the order of `ids`. Square, symmetric, the index's ids: anything else is an error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r]
    if not rows or rows[0][0].strip() != "item_id":
        raise ValueError(f"{path}: first header cell must be 'item_id'")
    cols = [c.strip() for c in rows[0][1:]]
    _check_ids(path, cols, ids, "column")
    row_ids = [r[0].strip() for r in rows[1:]]
    _check_ids(path, row_ids, ids, "row")
    values = {}
    for line, r in enumerate(rows[1:], start=2):
        if len(r) != len(cols) + 1:
            raise ValueError(
                f"{path}: line {line} (item {r[0]!r}) has {len(r) - 1} values, "
                f"expected {len(cols)} (one per column)"
            )
        for col, cell in zip(cols, r[1:], strict=True):
            try:
                values[r[0].strip(), col] = float(cell)
            except ValueError:
                raise ValueError(
                    f"{path}: line {line}, column {col!r}: {cell!r} is not a number"
                ) from None
    m = np.array([[values[a, b] for b in ids] for a in ids])
    off = np.abs(m - m.T) > 1e-6 * np.maximum(1.0, np.abs(m))
    if np.any(off):
        i, j = np.argwhere(off)[0]
        raise ValueError(
            f"{path}: not symmetric: ({ids[i]!r}, {ids[j]!r}) = {m[i, j]} but "
            f"({ids[j]!r}, {ids[i]!r}) = {m[j, i]}"
        )
    return m


def read_triplets(path: Path, ids: Sequence[str]) -> np.ndarray:
    """Odd-one-out CSV `item_a,item_b,item_c,odd` -> [m, 4] item indices (odd is one of a, b, c)."""
    pos = {i: k for k, i in enumerate(ids)}
    out = []
    for line, row in common.read_csv(path, ("item_a", "item_b", "item_c", "odd")):
        cells = [(row[k] or "").strip() for k in ("item_a", "item_b", "item_c", "odd")]
        for c in cells:
            if c not in pos:
                raise ValueError(f"{path}: line {line}: item id {c!r} is not in the index")
        if len(set(cells[:3])) < 3:
            raise ValueError(f"{path}: line {line}: a triplet needs three different items")
        if cells[3] not in cells[:3]:
            raise ValueError(f"{path}: line {line}: odd {cells[3]!r} is not one of the triplet")
        out.append([pos[c] for c in cells])
    if not out:
        raise ValueError(f"{path}: no triplets")
    return np.array(out, dtype=np.int64)


def triplet_similarity(triplets: np.ndarray, n: int) -> np.ndarray:
    """Human similarity from odd-one-out choices: for every pair, the fraction of the triplets
    holding both in which neither was the odd one (the pair was kept together). Pairs never
    shown together are NaN and leave the RSA."""
    together, shown = np.zeros((n, n)), np.zeros((n, n))
    for a, b, c, odd in triplets:
        for i, j in ((a, b), (a, c), (b, c)):
            shown[i, j] += 1
            shown[j, i] += 1
            if odd not in (i, j):
                together[i, j] += 1
                together[j, i] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = together / shown
    sim[shown == 0] = np.nan
    np.fill_diagonal(sim, np.nan)
    return sim


# --------------------------------------------------------------------------------------------
# RSA: pooling, similarity, statistics
# --------------------------------------------------------------------------------------------


def pool_hidden(hidden: torch.Tensor, group: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool [B, T, D] hidden states of one layer into [B, D] (authors' --pool modes).

    all: every position but BOS (BOS's state is the same for every item); exclude_soc: text
    tokens; only_soc: [SOC-G] and [SOC-L]; locals_only: [SOC-L]; eos: the last real position.
    """
    if mode == "eos":
        last = (group != PAD).long().cumsum(1).argmax(1)  # last non-pad position, either padding
        return hidden[torch.arange(hidden.shape[0]), last].float()
    keep = {
        "all": group > BOS,
        "exclude_soc": group == TEXT,
        "only_soc": (group == SOC_G) | (group == SOC_L),
        "locals_only": group == SOC_L,
    }[mode]
    empty = torch.nonzero(keep.sum(1) == 0).flatten().tolist()
    if empty:
        raise ValueError(
            f"--pool {mode}: sequence(s) {empty} of the batch have no position to pool "
            f"(no social tokens: check --inject and that the items have content words)"
        )
    w = keep.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * w).sum(1) / w.sum(1)


def model_similarity(x: np.ndarray) -> np.ndarray:
    """1 - correlation distance between the rows of x [n, D] (scipy's 'correlation' metric)."""
    return np.corrcoef(np.asarray(x, dtype=np.float64))


def spearman_upper(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rho between the upper triangles (i < j) of two item x item matrices, over the
    pairs where both are finite: Pearson correlation of average ranks."""
    from scipy.stats import rankdata

    i, j = np.triu_indices(a.shape[0], 1)
    x, y = a[i, j], b[i, j]
    ok = np.isfinite(x) & np.isfinite(y)
    rx, ry = rankdata(x[ok]), rankdata(y[ok])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def permutation_pvalue(model: np.ndarray, human: np.ndarray, n_perm: int, seed: int) -> float:
    """One-sided p-value of rho (H1: rho > 0), permuting the items of the model matrix (rows and
    columns together). Exact over all n! permutations when n! <= n_perm, otherwise Monte Carlo
    with the +1 correction (the observed order counts as one permutation)."""
    n = model.shape[0]
    obs = spearman_upper(model, human)
    if not math.isfinite(obs):  # a constant matrix has no rank order to test
        return float("nan")
    if math.factorial(n) <= n_perm:
        rhos = [
            spearman_upper(model[np.ix_(p, p)], human) for p in map(list, permutations(range(n)))
        ]
        return float(np.mean(np.array(rhos) >= obs - 1e-12))
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_perm):
        p = rng.permutation(n)
        hits += spearman_upper(model[np.ix_(p, p)], human) >= obs - 1e-12
    return (1 + hits) / (1 + n_perm)


def bootstrap_rsa(model: np.ndarray, human: np.ndarray, n_boot: int, seed: int) -> list[float]:
    """95% percentile interval of rho over resamples of items (pairs of an item with its own
    copy are left out)."""
    rng = np.random.default_rng(seed)
    n = model.shape[0]
    rhos = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        h = human[np.ix_(idx, idx)].copy()
        h[idx[:, None] == idx[None, :]] = np.nan
        rhos.append(spearman_upper(model[np.ix_(idx, idx)], h))
    rhos = np.array(rhos)
    rhos = rhos[np.isfinite(rhos)]
    return percentile_ci(rhos) if len(rhos) else [float("nan"), float("nan")]


def odd_one_out_accuracy(model: np.ndarray, triplets: np.ndarray) -> float:
    """Fraction of triplets where the model's odd one (the item left out of its most similar
    pair) is the human's. Chance is 1/3."""
    a, b, c, odd = triplets.T
    pair_sim = np.stack([model[b, c], model[a, c], model[a, b]], axis=1)  # pair without a, b, c
    guess = np.stack([a, b, c], axis=1)[np.arange(len(a)), pair_sim.argmax(1)]
    return float(np.mean(guess == odd))


def rsa_report(
    model_sims: np.ndarray,
    human: np.ndarray,
    layer: int | None,
    n_perm: int,
    n_boot: int,
    seed: int,
    triplets: np.ndarray | None = None,
) -> dict:
    """RSA of per-layer model similarity matrices [L, n, n] against human [n, n].

    With `layer` given it is reported on all items. Otherwise the items are split in two halves
    (seeded): the layer with the highest rho on the first half is reported on the second, so
    the number is not inflated by the choice. Odd-one-out accuracy uses the triplets whose
    three items all lie in the reported items.
    """
    n = human.shape[0]
    per_layer = [spearman_upper(m, human) for m in model_sims]
    if layer is not None:
        if not -len(model_sims) <= layer < len(model_sims):
            raise ValueError(f"--layer {layer}: the model has layers 0..{len(model_sims) - 1}")
        layer, report = layer % len(model_sims), np.arange(n)
        choice = "prespecified (--layer)"
    else:
        if n < 6:
            raise ValueError(f"{n} items are too few to choose a layer on half; give --layer")
        perm = np.random.default_rng(seed).permutation(n)
        select, report = np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])
        on_select = [
            spearman_upper(m[np.ix_(select, select)], human[np.ix_(select, select)])
            for m in model_sims
        ]
        layer = int(np.nanargmax(on_select))
        choice = f"chosen on {len(select)} items, reported on the other {len(report)}"
    m, h = model_sims[layer][np.ix_(report, report)], human[np.ix_(report, report)]
    i, j = np.triu_indices(len(report), 1)
    out = {
        "layer": layer,
        "layer_choice": choice,
        "rho": spearman_upper(m, h),
        "p_value": permutation_pvalue(m, h, n_perm, seed),
        "ci95": bootstrap_rsa(m, h, n_boot, seed),
        "items": int(len(report)),
        "pairs": int(np.isfinite(h[i, j]).sum()),
        "per_layer_rho_all_items": per_layer,  # descriptive only: not for choosing a layer
    }
    if triplets is not None:
        pos = {int(k): r for r, k in enumerate(report)}
        kept = [t for t in triplets if all(int(x) in pos for x in t[:3])]
        if kept:
            local = np.array([[pos[int(x)] for x in t] for t in kept])
            out["odd_one_out"] = {
                "accuracy": odd_one_out_accuracy(m, local),
                "chance": 1 / 3,
                "triplets": len(kept),
            }
    return out


def plot_rsa_layers(report: dict, path: Path) -> None:
    """rho per layer on all items (descriptive), with the reported layer marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        report["per_layer_rho_all_items"], "o-", color="tab:gray", label="all items (descriptive)"
    )
    ax.errorbar(
        [report["layer"]],
        [report["rho"]],
        yerr=[[report["rho"] - report["ci95"][0]], [report["ci95"][1] - report["rho"]]],
        fmt="o",
        color="tab:red",
        label=f"reported ({report['layer_choice']})",
    )
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xticks(range(len(report["per_layer_rho_all_items"])))
    ax.set_xlabel("layer")
    ax.set_ylabel("Spearman rho (model vs human)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# L, g, V and the items they read
# --------------------------------------------------------------------------------------------


def load_projector(path: Path, device: torch.device) -> tuple[Projector, dict]:
    """g from a train_proj.py --out (projector.safetensors + projector.json: dims, lm, encoder,
    inject, task, context_turns, max_len)."""
    path = Path(path)
    file = path / "projector.safetensors" if path.is_dir() else path
    tensors, cfg = common.load_safetensors(file)
    missing = [k for k in ("in_dim", "out_dim", "depth", "hidden", "inject") if k not in cfg]
    if missing:
        raise ValueError(f"{file.with_suffix('.json')}: missing field(s) {missing}")
    g = Projector(cfg["in_dim"], cfg["out_dim"], cfg["depth"], cfg["hidden"])
    g.load_state_dict(tensors)
    return g.to(device).eval(), cfg


def rsa_items(
    index: list[dict],
    index_path: Path,
    tokenizer,
    data: Path | None,
    clip_index: dict,
    social: bool,
    spacy_model: str,
    max_len: int,
) -> list[TokenizedUtterance]:
    """One sequence per RSA item. Text and clip: the text, its nouns/verbs (spaCy) timed over the
    clip's frames; text alone: the text, no social tokens; clip alone: the clip's transcript
    from --data (earlier turns as context). `social`: tag content words (only needed when social
    tokens go in)."""
    by_clip: dict[str, list[dict]] = {}
    if any(it["clip_id"] for it in index):
        if data is None:
            clip = next(it for it in index if it["clip_id"])
            raise SystemExit(f"{index_path}: item {clip['item_id']!r} names a clip: give --data")
        for u in common.read_utterances(data):
            by_clip.setdefault(u["clip_id"], []).append(u)
    texts = [it["text"] for it in index if it["text"] and it["clip_id"]]
    tags = iter(common.PosTagger(spacy_model).tag(texts) if social and texts else [])
    items = []
    for it in index:
        clip, text = it["clip_id"], it["text"]
        if clip and clip not in clip_index:
            raise ValueError(f"{index_path}: item {it['item_id']!r}: clip {clip!r} has no frames")
        if not text:
            if clip not in by_clip:
                raise ValueError(
                    f"{index_path}: item {it['item_id']!r}: clip {clip!r} has no text here and "
                    f"no utterance in {data}/utterances.jsonl"
                )
            turns = sorted(by_clip[clip], key=lambda u: u.get("turn", 0))
            items.append(common.tokenize_utterance(tokenizer, turns[-1], turns[:-1], max_len))
            continue
        words = []
        if clip and social:
            times = clip_index[clip][1]
            words = next(tags)
            spans = [(w["char_start"], w["char_end"]) for w in words]
            t, _ = common.word_times(spans, len(text), start=times[0], end=times[-1])
            words = [{**w, "t_sec": tw} for w, tw in zip(words, t, strict=True)]
        utt = {"clip_id": clip, "text": text, "words": words, "turn": it["item_id"]}
        items.append(common.tokenize_utterance(tokenizer, utt, max_len=max_len))
    return items


class FrameRows:
    """frames[rows] read slice by slice, so that only the frames in use leave the memmap."""

    def __init__(self, frames: np.ndarray, rows: np.ndarray):
        self.frames, self.rows = frames, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, s: slice) -> np.ndarray:
        return self.frames[self.rows[s]]


class Social:
    """The social vectors of every condition for a batch of items: g on V's [CLS] of the frame
    nearest each content word (own clip), of the donor clip's frame at the same time
    (`shuffled`), or zeros (`zero`). The controls use the trained layout `layout`, so they sit
    at the same positions as the real vectors."""

    def __init__(
        self,
        g: Projector,
        feats: torch.Tensor,
        rows: np.ndarray,
        clip_index: dict,
        layout: str,
        donors: dict[str, str] | None = None,
    ):
        self.g, self.feats, self.clip_index, self.layout = g, feats, clip_index, layout
        self.donors = donors or {}
        self.lookup = {int(r): k for k, r in enumerate(rows)}  # frame-store row -> row of feats

    def vectors(
        self, items: Sequence[TokenizedUtterance], condition: str
    ) -> tuple[str, torch.Tensor | None]:
        """(inject mode, soc_l [n_words, D]) for `common.insert_social_tokens`."""
        if condition == "none":
            return "none", None
        inject = self.layout if condition in ("zero", "shuffled") else condition
        if condition == "zero":
            n = sum(len(it.t_p) for it in items)
            return inject, self.feats.new_zeros(n, self.g.config["out_dim"])
        shuffled = condition == "shuffled"  # frames of the donor clip at the same times
        rows = [
            common.word_frames(it, self.clip_index, self.donors[it.clip_id] if shuffled else None)
            for it in items
            if len(it.t_p)
        ]
        flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        pos = torch.tensor([self.lookup[int(r)] for r in flat], dtype=torch.long)
        return inject, self.g(self.feats[pos.to(self.feats.device)])


def build_social(
    g: Projector,
    V: torch.nn.Module,
    data: Path,
    clip_index: dict,
    clips: Sequence[str],
    layout: str,
    donors: dict[str, str] | None,
    device: torch.device,
    batch_size: int,
) -> Social:
    """V's [CLS] v_j of the frames of `clips` (from train_proj.py's feature cache when it holds
    this V on this frame store, else encoded once here), wrapped with g."""
    rows = np.unique(np.concatenate([clip_index[c][0] for c in clips]))
    cache = common.features_path(V, data)
    if cache.exists():
        feats = torch.from_numpy(np.load(cache, mmap_mode="r")[rows])
    else:
        frames = FrameRows(common.open_frames(data), rows)
        feats = common.encode_frames(V, frames, batch_size, device)
    return Social(g, feats.to(device), rows, clip_index, layout, donors)


def shuffle_donors(clips: Sequence[str], seed: int) -> dict[str, str]:
    """The clip each held-out clip takes its frames from in the `shuffled` control."""
    clips = sorted(clips)
    return {c: clips[k] for c, k in zip(clips, derangement(len(clips), seed), strict=True)}


# --------------------------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------------------------


def build_batch(
    L: torch.nn.Module, items: Sequence[TokenizedUtterance], social: Social | None, condition: str
) -> SocialBatch:
    """L's input for `items` under `condition` (common.insert_social_tokens)."""
    inject, soc_l = social.vectors(items, condition) if social else ("none", None)
    return common.insert_social_tokens(items, soc_l, L.get_input_embeddings(), inject)


def decode(L: torch.nn.Module, batch: SocialBatch, **flags):
    """L's decoder on an inserted batch; flags: output_attentions, output_hidden_states."""
    return L.get_decoder()(
        inputs_embeds=batch.inputs_embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        **flags,
    )


@torch.no_grad()
def run_ppl(
    L: torch.nn.Module,
    items: Sequence[TokenizedUtterance],
    social: Social | None,
    conditions: Sequence[str],
    batch_size: int,
    device: torch.device,
    steps: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """Per-utterance summed NLL and scored tokens of `items` under every condition (batches
    sorted by length for little padding; `steps` > 0 keeps the first batches only).
    Returns (nll, tokens, seconds), arrays in item order."""
    from tqdm import tqdm

    lengths = [common.social_length(it, "full") for it in items]
    order = np.argsort(lengths, kind="stable")
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    batches = batches[:steps] if steps else batches
    nll = {c: torch.zeros(len(items), dtype=torch.float64, device=device) for c in conditions}
    tok = {c: torch.zeros(len(items), dtype=torch.long, device=device) for c in conditions}
    common.sync(device)
    t0 = time.perf_counter()
    for idx in tqdm(batches, desc="perplexity", disable=len(batches) < 5):
        part = [items[i] for i in idx]
        where = torch.from_numpy(idx).to(device)
        for c in conditions:
            with common.autocast(device):
                nll[c][where], tok[c][where] = utterance_nll(L, build_batch(L, part, social, c))
    common.sync(device)
    seconds = time.perf_counter() - t0
    done = np.sort(np.concatenate(batches)) if batches else np.zeros(0, np.int64)
    return (
        {c: v.cpu().numpy()[done] for c, v in nll.items()},
        {c: v.cpu().numpy()[done] for c, v in tok.items()},
        seconds,
    )


def token_labels(tokenizer, item: TokenizedUtterance, roles: torch.Tensor) -> list[str]:
    """Readable label of every position of one inserted sequence (padding dropped)."""
    text = iter(tokenizer.convert_ids_to_tokens(item.input_ids.tolist()))
    names = {SOC_G: "[SOC-G]", SOC_L: "[SOC-L]"}
    return [names[r] if r in names else next(text) for r in roles.tolist() if r != PAD]


@torch.no_grad()
def run_attention(
    L: torch.nn.Module,
    tokenizer,
    items: Sequence[TokenizedUtterance],
    social: Social,
    n_examples: int,
    batch_size: int,
    top_k: int,
    device: torch.device,
) -> tuple[dict, dict[str, np.ndarray], list[str]]:
    """Attention shares of text queries on [SOC-G], [SOC-L], BOS and text (per layer and head)
    with the real social vectors (trained layout) and with zero vectors at the same positions.
    Eager attention, only here: it is the implementation that returns the probabilities.
    Returns (attention.json body, heatmaps of the first example per condition, its tokens)."""
    chosen = [it for it in items if len(it.t_p)][:n_examples]
    if not chosen:
        raise SystemExit("attention: no held-out utterance has a content word (no social token)")
    conds = (social.layout, "zero")
    sums = dict.fromkeys(conds, 0.0)
    rows = dict.fromkeys(conds, 0)
    heat, tokens = {}, []
    before = L.config._attn_implementation
    L.set_attn_implementation("eager")
    try:
        for s in range(0, len(chosen), batch_size):
            part = chosen[s : s + batch_size]
            for c in conds:
                with common.autocast(device):
                    batch = build_batch(L, part, social, c)
                    out = decode(L, batch, output_attentions=True)
                sm, n = attention_share_sums(out.attentions, batch.roles)
                sums[c], rows[c] = sums[c] + sm, rows[c] + n
                if s == 0:
                    real = batch.roles[0] != PAD
                    one = [a[:1][..., real][..., real, :] for a in out.attentions]
                    heat[c] = received_attention(one, batch.roles[:1, real]).numpy()
                    tokens = token_labels(tokenizer, part[0], batch.roles[0])
    finally:
        L.set_attn_implementation(before)
    shares = {c: (sums[c] / rows[c]).numpy() for c in conds}
    report = {
        "examples": len(chosen),
        "layout": social.layout,
        "baseline": "zero: social vectors set to 0 at the same positions",
        "groups": list(GROUP_NAMES),
        "query_rows": rows,
        "conditions": {
            c: {
                "mean": {g: float(shares[c][..., k].mean()) for k, g in enumerate(GROUP_NAMES)},
                "per_layer": shares[c].mean(axis=1).tolist(),
                "per_layer_head": shares[c].tolist(),
            }
            for c in conds
        },
        "top_heads": top_heads(shares[social.layout], shares["zero"], top_k),
        "example": {"clip_id": chosen[0].clip_id, "tokens": tokens},
    }
    return report, heat, tokens


@torch.no_grad()
def pooled_states(
    L: torch.nn.Module,
    items: Sequence[TokenizedUtterance],
    social: Social | None,
    inject: str,
    pool: str,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """Pooled hidden states of every item at every layer: [layers + 1, n_items, D] (index 0 =
    L's input embeddings, k = after block k)."""
    out = []
    for s in range(0, len(items), batch_size):
        part = items[s : s + batch_size]
        with common.autocast(device):
            batch = build_batch(L, part, social, inject)
            hidden = decode(L, batch, output_hidden_states=True).hidden_states
        out.append(torch.stack([pool_hidden(h, batch.roles, pool) for h in hidden]).cpu())
    return torch.cat(out, dim=1).numpy()


def run_rsa(
    args: argparse.Namespace,
    L: torch.nn.Module,
    items: Sequence[TokenizedUtterance],
    index: list[dict],
    social: Social | None,
    inject: str,
    device: torch.device,
) -> dict:
    """RSA of the items' pooled hidden states against each human target given (similarity
    matrix, odd-one-out triplets)."""
    ids = [it["item_id"] for it in index]
    if args.pool in ("only_soc", "locals_only"):
        local = inject in ("local", "full")
        has = [len(it.t_p) > 0 and (args.pool == "only_soc" or local) for it in items]
        if inject == "none" or not all(has):
            bad = ids[has.index(False)]
            raise SystemExit(
                f"--pool {args.pool} with --inject {inject}: item {bad!r} of {args.index} gets "
                f"no such social token (it needs a clip, a content word and social tokens)"
            )
    states = pooled_states(L, items, social, inject, args.pool, args.batch_size, device)
    sims = np.stack([model_similarity(x) for x in states])
    targets = []
    if args.sim_rsm:
        targets.append((f"sim-rsm {args.sim_rsm}", read_similarity_matrix(args.sim_rsm, ids), None))
    if args.triplets:
        trip = read_triplets(args.triplets, ids)
        targets.append((f"triplets {args.triplets}", triplet_similarity(trip, len(ids)), trip))
    results = []
    for name, human, trip in targets:
        rep = rsa_report(
            sims, human, args.layer, args.permutations, args.bootstrap, args.seed, trip
        )
        results.append({"human": name, **rep})
    return {
        "pool": args.pool,
        "inject": inject,
        "index": str(args.index),
        "items": len(ids),
        "similarity": "1 - correlation distance of pooled hidden states",
        "results": results,
    }


# --------------------------------------------------------------------------------------------
# Summary table
# --------------------------------------------------------------------------------------------


def _ci(ci: Sequence[float], fmt: str = ".2f") -> str:
    return f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _ppl_md(ppl: dict) -> list[str]:
    c = ppl["conditions"]
    lines = [
        f"## Perplexity ({ppl.get('split', 'held-out')} split, {ppl.get('utterances', '?')} "
        "utterances, 95% bootstrap CI over utterances)",
        "",
        "| condition | perplexity | 95% CI | minus none (95% CI) | tokens |",
        "|---|---:|---|---|---:|",
    ]
    for name, r in c.items():
        d = r.get("minus_none")
        diff = f"{d['ppl']:+.2f} {_ci(d['ci95'])}" if d else "—"
        lines.append(f"| {name} | {r['ppl']:.2f} | {_ci(r['ci95'])} | {diff} | {r['tokens']} |")
    if "visual_gain" in ppl:
        g = ppl["visual_gain"]
        ratios = f"full / shuffled = {c['full']['ppl'] / c['shuffled']['ppl']:.3f}"
        if "none" in c:
            ratios += f", full / none = {c['full']['ppl'] / c['none']['ppl']:.3f}"
        lines += [
            "",
            f"Visual gain (shuffled − full): **{g['ppl']:.2f}** {_ci(g['ci95'])}; {ratios}",
        ]
    return [*lines, ""]


def _attention_md(att: dict) -> list[str]:
    lines = [
        f"## Attention of text queries ({att['examples']} examples, mean over layers and heads; "
        f"{att['layout']}: real social vectors, zero: zero vectors at the same positions)",
        "",
        "| condition | " + " | ".join(GROUP_NAMES) + " |",
        "|---|" + "---:|" * len(GROUP_NAMES),
    ]
    for name, r in att["conditions"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['mean'][g]:.3f}" for g in GROUP_NAMES) + " |")
    lines += [
        "",
        "Heads attending most to [SOC-G] + [SOC-L]:",
        "",
        "| layer | head | social share | zero baseline | excess |",
        "|---:|---:|---:|---:|---:|",
    ]
    for h in att["top_heads"]:
        lines.append(
            f"| {h['layer']} | {h['head']} | {h['social_share']:.3f} | "
            f"{h['zero_baseline']:.3f} | {h['excess']:+.3f} |"
        )
    return [*lines, ""]


def _rsa_md(rsa: dict) -> list[str]:
    lines = [
        "## RSA against human similarity",
        "",
        "| human | pool | inject | layer | rho | 95% CI | p | items | pairs | odd-one-out |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rsa["results"]:
        ooo = r.get("odd_one_out")
        acc = f"{ooo['accuracy']:.3f} (n={ooo['triplets']})" if ooo else "—"
        lines.append(
            f"| {r['human']} | {rsa['pool']} | {rsa['inject']} | {r['layer']} | {r['rho']:.3f} | "
            f"{_ci(r['ci95'], '.3f')} | {r['p_value']:.4f} | {r['items']} | {r['pairs']} | {acc} |"
        )
    return [*lines, "", f"Layer: {rsa['results'][0]['layer_choice']}.", ""]


def summary_markdown(ppl: dict | None, attention: dict | None, rsa: dict | None) -> str:
    """A markdown digest of ppl.json, attention.json and rsa.json (those given)."""
    lines = ["# Evaluation summary", ""]
    for part, render in ((ppl, _ppl_md), (attention, _attention_md), (rsa, _rsa_md)):
        if part:
            lines += render(part)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parts_to_run(args: argparse.Namespace) -> list[str]:
    """The parts asked for (--what), or by default each part whose inputs are given."""
    need = {
        "ppl": (args.data is not None, "--data"),
        "attention": (args.data is not None and args.projector is not None, "--data, --projector"),
        "rsa": (
            args.index is not None and (args.sim_rsm or args.triplets) is not None,
            "--index with --sim-rsm or --triplets",
        ),
    }
    if args.what is None:
        parts = [p for p, (ok, _) in need.items() if ok]
        for p, (ok, flags) in need.items():
            if not ok:
                print(f"evaluate: {p} skipped (needs {flags})")
        if not parts:
            raise SystemExit("evaluate: nothing to do: give --data (and --projector) or --index")
        return parts
    parts = [p.strip() for p in args.what.split(",") if p.strip()]
    for p in parts:
        if p not in need:
            raise SystemExit(f"--what: unknown part {p!r}; expected ppl, attention, rsa")
        if not need[p][0]:
            raise SystemExit(f"--what {p} needs {need[p][1]}")
    return parts


@dataclass
class Setup:
    """What the parts share: L, g (wrapped in `social`), the held-out items and the RSA items."""

    L: torch.nn.Module
    tokenizer: object
    lm: str
    layout: str  # the trained inject mode of g ("none" without a projector)
    conditions: list[str]
    items: list[TokenizedUtterance]
    skipped: list[dict]
    donors: dict[str, str] | None
    index: list[dict]
    rsa_items: list[TokenizedUtterance]
    rsa_inject: str
    social: Social | None
    device: torch.device


def set_up(args: argparse.Namespace, parts: list[str]) -> Setup:
    """Load L, g and V; tokenize the held-out utterances and the RSA items; encode their frames."""
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise SystemExit(f"--conditions: unknown {unknown}; expected some of {CONDITIONS}")
    device = torch.device(args.device)
    g, cfg = load_projector(args.projector, device) if args.projector else (None, {})
    lm = args.lm or cfg.get("lm") or common.EMBEDDED_LM
    L, tokenizer = common.load_lm(lm, device)
    if g is not None and cfg.get("lm_hidden", L.config.hidden_size) != L.config.hidden_size:
        raise SystemExit(
            f"{args.projector}: g was trained for an L of width {cfg['lm_hidden']}, "
            f"{lm} has {L.config.hidden_size}"
        )
    if g is None and "ppl" in parts and conditions != ["none"]:
        print("evaluate: no --projector: perplexity of L alone (condition none)")
        conditions = ["none"]
    layout = cfg.get("inject", "none")
    max_len = args.max_len or cfg.get("max_len", 256)
    rsa_inject = args.inject or layout
    if rsa_inject != "none" and g is None:
        raise SystemExit(f"--inject {rsa_inject} needs --projector (g makes the social tokens)")

    clip_index = common.clip_frame_index(common.read_manifest(args.data)) if args.data else {}
    items, skipped, donors = [], [], None
    if {"ppl", "attention"} & set(parts):
        utts = common.read_utterances(args.data, args.split)
        task, turns = cfg.get("task", "utterance"), cfg.get("context_turns", 3)
        items, skipped = common.tokenize_split(utts, tokenizer, clip_index, task, turns, max_len)
        if not items:
            raise SystemExit(f"{args.data}: no usable utterance in split {args.split!r}")
        if "shuffled" in conditions and "ppl" in parts:
            try:
                donors = shuffle_donors({it.clip_id for it in items if len(it.t_p)}, args.seed)
            except ValueError as e:
                raise SystemExit(f"{args.data}, split {args.split!r}: {e}") from None
    index = read_index(args.index) if "rsa" in parts else []
    tagged = rsa_inject != "none"
    r_items = (
        rsa_items(
            index, args.index, tokenizer, args.data, clip_index, tagged, args.spacy_model, max_len
        )
        if index
        else []
    )
    social = None
    clips = sorted({it.clip_id for it in [*items, *r_items] if len(it.t_p)})
    if g is not None and clips:
        encoder = args.encoder or cfg.get("encoder")
        if encoder is None:
            raise SystemExit(f"{args.projector}: projector.json names no encoder: give --encoder")
        V, _ = common.load_encoder(encoder, device)
        social = build_social(
            g, V, args.data, clip_index, clips, layout, donors, device, args.batch_size
        )
    return Setup(
        L,
        tokenizer,
        lm,
        layout,
        conditions,
        items,
        skipped,
        donors,
        index,
        r_items,
        rsa_inject,
        social,
        device,
    )


def write_ppl(args: argparse.Namespace, s: Setup, out: Path) -> dict:
    """ppl.json: every condition on the held-out utterances, with intervals and the visual gain."""
    nll, tok, seconds = run_ppl(
        s.L, s.items, s.social, s.conditions, args.batch_size, s.device, args.steps
    )
    n = len(nll[s.conditions[0]])
    print(
        f"perplexity: {n} utterances x {len(s.conditions)} conditions in {seconds:.1f} s: "
        f"{n / seconds:.1f} utterances/s ({n * len(s.conditions) / seconds:.1f} forwards/s)"
    )
    report = ppl_report(nll, tok, args.bootstrap, args.seed)
    report.update(
        split=args.split,
        utterances=n,
        skipped=s.skipped,
        controls_layout=s.layout,
        donors=s.donors,
        lm=s.lm,
        projector=str(args.projector) if args.projector else None,
        bootstrap=args.bootstrap,
        seed=args.seed,
        utterances_per_s=n / seconds,
    )
    common.write_json(out / "ppl.json", report)
    return report


def write_attention(args: argparse.Namespace, s: Setup, out: Path) -> dict:
    """attention.json, the heatmap of one example and the per-layer plot."""
    report, heat, tokens = run_attention(
        s.L,
        s.tokenizer,
        s.items,
        s.social,
        args.attention_examples,
        args.batch_size,
        args.top_heads,
        s.device,
    )
    common.write_json(out / "attention.json", report)
    plot_attention_heatmaps(heat, tokens, out / "attention_example.png", "one held-out example")
    plot_layer_shares(
        {c: np.array(r["per_layer_head"]) for c, r in report["conditions"].items()},
        out / "attention_layers.png",
    )
    return report


def write_rsa(args: argparse.Namespace, s: Setup, out: Path) -> dict:
    """rsa.json and the per-layer rho plot."""
    report = run_rsa(args, s.L, s.rsa_items, s.index, s.social, s.rsa_inject, s.device)
    report.update(lm=s.lm, projector=str(args.projector) if args.projector else None)
    common.write_json(out / "rsa.json", report)
    plot_rsa_layers(report["results"][0], out / "rsa_layers.png")
    return report


def evaluate(args: argparse.Namespace) -> dict:
    """Run the parts asked for; write OUT/eval/*.json, the plots and summary.md."""
    parts = parts_to_run(args)
    common.seed_everything(args.seed)
    out = args.out / "eval"
    out.mkdir(parents=True, exist_ok=True)
    s = set_up(args, parts)
    writers = {"ppl": write_ppl, "attention": write_attention, "rsa": write_rsa}
    results = {p: writers[p](args, s, out) for p in parts}
    write_summary(out)
    return results


def write_summary(out: Path) -> None:
    """summary.md from the JSON files in `out` (parts run earlier included)."""
    loaded = {
        k: json.loads((out / f"{k}.json").read_text()) if (out / f"{k}.json").exists() else None
        for k in ("ppl", "attention", "rsa")
    }
    text = summary_markdown(loaded["ppl"], loaded["attention"], loaded["rsa"])
    common.atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(text))
    print(text)


def main(argv: list[str] | None = None) -> None:
    evaluate(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    main()
