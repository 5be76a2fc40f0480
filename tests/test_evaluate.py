"""evaluate.py: perplexity, intervals, controls, attention shares, RSA and its input files."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from functools import partial

import conftest
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import common
import evaluate as ev
import utils
from common import BOS, TEXT, TokenizedUtterance
from utils import read_utterances

# --------------------------------------------------------------------------------------------
# Tiny random Gemma 3 (the embedded model's class, a few thousand weights)
# --------------------------------------------------------------------------------------------


def tiny_gemma(vocab: int = 50, softcap: float | None = None, attn: str = "eager", **extra):
    """The tiny Gemma 3 with a small vocabulary."""
    return conftest.tiny_gemma(
        vocab, attn, max_position_embeddings=512, final_logit_softcapping=softcap, **extra
    )


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_run_ppl_equals_hand_computation(softcap):
    """Summed NLL per utterance from run_ppl (insert_social_tokens + token_nll) equals the paper's
    layout built by hand, one unpadded sequence at a time, scored with the model's full logits."""
    model = tiny_gemma(softcap=softcap)
    embed = model.get_input_embeddings()
    items = [  # (ids, score_from, t_p): two content words; none; one at the end with context
        TokenizedUtterance(np.array([2, 7, 9, 11, 4, 30]), 1, np.array([2, 4]), np.zeros(2), "a"),
        TokenizedUtterance(np.array([2, 5, 6]), 1, np.zeros(0, np.int64), np.zeros(0), "b"),
        TokenizedUtterance(np.array([2, 8, 12, 13]), 2, np.array([3]), np.zeros(1), "c"),
    ]
    torch.manual_seed(3)
    soc_l = torch.randn(3, 32)
    batches = [np.array([2, 0, 1])]  # run_ppl puts each utterance's sums back in item order

    def social(part, condition):
        assert condition == "full" and [it.clip_id for it in part] == ["c", "a", "b"]
        return "full", torch.cat([soc_l[2:], soc_l[:2]])  # part's words, in part order

    nll, tok, _ = ev.run_ppl(model, items, batches, ["full"], social, torch.device("cpu"))
    nll, tok = nll["full"], tok["full"]
    with torch.no_grad():
        hand_nll, hand_tok, row = [], [], 0
        for it in items:
            w = len(it.t_p)
            local = soc_l[row : row + w]
            row += w
            seq, scored = [embed(torch.tensor([it.input_ids[0]]))[0]], [None]
            if w:
                seq.append(local.mean(0))  # [SOC-G] right after BOS
                scored.append(None)
            for j in range(1, len(it.input_ids)):
                seq.append(embed(torch.tensor([it.input_ids[j]]))[0])
                scored.append(int(it.input_ids[j]) if j >= it.score_from else None)
                if j in it.t_p.tolist():  # [SOC-L] right after the word's last token
                    seq.append(local[it.t_p.tolist().index(j)])
                    scored.append(None)
            logits = model(inputs_embeds=torch.stack(seq)[None]).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            terms = [-logp[q - 1, t].item() for q, t in enumerate(scored) if t is not None]
            hand_nll.append(sum(terms))
            hand_tok.append(len(terms))
    assert tok.tolist() == hand_tok == [5, 2, 2]
    np.testing.assert_allclose(nll, hand_nll, rtol=1e-5)
    expect = math.exp(sum(hand_nll) / sum(hand_tok))
    assert ev.perplexity(nll, tok) == pytest.approx(expect, rel=1e-5)


def test_logit_lens_equals_hand_computation():
    """Per layer, the mean probability over [SOC-L] positions of what L's final norm and head read
    there: the hand version runs each sequence alone and takes the last layer from L's logits."""
    from types import SimpleNamespace

    model = tiny_gemma(softcap=3.0)
    torch.nn.init.normal_(model.model.norm.weight)  # the final norm must count
    embed = model.get_input_embeddings()
    items = [
        TokenizedUtterance(np.array([2, 7, 9, 11, 4, 30]), 1, np.array([2, 4]), np.zeros(2), "a"),
        TokenizedUtterance(np.array([2, 8, 12, 13]), 2, np.array([3]), np.zeros(1), "c"),
    ]
    soc_l = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    tokenizer = SimpleNamespace(convert_ids_to_tokens=lambda ids: [f"t{i}" for i in ids])
    social = lambda part, c: ("local", soc_l)  # noqa: E731
    lens = ev.logit_lens(model, tokenizer, items, social, "local", 2, 4, torch.device("cpu"))
    with torch.no_grad():
        probs, row = 0, 0
        for it in items:
            seq, where = list(embed(torch.tensor(it.input_ids))), []
            for k, p in enumerate(it.t_p.tolist()):  # [SOC-L] after t_p; later ones shift by one
                seq.insert(p + 1 + k, soc_l[row + k])
                where.append(p + 1 + k)
            seq = torch.stack(seq)
            row += len(it.t_p)
            out = model(inputs_embeds=seq[None], output_hidden_states=True)
            z = [model.lm_head(model.model.norm(h[0])) for h in out.hidden_states[:-1]]
            z = [3.0 * torch.tanh(x / 3.0) for x in z] + [out.logits[0]]
            probs = probs + torch.stack([x.softmax(-1)[where] for x in z]).sum(1)
        probs /= row
    assert lens["positions"] == {"soc_l": 3} and len(lens["layers"]) == 3  # embeddings + 2
    for layer, p in zip(lens["layers"], probs, strict=True):
        top = p.topk(4)
        assert [t for t, _ in layer["soc_l"]] == [f"t{i}" for i in top.indices.tolist()]
        np.testing.assert_allclose([q for _, q in layer["soc_l"]], top.values, rtol=1e-4)


