"""train_proj.py, common.py (the insertion, g, the loss) and utils.py (loading L): training g.

Tiny random Gemma 3 models with the real Gemma tokenizer for all but the end-to-end test, which
trains g in front of the real embedded Gemma 3 270M for a few steps.
"""

from __future__ import annotations

import functools
import json
import math

import conftest
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import train_proj
import utils
from common import BOS, PAD, SOC_G, SOC_L, TEXT

# --------------------------------------------------------------------------------------------
# Fixtures: the real tokenizer, a tiny random L beside it, a tiny V
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gemma_dir():
    return utils.embedded_lm_path()  # converted from the GGUF once per machine (~1.5 min)


@pytest.fixture(scope="session")
def tokenizer(gemma_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma_dir)


# a sliding and a global layer, as in Gemma 3; logits that inputs can move (0.02 leaves them
# all near 0)
tiny_gemma = functools.partial(
    conftest.tiny_gemma,
    layer_types=["sliding_attention", "full_attention"],
    initializer_range=0.3,
)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tokenizer):
    """A tiny random L saved as a Hugging Face folder, for `--lm DIR`."""
    path = tmp_path_factory.mktemp("tiny_lm")
    tiny_gemma().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """A tiny random V exported like train_dino does, for `--encoder DIR`."""
    path = tmp_path_factory.mktemp("tiny_encoder")
    overrides = {"depth": 1, "embed_dim": 48, "num_heads": 2}
    torch.manual_seed(0)
    V = utils.build_vit(utils.DEFAULT_ARCH, img_size=112, **overrides)
    utils.export_encoder(
        V, path, {"arch": utils.DEFAULT_ARCH, "img_size": 112, "overrides": overrides}
    )
    return path


def utterance(text: str, content: set[str], clip: str = "c0", turn: int = 0) -> dict:
    """An utterance record as prep.py writes it; word k at t_sec = k (seconds)."""
    words = [
        {
            "text": text[a:b],
            "char_start": a,
            "char_end": b,
            "t_sec": float(k),
            "pos": "NOUN" if text[a:b] in content else "X",
            "content": text[a:b] in content,
        }
        for k, (a, b) in enumerate(utils.split_words(text))
    ]
    return {"clip_id": clip, "split": "train", "text": text, "turn": turn, "words": words}


U_SEVERAL = utterance("The red woman waves at the blue man.", {"woman", "waves", "man"})
U_SUBWORD_END = utterance("handshakes and cartwheels", {"handshakes", "cartwheels"})
U_NONE = utterance("Nothing here", set())


def render(batch: common.SocialBatch, items, tokenizer) -> list[list[str]]:
    """Each row of a batch as strings: text tokens (in order), [SOC-G], [SOC-L], <pad>."""
    names = {PAD: "<pad>", SOC_G: "[SOC-G]", SOC_L: "[SOC-L]"}
    rows = []
    for roles, item in zip(batch.roles.tolist(), items, strict=True):
        text = iter(tokenizer.convert_ids_to_tokens(item.input_ids.tolist()))
        rows.append([next(text) if r in (BOS, TEXT) else names[r] for r in roles])
    return rows


# --------------------------------------------------------------------------------------------
# Tokenization and the exact layout
# --------------------------------------------------------------------------------------------


def test_embedded_tokenizer_is_checked_at_conversion_and_load(tokenizer, tmp_path, monkeypatch):
    """transformers 5.17-5.22 convert the GGUF's tokenizer without <bos> (5.17: without merges): the
    conversion stops with the version instead of caching a tokenizer that ruins perplexity, and
    load_lm refuses such a cache."""
    assert tokenizer("The green man waves.")["input_ids"][0] == tokenizer.bos_token_id
    import transformers

    class NoBos:  # what 5.18-5.22 return: the right pieces, no <bos>
        bos_token_id = tokenizer.bos_token_id

        def __call__(self, text):
            return {"input_ids": tokenizer(text, add_special_tokens=False)["input_ids"]}

    monkeypatch.setenv("SOCIAL_TOKENS_CACHE", str(tmp_path))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: NoBos())
    with pytest.raises(RuntimeError, match="converted wrongly.*>= 5.23"):
        utils.embedded_lm_path()
    assert list(tmp_path.iterdir()) == []  # no half-made cache left behind
    # a cache an older transformers made is refused when loaded
    monkeypatch.setattr(utils, "embedded_lm_path", lambda: tmp_path)
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_gemma()
    )
    with pytest.raises(RuntimeError, match=f"{tmp_path}: a tokenizer converted wrongly"):
        utils.load_lm()


