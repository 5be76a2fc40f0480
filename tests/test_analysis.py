"""analyze.py: RSA's statistics and input files, the logit lens, two projectors, the encoder
probe, end to end on the demo."""

from __future__ import annotations

import itertools
import json
import math

import conftest
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import analyze as an
import common
import utils
from common import BOS, PAD, SOC_G, SOC_L, TEXT, TokenizedUtterance
from demo import scene_labels

# --------------------------------------------------------------------------------------------
# The logit lens, two projectors
# --------------------------------------------------------------------------------------------


def test_logit_lens_equals_hand_computation():
    """Per layer, the mean probability over [SOC-L] positions of what L's final norm and head read
    there: the hand version runs each sequence alone and takes the last layer from L's logits."""
    from types import SimpleNamespace

    model = conftest.small_gemma(softcap=3.0)
    torch.nn.init.normal_(model.model.norm.weight)  # the final norm must count
    embed = model.get_input_embeddings()
    items = [
        TokenizedUtterance(np.array([2, 7, 9, 11, 4, 30]), 1, np.array([2, 4]), np.zeros(2), "a"),
        TokenizedUtterance(np.array([2, 8, 12, 13]), 2, np.array([3]), np.zeros(1), "c"),
    ]
    soc_l = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    tokenizer = SimpleNamespace(convert_ids_to_tokens=lambda ids: [f"t{i}" for i in ids])
    social = lambda part, c: ("local", soc_l)  # noqa: E731
    lens = an.logit_lens(model, tokenizer, items, social, "local", 2, 4, torch.device("cpu"))
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
    same = an.compare_projectors(g, feats, g, feats, torch.tensor([1, 4, 7]))
    assert same["frames"] == 3 and same["cosine"]["mean"] == pytest.approx(1.0, abs=1e-6)
    neg = an.compare_projectors(g, feats, flipped, feats, torch.arange(10))
    assert neg["cosine"]["p95"] == pytest.approx(-1.0, abs=1e-6)
    assert neg["norm_ratio_b_over_a"] == pytest.approx(1.0, abs=1e-6)


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
        assert an.spearman_upper(a, b) == pytest.approx(spearmanr(a[iu], b[iu])[0], abs=1e-12)


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
    assert an.permutation_pvalue(model, human, n_perm=1000, seed=0) == pytest.approx(expect)


def test_constant_model_matrix_gives_no_p_value():
    rng = np.random.default_rng(7)
    flat, human = np.ones((8, 8)), sym(rng, 8)
    assert math.isnan(an.spearman_upper(flat, human))
    assert math.isnan(an.permutation_pvalue(flat, human, n_perm=50, seed=0))


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
    got = an.permutation_pvalue(model, human, n_perm=2000, seed=1)
    se = math.sqrt(indep * (1 - indep) / 2000) + 1e-3
    assert abs(got - indep) < 5 * se


def planted(rng, n=24, k=4, dims=16, layers=4, good=2):
    """Items in k clusters; human similarity follows the clusters; only layer `good` sees them."""
    labels = np.arange(n) % k
    human = (labels[:, None] == labels[None, :]).astype(float) + 0.3 * sym(rng, n)
    centers = rng.normal(size=(k, dims))
    feats = [rng.normal(size=(n, dims)) for _ in range(layers)]
    feats[good] = centers[labels] + 0.5 * rng.normal(size=(n, dims))
    return np.stack([an.model_similarity(f) for f in feats]), human, labels


def test_planted_structure_is_found_and_layer_chosen_on_the_other_half():
    rng = np.random.default_rng(5)
    sims, human, _ = planted(rng)
    rep = an.rsa_report(sims, human, layer=None, n_perm=500, n_boot=200, seed=0)
    assert rep["layer"] == 2
    assert rep["items"] == 12 and rep["pairs"] == 66
    assert rep["rho"] > 0.4 and rep["p_value"] <= 0.01
    assert 0 < rep["ci95"][0] <= rep["rho"] <= rep["ci95"][1]
    pre = an.rsa_report(sims, human, layer=1, n_perm=200, n_boot=100, seed=0)
    assert pre["layer"] == 1 and pre["items"] == 24 and pre["p_value"] > 0.01
    with pytest.raises(ValueError, match="--layer 9"):
        an.rsa_report(sims, human, layer=9, n_perm=10, n_boot=10, seed=0)


def test_model_similarity_is_one_minus_correlation_distance():
    from scipy.spatial.distance import cdist

    x = np.random.default_rng(6).normal(size=(5, 7))
    np.testing.assert_allclose(an.model_similarity(x), 1 - cdist(x, x, "correlation"), atol=1e-12)