def test_compare_projectors_on_planted_pairs():
    """The same g on the same features agrees frame by frame (cosine 1); a g whose output layer
    is negated disagrees (cosine -1, norm ratio 1); frames are picked by row."""
    g = common.Projector(8, 16)
    flipped = common.Projector(8, 16)
    flipped.load_state_dict(
        {k: -v if k.startswith("net.2") else v for k, v in g.state_dict().items()}
    )
    feats = torch.randn(10, 8)
    same = ev.compare_projectors(g, feats, g, feats, torch.tensor([1, 4, 7]))
    assert same["frames"] == 3 and same["cosine"]["mean"] == pytest.approx(1.0, abs=1e-6)
    neg = ev.compare_projectors(g, feats, flipped, feats, torch.arange(10))
    assert neg["cosine"]["p95"] == pytest.approx(-1.0, abs=1e-6)
    assert neg["norm_ratio_b_over_a"] == pytest.approx(1.0, abs=1e-6)


def simulate(rng, n, mu):
    """n utterances with Poisson token counts; per-token NLL ~ Gamma with mean mu."""
    tok = rng.poisson(12, n) + 1
    nll = np.array([rng.gamma(2.0, mu / 2.0, t).sum() for t in tok])
    return nll, tok


def test_bootstrap_interval_covers_true_perplexity():
    rng = np.random.default_rng(0)
    mu = 1.5  # true ppl = exp(1.5): per-token NLL mean, independent of length
    covered = 0
    for run in range(100):
        nll, tok = simulate(rng, 150, mu)
        lo, hi = ev.percentile_ci(
            np.exp(ev.bootstrap_ratio(nll[None], tok[None], 300, seed=run))[0]
        )
        covered += lo <= math.exp(mu) <= hi
    assert covered >= 90


def test_paired_difference_and_visual_gain_cover_truth():
    """Two conditions on the same utterances: the paired interval of their difference covers the
    true difference, and ppl_report names it visual_gain when they are shuffled and full."""
    rng = np.random.default_rng(1)
    mu_s, mu_f = 1.2, 1.0
    covered = 0
    for run in range(100):
        tok = rng.poisson(12, 120) + 1
        common = np.array([rng.gamma(2.0, 0.25, t).sum() for t in tok])  # shared per utterance
        shuffled = common + np.array([rng.gamma(2.0, (mu_s - 0.5) / 2, t).sum() for t in tok])
        full = common + np.array([rng.gamma(2.0, (mu_f - 0.5) / 2, t).sum() for t in tok])
        rep = ev.ppl_report(
            {"shuffled": shuffled, "full": full}, {"shuffled": tok, "full": tok}, 300, run
        )
        lo, hi = rep["visual_gain"]["ci95"]
        assert rep["visual_gain"]["ppl"] == pytest.approx(
            rep["conditions"]["shuffled"]["ppl"] - rep["conditions"]["full"]["ppl"]
        )
        covered += lo <= math.exp(mu_s) - math.exp(mu_f) <= hi
    assert covered >= 90


def test_ppl_report_format():
    rng = np.random.default_rng(2)
    nll, tok = simulate(rng, 40, 2.0)
    factor = {"none": 1.0, "global": 0.9, "local": 0.85, "full": 0.7, "zero": 0.95, "shuffled": 0.8}
    conds = {c: nll * factor[c] for c in ev.CONDITIONS}
    rep = ev.ppl_report(conds, dict.fromkeys(conds, tok), 200, 0)
    assert set(rep) == {"conditions", "visual_gain"}
    assert list(rep["conditions"]) == list(ev.CONDITIONS)
    for c, r in rep["conditions"].items():
        assert r["ppl"] == pytest.approx(math.exp(conds[c].sum() / tok.sum()))
        assert r["ci95"][0] <= r["ppl"] <= r["ci95"][1]
        assert r["tokens"] == tok.sum()
        assert ("minus_none" in r) == (c != "none")
    # every utterance is lower than none by the same factor: the paired difference is < 0 surely
    assert rep["conditions"]["full"]["minus_none"]["ci95"][1] < 0
    assert rep["visual_gain"]["ci95"][0] > 0  # shuffled is worse than full on every utterance


def test_derangement_has_no_fixed_point_and_follows_the_seed():
    for n in (2, 3, 5, 17):
        for seed in range(30):
            p = ev.derangement(n, seed)
            assert sorted(p.tolist()) == list(range(n))
            assert not np.any(p == np.arange(n))
            assert np.array_equal(p, ev.derangement(n, seed))
    assert len({tuple(ev.derangement(8, s)) for s in range(20)}) > 10
    with pytest.raises(ValueError, match="at least 2 held-out clips"):
        ev.derangement(1, 0)


def test_visual_gain_is_taken_against_the_trained_layout():
    """g trained with --inject local: the controls sit at its [SOC-L] positions, so the visual
    gain and the controls' differences are against `local`, not `full`, and say so."""
    rng = np.random.default_rng(3)
    nll, tok = simulate(rng, 60, 2.0)
    factor = {"none": 1.0, "local": 0.8, "full": 0.6, "zero": 0.95, "shuffled": 0.9}
    conds = {c: nll * f for c, f in factor.items()}
    rep = ev.ppl_report(conds, dict.fromkeys(conds, tok), 200, 0, layout="local")
    c, gain = rep["conditions"], rep["visual_gain"]
    assert gain["against"] == "local"
    assert gain["ppl"] == pytest.approx(c["shuffled"]["ppl"] - c["local"]["ppl"])
    assert gain["ppl"] != pytest.approx(c["shuffled"]["ppl"] - c["full"]["ppl"])
    assert gain["ci95"][0] > 0  # shuffled is worse than local on every utterance
    zero = c["zero"]["minus_layout"]
    assert zero["against"] == "local" and zero["ci95"][0] > 0
    assert zero["ppl"] == pytest.approx(c["zero"]["ppl"] - c["local"]["ppl"])
    assert "minus_layout" not in c["full"] and "minus_layout" not in c["none"]
    md = ev.summary_markdown(ppl={**rep, "split": "val", "utterances": 60})
    assert "Visual gain (shuffled − local)" in md and "local / shuffled" in md
    assert "full / shuffled" not in md
    without = {k: conds[k] for k in ("none", "full", "shuffled")}
    rep = ev.ppl_report(without, dict.fromkeys(without, tok), 50, 0, layout="local")
    assert "visual_gain" not in rep  # the trained layout was not evaluated: no gain against it