def test_tokenize_finds_last_subword_token(tokenizer):
    items = [common.tokenize_utterance(tokenizer, u) for u in (U_SEVERAL, U_SUBWORD_END, U_NONE)]
    toks = [tokenizer.convert_ids_to_tokens(it.input_ids.tolist()) for it in items]
    assert toks[1] == ["<bos>", "hand", "shakes", "▁and", "▁cart", "wheels"]  # sub-word splits
    assert [toks[0][p] for p in items[0].t_p] == ["▁woman", "▁waves", "▁man"]
    assert items[1].t_p.tolist() == [2, 5]  # "shakes", and "wheels": the last token of all
    assert items[2].t_p.tolist() == []
    assert items[0].word_t.tolist() == [2.0, 3.0, 7.0]
    assert all(it.score_from == 1 for it in items)  # everything but BOS is scored


def test_insert_layout_and_labels(tokenizer):
    items = [common.tokenize_utterance(tokenizer, u) for u in (U_SEVERAL, U_SUBWORD_END, U_NONE)]
    L = tiny_gemma()
    embed = L.get_input_embeddings()
    soc_l = torch.randn(5, 32)  # 3 + 2 content words
    G, S, P = "[SOC-G]", "[SOC-L]", "<pad>"
    row0 = ["<bos>", G, "The", "▁red", "▁woman", S, "▁waves", S, "▁at", "▁the", "▁blue", "▁man"]
    row0 += [S, "."]
    row1 = ["<bos>", G, "hand", "shakes", S, "▁and", "▁cart", "wheels", S]
    row2 = ["<bos>", "Nothing", "▁here"]
    for side in ("right", "left"):
        batch = common.insert_social_tokens(items, soc_l, embed, "full", padding_side=side)

        def pad(row, n=14, side=side):
            return row + [P] * (n - len(row)) if side == "right" else [P] * (n - len(row)) + row

        assert render(batch, items, tokenizer) == [pad(row0), pad(row1), pad(row2)]
        roles, mask = batch.roles, batch.attention_mask
        assert torch.equal(mask, (roles != PAD).long())
        # labels: the text tokens (not BOS), -100 on BOS, social tokens and padding
        for b, it in enumerate(items):
            text_pos = torch.nonzero((roles[b] == TEXT) | (roles[b] == BOS)).flatten()
            want = torch.full_like(batch.labels[b], -100)
            want[text_pos[1:]] = torch.from_numpy(it.input_ids[1:])
            assert torch.equal(batch.labels[b], want)
            # the vectors: token embeddings, g's vectors, their mean, zeros for padding
            ids = torch.from_numpy(it.input_ids)
            assert torch.equal(batch.inputs_embeds[b, text_pos], embed(ids))
            real = torch.nonzero(mask[b]).flatten()
            assert torch.equal(batch.position_ids[b, real], torch.arange(len(real)))
        x = batch.inputs_embeds
        assert torch.equal(x[roles == SOC_L], soc_l)
        assert torch.allclose(x[0][roles[0] == SOC_G][0], soc_l[:3].mean(0))
        assert torch.allclose(x[1][roles[1] == SOC_G][0], soc_l[3:].mean(0))
        assert torch.count_nonzero(x[roles == PAD]) == 0
        # one [SOC-G] per utterance with content words, the [SOC-L] in word order
        assert (roles == SOC_G).sum(1).tolist() == [1, 1, 0]
        assert torch.equal(x[0, torch.nonzero(roles[0] == SOC_L).flatten()], soc_l[:3])
        assert torch.equal(x[1, torch.nonzero(roles[1] == SOC_L).flatten()], soc_l[3:])
        # every scored label is predicted by the position before it
        flat = batch.labels.flatten()
        assert torch.equal(flat[batch.loss_pos + 1], batch.loss_targets)
        assert len(batch.loss_pos) == int((batch.labels != -100).sum())


