"""evaluate.py: perplexity, intervals, controls, attention shares, decoding end to end."""

from __future__ import annotations

import json
import math
import os
import shutil
from functools import partial

import conftest
import numpy as np
import pytest
import torch

import common
import evaluate as ev
import utils
from common import BOS, PAD, SOC_G, SOC_L, TEXT, TokenizedUtterance
from utils import read_utterances

# --------------------------------------------------------------------------------------------
# Perplexity (L: conftest.small_gemma, the embedded model's class with a few thousand weights)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_run_ppl_equals_hand_computation(softcap):
    """Summed NLL per utterance from run_ppl (insert_social_tokens + token_nll) equals the paper's
    layout built by hand, one unpadded sequence at a time, scored with the model's full logits."""
    model = conftest.small_gemma(softcap=softcap)
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
        lo, hi = utils.percentile_ci(
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
    social = partial(common.social_vectors, g, feats, clip_index, "local", {"a": "b", "b": "a"})
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
        no_feats = partial(common.social_vectors, g, None, clip_index, "full", None)
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
    model = conftest.small_gemma(attn="eager")
    # [BOS, SOC-G, t, t, SOC-L, t, pad, pad] and [BOS, SOC-G, t, SOC-L, t, SOC-L, t, t]
    group = torch.tensor(
        [
            [BOS, SOC_G, TEXT, TEXT, SOC_L, TEXT, PAD, PAD],
            [BOS, SOC_G, TEXT, SOC_L, TEXT, SOC_L, TEXT, TEXT],
        ]
    )
    mask = (group != PAD).long()
    torch.manual_seed(1)
    embeds = torch.randn(2, 8, 32)
    with torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=mask, output_attentions=True)
    for a in out.attentions:
        mass = ev.attention_mass(a, group)
        rows = mass.sum(-1)  # [B, H, Q]
        real = (group != PAD)[:, None, :].expand_as(rows)
        np.testing.assert_allclose(rows[real].numpy(), 1.0, atol=1e-5)
        # causal: the first text query (position 2) cannot see the SOC-L at position 4
        assert mass[0, :, 2, SOC_L].abs().max() < 1e-7
    sums, n_rows = ev.attention_share_sums(out.attentions, group)
    assert n_rows == 7
    np.testing.assert_allclose((sums / n_rows).sum(-1).numpy(), 1.0, atol=1e-5)
    heat = ev.received_attention([a[1:] for a in out.attentions], group[1:])
    assert heat.shape == (2, 8)
    np.testing.assert_allclose(heat.sum(1).numpy(), 1.0, atol=1e-5)  # every row a distribution


def test_top_heads_rank_by_social_share_and_report_excess():
    shares = np.zeros((2, 3, 4))
    shares[..., TEXT] = 1.0
    shares[1, 2, [SOC_G, SOC_L]] = [0.4, 0.2]
    shares[0, 1, SOC_G] = 0.3
    base = np.zeros_like(shares)
    base[1, 2, SOC_G] = 0.5
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
# End to end on the demo set: tiny L (word-level tokenizer), tiny V, a short train_proj run
# (conftest's `trained`)
# --------------------------------------------------------------------------------------------


def conds_of(ev_dir):
    return json.loads((ev_dir / "ppl.json").read_text())["conditions"]


def test_end_to_end_on_the_demo(trained, tmp_path):
    data, proj, _ = trained
    out = tmp_path / "out"
    args = ["--data", str(data), "--projector", str(proj), "--out", str(out), "--split", "train"]
    ev.main([*args, "--bootstrap", "200", "--device", "cpu", "--attention-examples", "8"])
    ev_dir = out / "eval"
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
        assert shares[..., SOC_G].min() > 0
    assert len(att["top_heads"]) == 4 and "[SOC-G]" in att["example"]["tokens"]

    summary = (ev_dir / "summary.md").read_text()
    assert "Visual gain" in summary and "| shuffled |" in summary and "Decoding" in summary
    assert "attention bias" in summary
    for png in ("ppl.png", "attention_example.png", "attention_layers.png", "bias_attention.png"):
        assert (ev_dir / png).stat().st_size > 1000


def test_projector_and_encoder_move_together(trained, tmp_path):
    """projector.json names its V relative to its own folder: copied elsewhere side by side,
    evaluate still finds the V that g saw."""
    _, proj, _ = trained
    for name in ("proj", "enc"):
        shutil.copytree(proj.parent / name, tmp_path / name)
    _, cfg = common.load_projector(tmp_path / "proj", torch.device("cpu"))
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


def test_missing_inputs_and_unknown_parts_are_named(demo_data):
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


def test_an_L_of_another_width_is_refused_naming_g_file(trained):
    _, _, lm = trained
    cfg = {"out_dim": 7, "file": "g/projector.json"}
    with pytest.raises(ValueError, match=r"g/projector.json: g's out_dim 7, .*'s width 32"):
        common.load_trained_lm(cfg, str(lm), device="cpu")


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