def test_social_vectors_of_every_condition():
    """none: no vectors; global/local/full: g(v_j) of the own clip's frame nearest each word;
    zero: zeros and shuffled: g of the donor clip's frame at the same time, both in g's layout."""
    torch.manual_seed(0)
    g, feats = common.Projector(6, 8, 2, 16).eval(), torch.randn(6, 6)
    times = np.array([0.0, 1.0, 2.0])
    clip_index = {"a": (np.array([0, 1, 2]), times), "b": (np.array([3, 4, 5]), times)}
    items = [  # words at 0.1 s and 1.9 s of clip a; none; one at 1.2 s of clip b
        TokenizedUtterance(np.arange(5), 1, np.array([1, 3]), np.array([0.1, 1.9]), "a"),
        TokenizedUtterance(np.arange(3), 1, np.zeros(0, np.int64), np.zeros(0), "b"),
        TokenizedUtterance(np.arange(4), 1, np.array([2]), np.array([1.2]), "b"),
    ]
    social = partial(ev.social_vectors, g, feats, clip_index, "local", {"a": "b", "b": "a"})
    assert social(items, "none") == ("none", None)
    with torch.no_grad():
        for condition in ("global", "local", "full"):
            inject, soc_l = social(items, condition)
            assert inject == condition
            torch.testing.assert_close(soc_l, g(feats[[0, 2, 4]]))
        inject, soc_l = social(items, "shuffled")
        assert inject == "local"
        torch.testing.assert_close(soc_l, g(feats[[3, 5, 1]]))
        inject, soc_l = social(items, "zero")
        assert inject == "local" and soc_l.shape == (3, 8) and not soc_l.any()
        # items without content words need no features (text-only RSA items with a projector)
        no_feats = partial(ev.social_vectors, g, None, clip_index, "full", None)
        for condition in ("full", "zero", "shuffled"):
            inject, soc_l = no_feats(items[1:2], condition)
            assert inject == "full" and soc_l.shape == (0, 8)
        batch = common.insert_social_tokens(items[1:2], soc_l, torch.nn.Embedding(9, 8), inject)
        assert (batch.roles == TEXT).sum() + (batch.roles == BOS).sum() == 3


def test_steps_take_a_seeded_random_subset_not_the_shortest():
    """--steps N evaluates N batches of a seeded random subset of the utterances (then batched by
    length), not the N·batch_size shortest."""
    lengths = np.random.default_rng(0).permutation(np.arange(5, 65))  # 60 distinct lengths
    none = np.zeros(0, np.int64)
    items = [TokenizedUtterance(np.arange(n), 1, none, np.zeros(0), "c") for n in lengths]
    batches = ev.length_batches(items, 4, steps=3, seed=1)
    chosen = np.concatenate(batches)
    assert [len(b) for b in batches] == [4, 4, 4] and len(set(chosen.tolist())) == 12
    assert set(chosen.tolist()) != set(np.argsort(lengths)[:12].tolist())
    assert lengths[chosen].max() > np.sort(lengths)[11]  # not only the 12 shortest
    assert lengths[chosen].tolist() == sorted(lengths[chosen].tolist())  # batched by length
    again = ev.length_batches(items, 4, steps=3, seed=1)
    assert [b.tolist() for b in again] == [b.tolist() for b in batches]  # the seed fixes it
    other = np.concatenate(ev.length_batches(items, 4, steps=3, seed=2))
    assert set(other.tolist()) != set(chosen.tolist())
    mean = np.mean(
        [lengths[np.concatenate(ev.length_batches(items, 4, 3, s))].mean() for s in range(200)]
    )
    assert abs(mean - lengths.mean()) < 1.5  # unbiased: the subsets' mean length is the data's
    for steps in (0, 100):  # all of them, each once
        everything = np.concatenate(ev.length_batches(items, 4, steps, seed=1))
        assert sorted(everything.tolist()) == list(range(60))


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


def test_attention_shares_sum_to_one_per_query_row():
    model = tiny_gemma(attn="eager")
    # [BOS, SOC-G, t, t, SOC-L, t, pad, pad] and [BOS, SOC-G, t, SOC-L, t, SOC-L, t, t]
    group = torch.tensor(
        [
            [ev.BOS, ev.SOC_G, ev.TEXT, ev.TEXT, ev.SOC_L, ev.TEXT, ev.PAD, ev.PAD],
            [ev.BOS, ev.SOC_G, ev.TEXT, ev.SOC_L, ev.TEXT, ev.SOC_L, ev.TEXT, ev.TEXT],
        ]
    )
    mask = (group != ev.PAD).long()
    torch.manual_seed(1)
    embeds = torch.randn(2, 8, 32)
    with torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=mask, output_attentions=True)
    for a in out.attentions:
        mass = ev.attention_mass(a, group)
        rows = mass.sum(-1)  # [B, H, Q]
        real = (group != ev.PAD)[:, None, :].expand_as(rows)
        np.testing.assert_allclose(rows[real].numpy(), 1.0, atol=1e-5)
        # causal: the first text query (position 2) cannot see the SOC-L at position 4
        assert mass[0, :, 2, ev.SOC_L].abs().max() < 1e-7
    sums, n_rows = ev.attention_share_sums(out.attentions, group)
    assert n_rows == 7
    np.testing.assert_allclose((sums / n_rows).sum(-1).numpy(), 1.0, atol=1e-5)
    heat = ev.received_attention([a[1:] for a in out.attentions], group[1:])
    assert heat.shape == (2, 8)
    np.testing.assert_allclose(heat.sum(1).numpy(), 1.0, atol=1e-5)  # every row a distribution