def test_insert_takes_a_given_soc_g(tokenizer):
    """soc_g[b] (decoding's [SOC-G]) replaces item b's mean and goes in even without content
    words; None keeps the mean; `local` leaves it out."""
    items = [common.tokenize_utterance(tokenizer, u) for u in (U_SUBWORD_END, U_NONE, U_SEVERAL)]
    embed, soc_l = tiny_gemma().get_input_embeddings(), torch.randn(5, 32)
    given = [torch.full((32,), 7.0), torch.full((32,), 9.0), None]
    batch = common.insert_social_tokens(items, soc_l, embed, "full", soc_g=given)
    roles, x = batch.roles, batch.inputs_embeds
    assert (roles == SOC_G).sum(1).tolist() == [1, 1, 1] and (roles[:, 1] == SOC_G).all()
    assert torch.equal(x[0, 1], given[0]) and torch.equal(x[1, 1], given[1])
    assert torch.allclose(x[2, 1], soc_l[2:].mean(0))
    assert torch.equal(x[roles == SOC_L], soc_l)
    local = common.insert_social_tokens(items, soc_l, embed, "local", soc_g=given)
    assert (local.roles == SOC_G).sum() == 0


def test_inject_modes_layout(tokenizer):
    item = common.tokenize_utterance(tokenizer, U_SUBWORD_END)
    embed = tiny_gemma().get_input_embeddings()
    soc_l = torch.randn(2, 32)
    want = {
        "none": ["<bos>", "hand", "shakes", "▁and", "▁cart", "wheels"],
        "global": ["<bos>", "[SOC-G]", "hand", "shakes", "▁and", "▁cart", "wheels"],
        "local": ["<bos>", "hand", "shakes", "[SOC-L]", "▁and", "▁cart", "wheels", "[SOC-L]"],
    }
    for inject, row in want.items():
        batch = common.insert_social_tokens([item], soc_l, embed, inject)
        assert render(batch, [item], tokenizer) == [row]
        assert common.social_length(item, inject) == len(row)
    with pytest.raises(ValueError, match="expected 2 rows"):
        common.insert_social_tokens([item], soc_l[:1], embed, "full")


def test_next_utterance_context_and_truncation(tokenizer):
    ctx = utterance("She hugs him.", {"hugs"}, turn=0)
    target = utterance("The red woman waves.", {"woman", "waves"}, turn=1)
    item = common.tokenize_utterance(tokenizer, target, [ctx])
    toks = tokenizer.convert_ids_to_tokens(item.input_ids.tolist())
    assert toks == [
        "<bos>",
        "She",
        "▁hugs",
        "▁him",
        ".",
        "\n",
        "The",
        "▁red",
        "▁woman",
        "▁waves",
        ".",
    ]
    assert item.score_from == 6  # the context and its newline are read, not scored
    assert [toks[p] for p in item.t_p] == ["▁hugs", "▁woman", "▁waves"]
    batch = common.insert_social_tokens(
        [item], torch.randn(3, 32), tiny_gemma().get_input_embeddings()
    )
    scored = tokenizer.convert_ids_to_tokens(batch.labels[0][batch.labels[0] != -100].tolist())
    assert scored == ["The", "▁red", "▁woman", "▁waves", "."]
    # too long: the oldest context turn goes first, then the utterance's tail
    alone = common.tokenize_utterance(tokenizer, target)
    fit = common.tokenize_utterance(
        tokenizer, target, [ctx], max_len=common.social_length(alone, "full")
    )
    assert fit.input_ids.tolist() == alone.input_ids.tolist() and fit.score_from == 1
    cut = common.tokenize_utterance(tokenizer, target, [ctx], max_len=6)  # BOS G The red woman L
    assert tokenizer.convert_ids_to_tokens(cut.input_ids.tolist()) == [
        "<bos>",
        "The",
        "▁red",
        "▁woman",
    ]
    assert cut.t_p.tolist() == [3] and common.social_length(cut, "full") == 6