def test_triplet_similarity_hand_example():
    # items 0..3; (0,1,2) odd 2 -> 0,1 kept; (0,1,3) odd 0 -> 1,3 kept; (0,2,3) odd 3 -> 0,2 kept
    trip = np.array([[0, 1, 2, 2], [0, 1, 3, 0], [0, 2, 3, 3]])
    sim = an.triplet_similarity(trip, 4)
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
    sim5 = an.triplet_similarity(trip, 5)  # item 4 never shown: NaN, left out of the RSA
    assert np.isnan(sim5[4]).all()


def test_odd_one_out_accuracy_hand_example():
    model = np.array(
        [[1.0, 0.9, 0.1, 0.2], [0.9, 1.0, 0.3, 0.0], [0.1, 0.3, 1.0, 0.8], [0.2, 0.0, 0.8, 1.0]]
    )
    trip = np.array([[0, 1, 2, 2], [1, 2, 3, 1], [0, 2, 3, 2]])  # right, right, wrong (odd 0)
    assert an.odd_one_out_accuracy(model, trip) == pytest.approx(2 / 3)


def test_pool_hidden_modes():
    g = torch.tensor([[BOS, SOC_G, TEXT, SOC_L, TEXT, PAD]])
    h = torch.arange(6, dtype=torch.float32).view(1, 6, 1).repeat(1, 1, 2)
    expect = {"all": 2.5, "exclude_soc": 3.0, "only_soc": 2.0, "locals_only": 3.0, "eos": 4.0}
    for mode, v in expect.items():
        assert an.pool_hidden(h, g, mode).tolist() == [[v, v]], mode
    with pytest.raises(ValueError, match="no position to pool"):
        an.pool_hidden(h, torch.tensor([[BOS, TEXT, TEXT, PAD, PAD, PAD]]), "only_soc")


# --------------------------------------------------------------------------------------------
# RSA files
# --------------------------------------------------------------------------------------------


def write(path, text):
    path.write_text(text)
    return path


def test_rsa_files_read_in_index_order(tmp_path):
    idx = write(tmp_path / "idx.csv", "item_id,clip_id,text\na,c1,\nb,,a man waves\nc,c2,hi\n")
    items = an.read_index(idx)
    ids = [i["item_id"] for i in items]
    assert ids == ["a", "b", "c"] and items[1]["clip_id"] == "" and items[0]["text"] == ""
    rsm = write(tmp_path / "h.csv", "item_id,c,a,b\nb,0.2,0.5,1\na,0.1,1,0.5\nc,1,0.1,0.2\n")
    np.testing.assert_allclose(
        an.read_similarity_matrix(rsm, ids), [[1, 0.5, 0.1], [0.5, 1, 0.2], [0.1, 0.2, 1]]
    )
    trip = write(tmp_path / "t.csv", "item_a,item_b,item_c,odd\na,b,c,c\nc,a,b,a\n")
    assert an.read_triplets(trip, ids).tolist() == [[0, 1, 2, 2], [2, 0, 1, 0]]


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
        an.read_index(path)
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
        an.read_similarity_matrix(path, ["a", "b", "c"])
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
        an.read_triplets(path, ["a", "b", "c", "d"])
    assert str(path) in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        an.read_index(tmp_path / "nope.csv")


# --------------------------------------------------------------------------------------------
# End to end on the demo set (conftest's `trained`)
# --------------------------------------------------------------------------------------------


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


def test_rsa_runs_on_text_alone_without_projector(trained, tmp_path):
    """RSA of plain text against human judgments: no projector, --inject none."""
    data, _, lm = trained
    write_rsa_inputs(tmp_path, data)
    args = ["--data", str(data), "--lm", str(lm), "--out", str(tmp_path), "--what", "rsa"]
    args += ["--index", str(tmp_path / "index.csv"), "--sim-rsm", str(tmp_path / "human.csv")]
    an.main([*args, "--layer", "1", "--permutations", "50", "--bootstrap", "50"])
    rsa = json.loads((tmp_path / "analysis" / "rsa.json").read_text())
    assert rsa["inject"] == "none" and rsa["results"][0]["layer"] == 1
    assert -1 <= rsa["results"][0]["rho"] <= 1
    with pytest.raises(SystemExit, match="--pool only_soc with --inject none"):
        an.main([*args, "--pool", "only_soc"])