def test_top_heads_rank_by_social_share_and_report_excess():
    shares = np.zeros((2, 3, 4))
    shares[..., ev.TEXT] = 1.0
    shares[1, 2, [ev.SOC_G, ev.SOC_L]] = [0.4, 0.2]
    shares[0, 1, ev.SOC_G] = 0.3
    base = np.zeros_like(shares)
    base[1, 2, ev.SOC_G] = 0.5
    heads = ev.top_heads(shares, base, 2)
    assert [(h["layer"], h["head"]) for h in heads] == [(1, 2), (0, 1)]
    assert heads[0]["social_share"] == pytest.approx(0.6)
    assert heads[0]["excess"] == pytest.approx(0.1)
    assert heads[1]["excess"] == pytest.approx(0.3)


def test_plots_are_written(tmp_path):
    rng = np.random.default_rng(0)
    ev.plot_attention_heatmaps(
        {"full": rng.random((3, 5)), "zero": rng.random((3, 5))},
        ["<bos>", "[SOC-G]", "a", "b", "[SOC-L]"],
        tmp_path / "heat.png",
        "example",
    )
    lines = {f"soc_l ({c})": (rng.random(3), style, "tab:blue") for c, style in [("full", "-")]}
    lines["zero"] = (rng.random(3), "o-", None)
    ev.plot_layers(tmp_path / "layers.png", "share of attention", lines)
    assert (tmp_path / "heat.png").stat().st_size > 1000
    assert (tmp_path / "layers.png").stat().st_size > 1000


# --------------------------------------------------------------------------------------------
# RSA statistics
# --------------------------------------------------------------------------------------------


def sym(rng, n):
    m = rng.random((n, n))
    return (m + m.T) / 2


def test_spearman_upper_equals_scipy_on_random_matrices():
    rng = np.random.default_rng(0)
    for n in (4, 9, 30):
        a, b = sym(rng, n), sym(rng, n)
        b[0, 1] = b[1, 0] = b[2, 3] = b[3, 2] = b[0, 2]  # ties
        iu = np.triu_indices(n, 1)
        assert ev.spearman_upper(a, b) == pytest.approx(spearmanr(a[iu], b[iu])[0], abs=1e-12)


def test_permutation_pvalue_exact_equals_enumeration_with_scipy():
    rng = np.random.default_rng(3)
    n = 6
    model, human = sym(rng, n), sym(rng, n)
    iu = np.triu_indices(n, 1)
    obs = spearmanr(model[iu], human[iu])[0]
    null = []
    for p in itertools.permutations(range(n)):
        mp = model[np.ix_(p, p)]
        null.append(spearmanr(mp[iu], human[iu])[0])
    expect = np.mean(np.array(null) >= obs - 1e-12)
    assert ev.permutation_pvalue(model, human, n_perm=1000, seed=0) == pytest.approx(expect)


def test_constant_model_matrix_gives_no_p_value():
    rng = np.random.default_rng(7)
    flat, human = np.ones((8, 8)), sym(rng, 8)
    assert math.isnan(ev.spearman_upper(flat, human))
    assert math.isnan(ev.permutation_pvalue(flat, human, n_perm=50, seed=0))


def test_permutation_pvalue_monte_carlo_agrees_with_independent_test():
    rng = np.random.default_rng(4)
    n = 12
    x = rng.normal(size=(n, 5))
    human = sym(rng, n) + 0.15 * np.corrcoef(x)  # weak shared structure: p neither 0 nor 1
    model = np.corrcoef(x + rng.normal(size=x.shape))
    iu = np.triu_indices(n, 1)
    obs = spearmanr(model[iu], human[iu])[0]
    own = np.random.default_rng(99)
    hits = sum(
        spearmanr(model[np.ix_(p, p)][iu], human[iu])[0] >= obs
        for p in (own.permutation(n) for _ in range(2000))
    )
    indep = (1 + hits) / 2001
    got = ev.permutation_pvalue(model, human, n_perm=2000, seed=1)
    se = math.sqrt(indep * (1 - indep) / 2000) + 1e-3
    assert abs(got - indep) < 5 * se


def planted(rng, n=24, k=4, dims=16, layers=4, good=2):
    """Items in k clusters; human similarity follows the clusters; only layer `good` sees them."""
    labels = np.arange(n) % k
    human = (labels[:, None] == labels[None, :]).astype(float) + 0.3 * sym(rng, n)
    centers = rng.normal(size=(k, dims))
    feats = [rng.normal(size=(n, dims)) for _ in range(layers)]
    feats[good] = centers[labels] + 0.5 * rng.normal(size=(n, dims))
    return np.stack([ev.model_similarity(f) for f in feats]), human, labels


def test_planted_structure_is_found_and_layer_chosen_on_the_other_half():
    rng = np.random.default_rng(5)
    sims, human, _ = planted(rng)
    rep = ev.rsa_report(sims, human, layer=None, n_perm=500, n_boot=200, seed=0)
    assert rep["layer"] == 2
    assert rep["items"] == 12 and rep["pairs"] == 66
    assert rep["rho"] > 0.4 and rep["p_value"] <= 0.01
    assert 0 < rep["ci95"][0] <= rep["rho"] <= rep["ci95"][1]
    pre = ev.rsa_report(sims, human, layer=1, n_perm=200, n_boot=100, seed=0)
    assert pre["layer"] == 1 and pre["items"] == 24 and pre["p_value"] > 0.01
    with pytest.raises(ValueError, match="--layer 9"):
        ev.rsa_report(sims, human, layer=9, n_perm=10, n_boot=10, seed=0)