def test_bad_word_span_is_a_clear_error(tokenizer):
    bad = utterance("Hi you", {"you"})
    bad["words"][1]["char_end"] = 40
    with pytest.raises(ValueError, match=r"clip 'c0', turn 0.*char span \[3, 40\)"):
        common.tokenize_utterance(tokenizer, bad)


def test_word_frames_take_the_nearest_frame(tokenizer):
    item = common.tokenize_utterance(tokenizer, U_SEVERAL)  # content words at t = 2, 3, 7
    rows = [{"clip_id": "c0", "frame_idx": 10 + k, "t_sec": 2.6 * k} for k in range(4)]
    rows += [{"clip_id": "c1", "frame_idx": 20, "t_sec": 0.0}]
    index = utils.clip_frame_index(rows)
    assert common.word_frames(item, index).tolist() == [11, 11, 13]  # 2 -> 2.6, 3 -> 2.6, 7 -> 7.8
    assert common.word_frames(item, index, clip_id="c1").tolist() == [20, 20, 20]  # shuffled


# --------------------------------------------------------------------------------------------
# L: inject none is the plain model; the chunked loss is the full-logit loss
# --------------------------------------------------------------------------------------------


def test_inject_none_gives_the_plain_models_logits(tokenizer):
    L = tiny_gemma()
    items = [common.tokenize_utterance(tokenizer, u) for u in (U_NONE, U_SEVERAL, U_SUBWORD_END)]
    for side in ("right", "left"):
        batch = common.insert_social_tokens(items, None, L.get_input_embeddings(), "none", side)
        with torch.no_grad():
            out = L(
                inputs_embeds=batch.inputs_embeds,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
            ).logits
            for b, it in enumerate(items):
                plain = L(input_ids=torch.from_numpy(it.input_ids)[None]).logits[0]
                got = out[b][batch.roles[b] != PAD]
                torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


# a small soft cap, so that it matters: the chunks; none (Gemma 3): the attention on a CPU
@pytest.mark.parametrize("softcap", [3.0, None])
def test_token_nll_matches_full_logit_loss(tokenizer, softcap):
    """token_nll (scored positions only) = Hugging Face's loss with all logits, and its gradient."""
    L = tiny_gemma(final_logit_softcapping=softcap)
    items = [common.tokenize_utterance(tokenizer, u) for u in (U_SEVERAL, U_SUBWORD_END, U_NONE)]
    soc_l = torch.randn(5, 32, requires_grad=True)
    batch = common.insert_social_tokens(items, soc_l, L.get_input_embeddings(), "full")
    nll = common.token_nll(L, batch)
    (g_mine,) = torch.autograd.grad(nll.mean(), soc_l)
    batch = common.insert_social_tokens(items, soc_l, L.get_input_embeddings(), "full")
    out = L(
        inputs_embeds=batch.inputs_embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        labels=batch.labels,
    )
    (g_ref,) = torch.autograd.grad(out.loss, soc_l)
    torch.testing.assert_close(nll.mean(), out.loss)
    torch.testing.assert_close(g_mine, g_ref, rtol=1e-4, atol=1e-7)