def test_end_to_end_on_the_demo(trained, tmp_path):
    """Every part on the demo: RSA against a matrix and triplets, the logit lens, g against
    itself (cosine 1 on every frame), the encoder probe of the demo's scenes; summary and plot."""
    data, proj, _ = trained
    n_items = write_rsa_inputs(tmp_path, data)
    out = tmp_path / "out"
    args = ["--data", str(data), "--projector", str(proj), "--out", str(out), "--split", "train"]
    args += ["--bootstrap", "200", "--permutations", "100", "--device", "cpu"]
    args += ["--index", str(tmp_path / "index.csv"), "--sim-rsm", str(tmp_path / "human.csv")]
    an.main([*args, "--triplets", str(tmp_path / "trip.csv"), "--compare", str(proj)])
    an_dir = out / "analysis"
    lens = json.loads((an_dir / "logit_lens.json").read_text())
    assert len(lens["layers"]) == 3 and lens["positions"]["soc_l"] > lens["positions"]["soc_g"]
    assert all(len(r["soc_g"]) == 5 for r in lens["layers"])
    pair = json.loads((an_dir / "compare.json").read_text())
    assert pair["cosine"]["p05"] == pytest.approx(1.0, abs=1e-5) and pair["frames"] > 0
    rsa = json.loads((an_dir / "rsa.json").read_text())
    assert rsa["items"] == n_items and rsa["inject"] == "full"
    assert [r["human"].split()[0] for r in rsa["results"]] == ["sim-rsm", "triplets"]
    assert len(rsa["results"][0]["per_layer_rho_all_items"]) == 3  # embeddings + 2 blocks
    probe = json.loads((an_dir / "encoder_probe.json").read_text())
    assert "untrained" not in probe and set(probe["fine_tuned"]) == {"actor", "action", "target"}
    summary = (an_dir / "summary.md").read_text()
    assert "RSA" in summary and "Logit lens" in summary and "Two projectors" in summary
    assert "Encoder probe" in summary
    assert (an_dir / "rsa_layers.png").stat().st_size > 1000


def test_unknown_clip_in_index_and_missing_inputs_are_named(demo_data, tmp_path):
    clip_index = utils.clip_frame_index(utils.read_manifest(demo_data))
    index = [{"item_id": "z9", "clip_id": "no_such_clip", "text": "hello"}]
    with pytest.raises(ValueError, match=r"idx.csv: item 'z9': clip 'no_such_clip' has no frames"):
        an.rsa_items(index, tmp_path / "idx.csv", None, demo_data, clip_index, None, 64)
    with pytest.raises(SystemExit, match="--what logit_lens needs --data, --projector"):
        an.main(["--data", str(demo_data), "--what", "logit_lens"])
    with pytest.raises(SystemExit, match="--what: unknown part 'ppl'"):
        an.main(["--data", str(demo_data), "--what", "rsa,ppl"])


def test_encoder_probe_reads_planted_features(tmp_path):
    """The probe finds a slot that the features encode (on held-out clips) and stays near chance
    on one they do not; scene_labels maps each frame to the scene it shows."""
    (tmp_path / "scenes.csv").write_text(
        "clip_id,start,end,actor,action,target,people\n"
        "c0,0.0,2.0,red man,waves at,blue man,x\nc0,2.0,4.0,blue man,cries,,x\n"
    )
    rows = [{"clip_id": "c0", "t_sec": t} for t in (0.5, 2.5, 4.5)]
    labels = scene_labels(tmp_path / "scenes.csv", rows)
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
    acc, chance, frames = an.encoder_probe(feats, rows, labels, "test")
    assert frames == {"train": 192, "test": 48}
    assert acc["action"] > 0.9 and acc["target"] == chance["target"] == 1.0
    assert abs(acc["actor"] - 0.5) < 0.2 and chance["actor"] < 0.7


def test_parts_without_L_do_not_load_it(trained, tmp_path, monkeypatch):
    """--what encoder_probe,compare reads V and g only: L is never loaded."""
    data, proj, _ = trained

    def no_lm(*args, **kwargs):
        raise AssertionError("L was loaded")

    monkeypatch.setattr(utils, "load_lm", no_lm)
    args = [
        "--data",
        str(data),
        "--projector",
        str(proj),
        "--out",
        str(tmp_path),
        "--split",
        "test",
    ]
    an.main([*args, "--what", "encoder_probe,compare", "--compare", str(proj), "--device", "cpu"])
    pair = json.loads((tmp_path / "analysis" / "compare.json").read_text())
    assert pair["cosine"]["median"] == pytest.approx(1.0, abs=1e-5)
    assert "fine_tuned" in json.loads((tmp_path / "analysis" / "encoder_probe.json").read_text())