def test_model_similarity_is_one_minus_correlation_distance():
    from scipy.spatial.distance import cdist

    x = np.random.default_rng(6).normal(size=(5, 7))
    np.testing.assert_allclose(ev.model_similarity(x), 1 - cdist(x, x, "correlation"), atol=1e-12)


def test_triplet_similarity_hand_example():
    # items 0..3; (0,1,2) odd 2 -> 0,1 kept; (0,1,3) odd 0 -> 1,3 kept; (0,2,3) odd 3 -> 0,2 kept
    trip = np.array([[0, 1, 2, 2], [0, 1, 3, 0], [0, 2, 3, 3]])
    sim = ev.triplet_similarity(trip, 4)
    nan = np.nan
    expect = np.array(
        [
            [nan, 1 / 2, 1 / 2, 0 / 2],
            [1 / 2, nan, 0 / 1, 1 / 1],
            [1 / 2, 0 / 1, nan, 0 / 1],
            [0 / 2, 1 / 1, 0 / 1, nan],
        ]
    )
    np.testing.assert_allclose(sim, expect)
    sim5 = ev.triplet_similarity(trip, 5)  # item 4 never shown: NaN, left out of the RSA
    assert np.isnan(sim5[4]).all()


def test_odd_one_out_accuracy_hand_example():
    model = np.array(
        [[1.0, 0.9, 0.1, 0.2], [0.9, 1.0, 0.3, 0.0], [0.1, 0.3, 1.0, 0.8], [0.2, 0.0, 0.8, 1.0]]
    )
    trip = np.array([[0, 1, 2, 2], [1, 2, 3, 1], [0, 2, 3, 2]])  # right, right, wrong (odd 0)
    assert ev.odd_one_out_accuracy(model, trip) == pytest.approx(2 / 3)


def test_pool_hidden_modes():
    g = torch.tensor([[ev.BOS, ev.SOC_G, ev.TEXT, ev.SOC_L, ev.TEXT, ev.PAD]])
    h = torch.arange(6, dtype=torch.float32).view(1, 6, 1).repeat(1, 1, 2)
    expect = {"all": 2.5, "exclude_soc": 3.0, "only_soc": 2.0, "locals_only": 3.0, "eos": 4.0}
    for mode, v in expect.items():
        assert ev.pool_hidden(h, g, mode).tolist() == [[v, v]], mode
    with pytest.raises(ValueError, match="no position to pool"):
        ev.pool_hidden(
            h, torch.tensor([[ev.BOS, ev.TEXT, ev.TEXT, ev.PAD, ev.PAD, ev.PAD]]), "only_soc"
        )


# --------------------------------------------------------------------------------------------
# RSA files
# --------------------------------------------------------------------------------------------


def write(path, text):
    path.write_text(text)
    return path


def test_rsa_files_read_in_index_order(tmp_path):
    idx = write(tmp_path / "idx.csv", "item_id,clip_id,text\na,c1,\nb,,a man waves\nc,c2,hi\n")
    items = ev.read_index(idx)
    ids = [i["item_id"] for i in items]
    assert ids == ["a", "b", "c"] and items[1]["clip_id"] == "" and items[0]["text"] == ""
    rsm = write(tmp_path / "h.csv", "item_id,c,a,b\nb,0.2,0.5,1\na,0.1,1,0.5\nc,1,0.1,0.2\n")
    np.testing.assert_allclose(
        ev.read_similarity_matrix(rsm, ids), [[1, 0.5, 0.1], [0.5, 1, 0.2], [0.1, 0.2, 1]]
    )
    trip = write(tmp_path / "t.csv", "item_a,item_b,item_c,odd\na,b,c,c\nc,a,b,a\n")
    assert ev.read_triplets(trip, ids).tolist() == [[0, 1, 2, 2], [2, 0, 1, 0]]


@pytest.mark.parametrize(
    "text, match",
    [
        ("item_id,c1,c2\n", r"lacks (column\(s\) )?\['clip_id', 'text'\]"),
        ("item_id,clip_id,text\na,c,\nb,,\nc,c,t\n", r"line 3: item 'b' has neither"),
        ("item_id,clip_id,text\na,c,\nb,c,\na,c,t\n", r"line 4: item_id 'a' repeats line 2"),
        ("item_id,clip_id,text\na,c,\nb,c,\n", "2 item"),
    ],
)
def test_bad_index_files(tmp_path, text, match):
    path = write(tmp_path / "idx.csv", text)
    with pytest.raises(ValueError, match=match) as e:
        ev.read_index(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "text, match",
    [
        ("item_id,a,b\na,1,0\nb,0,1\n", "column id 'c' is missing"),  # smaller than the index
        ("item_id,a,b,c,d\na,1,0,0,0\nb,0,1,0,0\nc,0,0,1,0\nd,0,0,0,1\n", "column id 'd' is not"),
        ("item_id,a,b,c\na,1,0,0\nb,0,1,0\nx,0,0,1\n", "row id 'x' is not in the index"),
        ("item_id,a,b,c\na,1,0,0\nb,0,1,0\nc,0,0,1\na,1,0,0\n", "row id 'a' appears more"),
        ("item_id,a,b,c\na,1,0,0\nb,0,1\nc,0,0,1\n", r"line 3 \(item 'b'\) has 2 values"),
        ("item_id,a,b,c\na,1,0,0\nb,0,1,zz\nc,0,0,1\n", "line 3, column 'c': 'zz' is not"),
        ("item_id,a,b,c\na,1,0.5,0\nb,0.4,1,0\nc,0,0,1\n", r"not symmetric: \('a', 'b'\)"),
        ("id,a,b,c\na,1,0,0\n", "first header cell must be 'item_id'"),
    ],
)
def test_bad_similarity_matrices(tmp_path, text, match):
    path = write(tmp_path / "rsm.csv", text)
    with pytest.raises(ValueError, match=match) as e:
        ev.read_similarity_matrix(path, ["a", "b", "c"])
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "text, match",
    [
        ("item_a,item_b,item_c,odd\na,b,z,a\n", "line 2: item id 'z' is not in the index"),
        ("item_a,item_b,item_c,odd\na,b,c,a\na,b,c,d\n", "line 3: odd 'd' is not one of"),
        ("item_a,item_b,item_c,odd\na,a,c,a\n", "three different items"),
        ("item_a,item_b,odd\na,b,a\n", r"lacks (column\(s\) )?\['item_c'\]"),
    ],
)
def test_bad_triplet_files(tmp_path, text, match):
    path = write(tmp_path / "t.csv", text)
    with pytest.raises(ValueError, match=match) as e:
        ev.read_triplets(path, ["a", "b", "c", "d"])
    assert str(path) in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        ev.read_index(tmp_path / "nope.csv")