def test_frozen_head_nll_attention_and_chunks():
    """No soft cap: one attention over the vocabulary (CPU); a soft cap: chunks of 3 rows."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    h = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    head = head.double()
    t = torch.randint(0, 50, (7,))
    w = torch.rand(7, dtype=torch.float64)
    for cap in (None, 2.0):
        nll = utils.FrozenHeadCrossEntropy.apply(h, head.weight, head.bias, t, cap, 3, False)
        (g,) = torch.autograd.grad((nll * w).sum(), h)
        logits = head(h)
        if cap:
            logits = cap * torch.tanh(logits / cap)
        ref = F.cross_entropy(logits, t, reduction="none")
        (g_ref,) = torch.autograd.grad((ref * w).sum(), h)
        torch.testing.assert_close(nll.double(), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g, g_ref)
        with torch.no_grad():  # without a gradient: the chunks, the same NLL
            nll_ng = utils.FrozenHeadCrossEntropy.apply(h, head.weight, head.bias, t, cap, 3, False)
        torch.testing.assert_close(nll_ng, nll)
        empty = utils.FrozenHeadCrossEntropy.apply(
            h[:0], head.weight, head.bias, t[:0], cap, 3, False
        )
        assert empty.shape == (0,)  # no scored position: an empty result, not a crash


# --------------------------------------------------------------------------------------------
# g: scale at init; gradients reach g and V, never L
# --------------------------------------------------------------------------------------------


def proj_init_args(*extra: str):
    return train_proj.get_args_parser().parse_args(["--data", "x", "--proj-hidden", "64", *extra])


def test_projector_starts_at_the_scale_of_token_embeddings():
    L = tiny_gemma()
    v = 50.0 * torch.randn(256, 48) + 3.0  # any feature scale
    g = train_proj.init_projector(48, L, v, proj_init_args())
    # Gemma 3 scales inside the embedding module: the target is the norm of its output
    raw = L.get_input_embeddings().weight.norm(dim=-1).median().item()
    assert g(v).norm(dim=-1).mean().item() == pytest.approx(raw * math.sqrt(32), rel=0.15)


def test_projector_input_standardisation_keeps_scene_differences():
    # [CLS] vectors of one video: a large shared component, a few percent of spread
    gen = torch.Generator().manual_seed(0)
    v = 10.0 * torch.randn(1, 48, generator=gen) + 0.3 * torch.randn(256, 48, generator=gen)
    g = train_proj.init_projector(48, tiny_gemma(), v, proj_init_args())
    out = g(v)
    assert torch.allclose(g.v_mean, v.mean(0)) and torch.allclose(g.v_std, v.std(0))
    # outputs differ between inputs about as much as their norm: the frames are not washed out
    assert (out - out.mean(0)).norm(dim=-1).mean() > 0.5 * out.norm(dim=-1).mean()


def test_gradient_reaches_g_and_V_never_L(tokenizer, tiny_encoder_dir):
    L = tiny_gemma()
    before = {k: v.clone() for k, v in L.state_dict().items()}
    V, _ = utils.load_encoder(tiny_encoder_dir)
    V.train().requires_grad_(True)
    g = common.Projector(48, 32)
    items = [common.tokenize_utterance(tokenizer, u) for u in (U_SEVERAL, U_NONE)]
    frames = np.random.default_rng(0).integers(0, 255, (4, 112, 196, 3), dtype=np.uint8)
    rows = [np.array([2, 0, 2]), np.zeros(0, np.int64)]
    cpu = torch.device("cpu")
    # each distinct frame goes through V once; soc_l follows the words
    seen = []
    V.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    soc_l = train_proj.soc_l_of_frames(g, V, rows, None, frames, cpu)
    assert seen == [(2, 3, 112, 196)] and soc_l.shape == (3, 32)
    torch.testing.assert_close(soc_l[0], soc_l[2])
    args = train_proj.get_args_parser().parse_args(["--data", "x", "--inject", "full"])
    args.compile = False
    nll, n = train_proj.batch_nll(L, g, V, items, rows, None, frames, args, cpu)
    (nll / n).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())
    assert V.cls_token.grad.abs().sum() > 0 and V.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in L.parameters())
    assert all(torch.equal(before[k], v) for k, v in L.state_dict().items())


# --------------------------------------------------------------------------------------------
# train_proj.py on the demo set
# --------------------------------------------------------------------------------------------


def proj_args(data, out, lm, encoder, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--out", str(out), "--lm", str(lm), "--encoder", str(encoder),
        "--device", "cpu", "--batch-size", "4", "--log-every", "2", *extra,
    ]  # fmt: skip


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_val_loss_and_leaves_L_alone(
    demo_data, tiny_lm_dir, tiny_encoder_dir, tmp_path
):
    from safetensors.torch import load_file

    out = tmp_path / "proj"
    args = proj_args(demo_data, out, tiny_lm_dir, tiny_encoder_dir, "--steps", "12", "--lr", "3e-3")
    _, L = train_proj.train_proj(train_proj.get_args_parser().parse_args(args))
    vals = [m for m in metrics(out) if "val_loss" in m]
    assert vals[0]["step"] == 0 and vals[-1]["step"] == 12
    assert (out / "metrics.png").stat().st_size > 1000  # the training curve beside metrics.jsonl
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] - 0.05, vals
    train_log = [m for m in metrics(out) if "loss" in m]
    assert all(m["tokens_per_s"] > 0 and m["mfu"] > 0 for m in train_log)
    # L's weights are bit-identical to the files it was loaded from
    saved = load_file(str(tiny_lm_dir / "model.safetensors"))
    state = L.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    # exports: g with its config, and V (cached features were used: V unchanged)
    tensors, cfg = utils.load_safetensors(out / "projector.safetensors")
    assert cfg["in_dim"] == 48 and cfg["out_dim"] == 32 and cfg["inject"] == "full"
    assert cfg["lm_dtype"] == "float32"  # what evaluate.py must load L in
    assert (out / cfg["encoder"]).resolve() == tiny_encoder_dir.resolve()  # relative to out
    assert not cfg["encoder_trained"]
    g = common.Projector(48, 32, cfg["depth"], cfg["hidden"])
    g.load_state_dict(tensors)
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["used"] > 0 and report["val"]["used"] > 0


def test_bucket_batches_are_global_and_split_over_ranks():
    """--batch-size is the global batch: the epoch's batches do not depend on the number of
    processes, and rank r of N reads rows r::N of each, together the whole batch."""
    lengths = np.random.default_rng(0).integers(5, 60, 203)
    batches = train_proj.bucket_batches(lengths, 8, seed=0, epoch=1)
    assert len(batches) == 203 // 8 and all(len(b) == 8 for b in batches)  # full batches only
    assert len(np.unique(np.concatenate(batches))) == 25 * 8
    for b in batches:
        assert sorted(np.concatenate([b[r::2] for r in (0, 1)])) == sorted(b)
    # sorted by length within windows: a batch spans a small part of the lengths (little padding)
    assert np.mean([np.ptp(lengths[b]) for b in batches]) < 0.25 * np.ptp(lengths)
    again = train_proj.bucket_batches(lengths, 8, seed=0, epoch=1)
    assert all(np.array_equal(a, b) for a, b in zip(again, batches, strict=True))


def test_resume_equals_uninterrupted(
    demo_data, tiny_lm_dir, tiny_encoder_dir, tmp_path, monkeypatch
):
    extra = ("--steps", "6", "--save-every", "2", "--val-every", "3")
    train_proj.main(proj_args(demo_data, tmp_path / "a", tiny_lm_dir, tiny_encoder_dir, *extra))

    class Stop(Exception):
        pass

    real_save = utils.save_checkpoint

    def save_then_die(path, state, args):
        real_save(path, state, args)
        if state["step"] == 4:
            raise Stop

    b = proj_args(demo_data, tmp_path / "b", tiny_lm_dir, tiny_encoder_dir, *extra)
    monkeypatch.setattr(utils, "save_checkpoint", save_then_die)
    with pytest.raises(Stop):
        train_proj.main(b)
    monkeypatch.setattr(utils, "save_checkpoint", real_save)
    assert not (tmp_path / "b" / "projector.safetensors").exists()
    train_proj.main(b)  # the same command again: resumes at step 4
    got, _ = utils.load_safetensors(tmp_path / "b" / "projector.safetensors")
    want, _ = utils.load_safetensors(tmp_path / "a" / "projector.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    last = [m for m in metrics(tmp_path / "b") if "val_loss" in m][-1]
    assert (
        last["val_loss"] == [m for m in metrics(tmp_path / "a") if "val_loss" in m][-1]["val_loss"]
    )


def test_train_encoder_next_utterance(demo_data, tiny_lm_dir, tiny_encoder_dir, tmp_path):
    """--train-encoder fine-tunes V (exported beside g); --task next-utterance runs."""
    out = tmp_path / "proj"
    extra = ("--steps", "2", "--train-encoder", "--encoder-lr", "1e-3", "--task", "next-utterance")
    train_proj.main(
        proj_args(demo_data, out, tiny_lm_dir, tiny_encoder_dir, *extra, "--inject", "global")
    )
    before, _ = utils.load_safetensors(tiny_encoder_dir / "encoder.safetensors")
    after, cfg = utils.load_safetensors(out / "encoder.safetensors")
    assert cfg["arch"] == utils.DEFAULT_ARCH
    assert not torch.equal(before["cls_token"], after["cls_token"])
    _, pcfg = utils.load_safetensors(out / "projector.safetensors")
    assert pcfg["encoder"] == "." and pcfg["encoder_trained"]
    assert pcfg["task"] == "next-utterance" and pcfg["inject"] == "global"


def test_end_to_end_with_the_embedded_gemma(demo_data, gemma_dir, tiny_encoder_dir, tmp_path):
    out = tmp_path / "proj"
    args = proj_args(demo_data, out, "gemma3-270m", tiny_encoder_dir, "--steps", "2")
    train_proj.main(args + ["--batch-size", "2", "--max-len", "48"])
    _, cfg = utils.load_safetensors(out / "projector.safetensors")
    assert cfg["out_dim"] == 640 and cfg["lm"] == "gemma3-270m"
    vals = [m for m in metrics(out) if "val_loss" in m]
    assert len(vals) >= 2 and all(math.isfinite(m["val_loss"]) for m in vals)
    # the real Gemma reads the demo's English far better than chance (ln 262144 = 12.5)
    assert vals[0]["val_loss"] < 8.0


def test_tokenize_split_reports_what_it_skips(tokenizer):
    bad = utterance("Hi you", {"you"}, clip="c0", turn=2)
    bad["words"][1]["char_end"] = 40
    utts = [
        utterance("The red woman waves.", {"woman", "waves"}, clip="c0", turn=3),
        utterance("She hugs him.", {"hugs"}, clip="c0", turn=1),
        bad,
        utterance("", set(), clip="c0", turn=4),
        utterance("He waves.", {"waves"}, clip="nowhere", turn=0),
        utterance("Hello there", set(), clip="nowhere", turn=1),
    ]
    index = utils.clip_frame_index([{"clip_id": "c0", "frame_idx": 0, "t_sec": 0.0}])
    items, skipped = common.tokenize_split(utts, tokenizer, index, "next-utterance", 1)
    reasons = {(s["clip_id"], s["turn"]): s["reason"] for s in skipped}
    assert set(reasons) == {("c0", 2), ("c0", 4), ("nowhere", 0), ("nowhere", 1)}
    assert "char span [3, 40)" in reasons["c0", 2]
    assert reasons["c0", 4] == "no text token to score"
    assert reasons["nowhere", 0] == reasons["nowhere", 1] == "clip has no frames in manifest.csv"
    # in turn order; the bad turn 2 is not read as context: turn 3 reads turn 1
    toks = [tokenizer.convert_ids_to_tokens(it.input_ids.tolist()) for it in items]
    assert toks[0] == ["<bos>", "She", "▁hugs", "▁him", "."]
    assert toks[1][:6] == ["<bos>", "She", "▁hugs", "▁him", ".", "\n"]
    assert items[1].score_from == 6
    # a sentence without content words needs no frame
    items, skipped = common.tokenize_split(utts[-1:], tokenizer, index)
    assert len(items) == 1 and items[0].t_p.tolist() == [] and skipped == []


def test_inject_none_trains_nothing(demo_data, tiny_lm_dir, tiny_encoder_dir, tmp_path):
    out = tmp_path / "none"
    train_proj.main(proj_args(demo_data, out, tiny_lm_dir, tiny_encoder_dir, "--inject", "none"))
    (record,) = metrics(out)
    assert record["step"] == 0 and math.isfinite(record["val_loss"]) and record["val_tokens"] > 0
    assert not (out / "projector.safetensors").exists()