# --------------------------------------------------------------------------------------------
# End to end on the demo set: tiny L (word-level tokenizer), tiny V, a short train_proj run
# --------------------------------------------------------------------------------------------


def tiny_lm_dir(data, out):
    """A tiny random Gemma 3 with a word-level tokenizer over the demo's words (BOS first,
    character offsets), saved as a local folder that --lm accepts."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

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
    tiny_gemma(len(vocab), attn="sdpa", **ids).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """(data, projector dir, LM dir): g trained for a few steps by train_proj.py on the demo."""
    import train_proj

    root = tmp_path_factory.mktemp("eval_e2e")
    lm = tiny_lm_dir(demo_data, root / "lm")
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


def write_rsa_inputs(folder, data):
    """An index of demo clips (transcript), texts alone and texts with a clip; a random human
    matrix; random triplets."""
    clips = sorted({u["clip_id"] for u in utils.read_utterances(data)})
    rows = [(f"clip{k}", c, "") for k, c in enumerate(clips)]
    rows += [("t0", "", "a man waves"), ("t1", "", "the woman laughs at the man")]
    rows += [("x0", clips[0], "the red woman waves at the blue man")]
    ids = [r[0] for r in rows]
    rng = np.random.default_rng(0)
    human = sym(rng, len(ids))
    (folder / "index.csv").write_text(
        "item_id,clip_id,text\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows)
    )
    (folder / "human.csv").write_text(
        "item_id,"
        + ",".join(ids)
        + "\n"
        + "".join(
            f"{a}," + ",".join(f"{x:.6f}" for x in human[i]) + "\n" for i, a in enumerate(ids)
        )
    )
    trip = [rng.choice(len(ids), 3, replace=False) for _ in range(40)]
    (folder / "trip.csv").write_text(
        "item_a,item_b,item_c,odd\n"
        + "".join(",".join(ids[k] for k in t) + f",{ids[t[0]]}\n" for t in trip)
    )
    return len(ids)


def conds_of(ev_dir):
    return json.loads((ev_dir / "ppl.json").read_text())["conditions"]


def test_end_to_end_on_the_demo(trained, tmp_path):
    data, proj, _ = trained
    n_items = write_rsa_inputs(tmp_path, data)
    out = tmp_path / "out"
    args = ["--data", str(data), "--projector", str(proj), "--out", str(out), "--split", "train"]
    args += ["--bootstrap", "200", "--permutations", "100", "--device", "cpu"]
    args += ["--index", str(tmp_path / "index.csv"), "--sim-rsm", str(tmp_path / "human.csv")]
    args += ["--compare", str(proj)]  # g against itself: cosine 1 on every frame
    ev.main([*args, "--triplets", str(tmp_path / "trip.csv"), "--attention-examples", "8"])
    ev_dir = out / "eval"
    lens = json.loads((ev_dir / "logit_lens.json").read_text())
    assert len(lens["layers"]) == 3 and lens["positions"]["soc_l"] > lens["positions"]["soc_g"]
    assert all(len(r["soc_g"]) == 5 for r in lens["layers"])
    gen = json.loads((ev_dir / "generate.json").read_text())
    assert list(gen["conditions"]) == ["none", "full", "shuffled"] and "visual" in gen
    lines = (ev_dir / "generate.jsonl").read_text().splitlines()
    assert len(lines) == gen["utterances"] and "generation" in json.loads(lines[0])["full"]
    bias = json.loads((ev_dir / "bias.json").read_text())
    assert str(bias["alpha"]) in bias["val_ppl_by_alpha"] and len(bias["val_ppl_by_alpha"]) == 3
    b = bias["conditions"]
    assert b["none+bias"]["ppl"] == pytest.approx(b["none"]["ppl"])  # no [SOC-*]: no bias
    assert b["full"]["ppl"] == pytest.approx(conds_of(ev_dir)["full"]["ppl"], rel=1e-4)
    assert "minus_unbiased" in b["full+bias"] and "accuracy" in b["shuffled+bias"]
    assert len(bias["attention"]["full+bias"]["per_layer"]) == 2
    pair = json.loads((ev_dir / "compare.json").read_text())
    assert pair["cosine"]["p05"] == pytest.approx(1.0, abs=1e-5) and pair["frames"] > 0

    ppl = json.loads((ev_dir / "ppl.json").read_text())
    conds = ppl["conditions"]
    assert list(conds) == list(ev.CONDITIONS)
    for r in conds.values():
        assert r["ci95"][0] <= r["ppl"] <= r["ci95"][1]
        assert r["tokens"] == conds["none"]["tokens"] > 0  # the same text tokens scored
    gain = ppl["visual_gain"]
    assert gain["ppl"] == pytest.approx(conds["shuffled"]["ppl"] - conds["full"]["ppl"])
    assert gain["ci95"][0] <= gain["ppl"] <= gain["ci95"][1]
    assert conds["shuffled"]["ppl"] != conds["full"]["ppl"]  # other frames, other vectors
    donors = ppl["donors"]
    assert sorted(donors.values()) == sorted(donors) and all(k != v for k, v in donors.items())

    att = json.loads((ev_dir / "attention.json").read_text())
    for c in ("full", "zero"):
        shares = np.array(att["conditions"][c]["per_layer_head"])
        assert shares.shape == (2, 2, 4)
        np.testing.assert_allclose(shares.sum(-1), 1.0, atol=1e-5)
        assert shares[..., ev.SOC_G].min() > 0
    assert len(att["top_heads"]) == 4 and "[SOC-G]" in att["example"]["tokens"]

    rsa = json.loads((ev_dir / "rsa.json").read_text())
    assert rsa["items"] == n_items and rsa["inject"] == "full"
    assert [r["human"].split()[0] for r in rsa["results"]] == ["sim-rsm", "triplets"]
    assert len(rsa["results"][0]["per_layer_rho_all_items"]) == 3  # embeddings + 2 blocks
    summary = (ev_dir / "summary.md").read_text()
    assert "Visual gain" in summary and "| shuffled |" in summary and "RSA" in summary
    assert "Logit lens" in summary and "Two projectors" in summary and "Decoding" in summary
    assert "attention bias" in summary
    pngs = ("ppl.png", "attention_example.png", "attention_layers.png", "rsa_layers.png")
    for png in (*pngs, "bias_attention.png"):
        assert (ev_dir / png).stat().st_size > 1000


def test_projector_and_encoder_move_together(trained, tmp_path):
    """projector.json names its V relative to its own folder: copied elsewhere side by side,
    evaluate still finds the V that g saw."""
    _, proj, _ = trained
    for name in ("proj", "enc"):
        shutil.copytree(proj.parent / name, tmp_path / name)
    _, cfg = ev.load_projector(tmp_path / "proj", torch.device("cpu"))
    assert cfg["encoder"] == os.path.normpath(tmp_path / "enc")


def test_one_example_beside_a_jpeg(trained, tmp_path):
    """--text with --frame: the sequence with its social tokens, per-token losses with and
    without them, the heatmap, and a continuation under both, from a JPEG on disk."""
    from PIL import Image

    data, proj, _ = trained
    jpeg = tmp_path / "frame.jpg"
    Image.fromarray(np.asarray(utils.open_frames(data)[3])).save(jpeg)
    text = "The red woman waves at the blue man."
    ev.main(["--projector", str(proj), "--out", str(tmp_path), "--text", text, "--frame", str(jpeg),
             "--device", "cpu"])  # fmt: skip
    view = json.loads((tmp_path / "eval" / "example.json").read_text())
    seq = view["sequence"]
    assert seq[:2] == ["<bos>", "[SOC-G]"] and seq.count("[SOC-L]") == len(view["content_words"])
    assert seq[seq.index("waves") + 1] == "[SOC-L]"  # right after the verb
    assert len(view["loss"]["none"]) == len(view["loss"]["full"]) == len(view["loss"]["token"])
    assert view["loss"]["none"] != view["loss"]["full"] and set(view["continuation"]) == {
        "none", "full"}  # fmt: skip
    assert (tmp_path / "eval" / "example_attention.png").stat().st_size > 1000


def test_full_condition_reproduces_train_proj_validation(trained, tmp_path):
    """On the val split the trained layout's perplexity is train_proj.py's val_ppl; with one
    val clip the shuffled control has no other clip to take frames from: a clear error."""
    data, proj, _ = trained
    cfg = json.loads((proj / "projector.json").read_text())
    args = ["--data", str(data), "--projector", str(proj), "--out", str(tmp_path), "--what", "ppl"]
    args += ["--split", "val", "--bootstrap", "50", "--device", "cpu"]
    ev.main([*args, "--conditions", "none,full"])
    ppl = json.loads((tmp_path / "eval" / "ppl.json").read_text())
    assert ppl["conditions"]["full"]["ppl"] == pytest.approx(cfg["val_ppl"], rel=1e-4)
    n_val_clips = len({u["clip_id"] for u in read_utterances(data, "val")})
    if n_val_clips == 1:
        with pytest.raises(
            SystemExit, match="needs at least 2 held-out clips with content words, got 1"
        ):
            ev.main(args)


def test_rsa_runs_on_text_alone_without_projector(trained, tmp_path):
    """RSA of plain text against human judgments: no projector, --inject none."""
    data, _, lm = trained
    write_rsa_inputs(tmp_path, data)
    args = ["--data", str(data), "--lm", str(lm), "--out", str(tmp_path), "--what", "rsa"]
    args += ["--index", str(tmp_path / "index.csv"), "--sim-rsm", str(tmp_path / "human.csv")]
    ev.main([*args, "--layer", "1", "--permutations", "50", "--bootstrap", "50"])
    rsa = json.loads((tmp_path / "eval" / "rsa.json").read_text())
    assert rsa["inject"] == "none" and rsa["results"][0]["layer"] == 1
    assert -1 <= rsa["results"][0]["rho"] <= 1
    with pytest.raises(SystemExit, match="--pool only_soc with --inject none"):
        ev.main([*args, "--pool", "only_soc"])


def test_unknown_clip_in_index_and_missing_inputs_are_named(demo_data, tmp_path):
    clip_index = utils.clip_frame_index(utils.read_manifest(demo_data))
    index = [{"item_id": "z9", "clip_id": "no_such_clip", "text": "hello"}]
    with pytest.raises(ValueError, match=r"idx.csv: item 'z9': clip 'no_such_clip' has no frames"):
        ev.rsa_items(index, tmp_path / "idx.csv", None, demo_data, clip_index, None, 64)
    with pytest.raises(SystemExit, match="--what attention needs --data, --projector"):
        ev.main(["--data", str(demo_data), "--what", "attention"])
    with pytest.raises(SystemExit, match="--what: unknown part 'plots'"):
        ev.main(["--data", str(demo_data), "--what", "ppl,plots"])


def saved_as(proj, folder, **fields):
    """A copy of a train_proj.py --out whose projector.json has `fields` (None: field removed)."""
    shutil.copytree(proj, folder)
    cfg = json.loads((folder / "projector.json").read_text())
    cfg["encoder"] = str((proj / cfg["encoder"]).resolve())  # absolute (older files): it moved
    cfg.update(fields)
    (folder / "projector.json").write_text(
        json.dumps({k: v for k, v in cfg.items() if v is not None})
    )
    return folder


def test_controls_use_the_trained_layout_end_to_end(trained, tmp_path):
    """g saved with --inject local: the controls sit at its [SOC-L] positions and the visual gain
    is shuffled - local, in ppl.json and summary.md; --steps evaluates steps·batch_size."""
    data, proj, _ = trained
    local = saved_as(proj, tmp_path / "proj", inject="local")
    args = ["--data", str(data), "--projector", str(local), "--out", str(tmp_path), "--what", "ppl"]
    ev.main([*args, "--split", "train", "--bootstrap", "100", "--device", "cpu"])
    ppl = json.loads((tmp_path / "eval" / "ppl.json").read_text())
    c, gain = ppl["conditions"], ppl["visual_gain"]
    assert ppl["controls_layout"] == "local" and gain["against"] == "local"
    assert gain["ppl"] == pytest.approx(c["shuffled"]["ppl"] - c["local"]["ppl"])
    assert c["zero"]["minus_layout"]["against"] == "local"
    assert c["zero"]["minus_layout"]["ppl"] == pytest.approx(c["zero"]["ppl"] - c["local"]["ppl"])
    assert "Visual gain (shuffled − local)" in (tmp_path / "eval" / "summary.md").read_text()
    ev.main([*args, "--split", "train", "--steps", "2", "--batch-size", "3", "--device", "cpu"])
    ppl = json.loads((tmp_path / "eval" / "ppl.json").read_text())
    assert ppl["utterances"] == 6 == ppl["conditions"]["none"]["utterances"] and ppl["steps"] == 2


def test_L_is_loaded_in_the_dtype_g_was_trained_against(trained, tmp_path, monkeypatch):
    """projector.json's lm_dtype picks L's dtype (bfloat16 even on the CPU), --lm-dtype overrides
    it, and ppl.json records it; without the field, load_lm's default (float32 on the CPU)."""
    data, proj, _ = trained
    assert json.loads((proj / "projector.json").read_text())["lm_dtype"] == "float32"
    loaded, load_lm = [], utils.load_lm

    def spy(*args, **kwargs):
        L, tokenizer = load_lm(*args, **kwargs)
        loaded.append(L)
        return L, tokenizer

    monkeypatch.setattr(utils, "load_lm", spy)
    args = ["--data", str(data), "--what", "ppl", "--conditions", "none,full", "--device", "cpu"]
    args += ["--bootstrap", "20"]
    for name, fields, flag, dtype in [
        ("bf16", {"lm_dtype": "bfloat16"}, [], torch.bfloat16),
        ("override", {"lm_dtype": "bfloat16"}, ["--lm-dtype", "float32"], torch.float32),
        ("absent", {"lm_dtype": None}, [], torch.float32),
    ]:
        g = saved_as(proj, tmp_path / name, **fields)
        ev.main([*args, "--projector", str(g), "--out", str(tmp_path / name), *flag])
        assert loaded[-1].dtype == dtype and next(loaded[-1].parameters()).dtype == dtype
        ppl = json.loads((tmp_path / name / "eval" / "ppl.json").read_text())
        assert ppl["lm_dtype"] == str(dtype).removeprefix("torch.")
        assert math.isfinite(ppl["conditions"]["full"]["ppl"])
    bad = saved_as(proj, tmp_path / "bad", lm_dtype="float16")
    with pytest.raises(ValueError, match=r"bad/projector.json: lm_dtype 'float16'"):
        ev.main([*args, "--projector", str(bad), "--out", str(tmp_path / "bad")])


def test_encoder_probe_reads_planted_features(tmp_path):
    """The probe finds a slot that the features encode (on held-out clips) and stays near chance
    on one they do not; scene_labels maps each frame to the scene it shows."""
    (tmp_path / "scenes.csv").write_text(
        "clip_id,start,end,actor,action,target,people\n"
        "c0,0.0,2.0,red man,waves at,blue man,x\nc0,2.0,4.0,blue man,cries,,x\n"
    )
    rows = [{"clip_id": "c0", "t_sec": t} for t in (0.5, 2.5, 4.5)]
    labels = ev.scene_labels(tmp_path / "scenes.csv", rows)
    assert [s and (s["actor"], s["target"]) for s in labels] == [
        ("red man", "blue man"), ("blue man", ""), None,
    ]  # fmt: skip
    rng = np.random.default_rng(0)
    n, actions = 240, ["wave", "hug", "cry", "jump"]
    action = rng.integers(0, 4, n)
    rows = [{"clip_id": f"c{k // 8}", "frame_idx": k, "t_sec": 0.0} for k in range(n)]
    for r in rows:
        r["split"] = "test" if int(r["clip_id"][1:]) % 5 == 0 else "train"
    labels = [
        {"actor": ["red", "blue"][k % 2], "action": actions[a], "target": ""}
        for k, a in enumerate(rng.permutation(action))  # actor and action both random...
    ]
    feats = torch.from_numpy(rng.normal(size=(n, 16))).float()
    for k, lab in enumerate(labels):  # ...but only the action is written into the features
        feats[k, actions.index(lab["action"])] += 4.0
    acc, chance, frames = ev.encoder_probe(feats, rows, labels, "test")
    assert frames == {"train": 192, "test": 48}
    assert acc["action"] > 0.9 and acc["target"] == chance["target"] == 1.0
    assert abs(acc["actor"] - 0.5) < 0.2 and chance["actor"] < 0.7
