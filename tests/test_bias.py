"""The training-free social-aware attention bias (evaluate.social_attention, seed 002): alpha 0
changes nothing, the bias reaches only the selected heads, text queries and [SOC-*] keys, head
selection finds a planted pattern, and decoding with the bias keeps the KV cache exact."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from test_decode import frames, prompt, tiny_gemma, tiny_tokenizer

import common
import evaluate as ev
import utils
from common import BOS, PAD, SOC_G, SOC_L, TEXT


def items_and_social(dim: int, seed: int = 0):
    """Two utterances by hand (one with two content words, one with one) and their [SOC-L]."""
    make = common.TokenizedUtterance
    items = [
        make(np.array([2, 4, 12, 14, 9, 13, 8]), 1, np.array([2, 3]), np.array([0.0, 1.0]), "a"),
        make(np.array([2, 5, 9, 11, 13, 15]), 1, np.array([4]), np.array([0.5]), "b"),
    ]
    return items, torch.randn(3, dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def L():
    model = tiny_gemma()
    before = ev.use_social_attention(model)
    assert before == "sdpa" and model.config._attn_implementation == "social"
    return model


def test_alpha_zero_gives_the_same_loss_and_a_positive_alpha_changes_it(L):
    items, soc_l = items_and_social(L.config.hidden_size)
    batch = common.insert_social_tokens(items, soc_l, L.get_input_embeddings(), "full")
    plain = common.token_nll(L, batch)
    base = torch.zeros(L.config.num_hidden_layers, L.config.num_attention_heads)
    zero = ev.bias_kwargs(L, batch, base, alpha=0.0, margin=-1.0, topk=0)
    assert torch.equal(common.token_nll(L, batch, **zero), plain)
    strong = ev.bias_kwargs(L, batch, base, alpha=50.0, margin=-1.0, topk=0)
    assert (strong["social_bias"] > 0).all()  # margin -1: every head is selected
    assert not torch.allclose(common.token_nll(L, batch, **strong), plain, atol=1e-4)


def test_bias_reaches_only_selected_heads_text_queries_and_social_keys(L):
    """social_attention's probabilities against a softmax with the bias placed by hand."""
    attn = L.model.layers[1].self_attn  # layer 1: social_bias[1] is read
    roles = torch.tensor([[BOS, SOC_G, TEXT, TEXT, SOC_L, TEXT, SOC_L, TEXT]])
    Q, K, d = 3, roles.shape[1], attn.head_dim  # the last 3 positions are the queries
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, t, d, generator=gen) for n, t in ((2, Q), (1, K), (1, K)))
    mask = torch.zeros(1, 1, Q, K)
    mask[0, 0, 0, -2:] = torch.finfo(torch.float32).min  # query 5 sees keys 0..5
    mask[0, 0, 1, -1:] = torch.finfo(torch.float32).min  # query 6 sees keys 0..6
    bias = torch.zeros(2, 1, 2)
    bias[1, 0, 1] = 1.5  # layer 1, head 1 only
    _, w = ev.social_attention(attn, q, k, v, mask, scaling=attn.scaling,
                               social_bias=bias, social_roles=roles)  # fmt: skip
    logits = (q @ k.transpose(2, 3)) * attn.scaling + mask
    for qi, pos in enumerate(range(K - Q, K)):  # by hand: text query, social key, head 1
        for key in range(K):
            if roles[0, pos] == TEXT and roles[0, key] in (SOC_G, SOC_L):
                logits[0, 1, qi, key] += 1.5
    torch.testing.assert_close(w, torch.softmax(logits, -1))
    _, w0 = ev.social_attention(attn, q, k, v, mask, scaling=attn.scaling)
    torch.testing.assert_close(w[:, 0], w0[:, 0])  # head 0: untouched
    torch.testing.assert_close(w[0, 1, 1], w0[0, 1, 1])  # query 6 is a [SOC-L]: untouched
    assert not torch.allclose(w[0, 1, 0], w0[0, 1, 0])


def test_head_selection_finds_a_planted_pattern():
    roles = torch.tensor(
        [[BOS, SOC_G, TEXT, SOC_L, TEXT, TEXT], [BOS, SOC_G, TEXT, TEXT, PAD, PAD]]
    )
    T = roles.shape[1]
    attentions = []
    for layer in range(3):  # layer 2, head 1 puts 0.8 of every text query on the social keys
        a = torch.zeros(2, 2, T, T)
        social = ((roles == SOC_G) | (roles == SOC_L)).float()
        share = torch.full((2, 2), 0.1)
        if layer == 2:
            share[:, 1] = 0.8
        a += share[:, :, None, None] * social[:, None, None] / social.sum(1)[:, None, None, None]
        a[:, :, :, 0] += 1 - share[:, :, None]  # the rest on BOS
        attentions.append(a)
    s = ev.social_shares(attentions, roles)
    assert s.shape == (3, 2, 2)
    expected = torch.full((3, 2, 2), 0.1)
    expected[2, :, 1] = 0.8
    torch.testing.assert_close(s, expected)
    chosen = ev.select_heads(s, torch.full((3, 2), 0.1), margin=0.2, topk=0)
    assert chosen.nonzero().tolist() == [[2, 0, 1], [2, 1, 1]]
    top = ev.select_heads(s, torch.zeros(3, 2), margin=0.0, topk=1)
    assert top[2, :, 1].all() and not top[2, :, 0].any()


def test_speaker_roles_keep_the_current_turns_social_tokens():
    """--task next-utterance: the context turn's [SOC-L] (before the first scored token) is
    no social key for the bias; [SOC-G] and the current turn's [SOC-L] are."""
    roles = torch.tensor([[BOS, SOC_G, TEXT, SOC_L, TEXT, TEXT, SOC_L, TEXT]])
    labels = torch.tensor([[-100, -100, -100, -100, -100, 7, -100, 9]])
    out = ev.speaker_roles(types.SimpleNamespace(roles=roles, labels=labels))
    assert out.tolist() == [[BOS, SOC_G, TEXT, PAD, TEXT, TEXT, SOC_L, TEXT]]


def test_speaker_roles_on_a_tokenized_conversation():
    """The same rule on a real next-utterance item: the earlier turn's two [SOC-L] drop out of
    the bias, the current turn's two stay, each right after its word's last sub-word."""

    def turn(text, words, t0):
        spans = [(text.index(w), text.index(w) + len(w)) for w in words]
        ws = [dict(text=w, char_start=a, char_end=b, t_sec=t0 + k, content=True)
              for k, (w, (a, b)) in enumerate(zip(words, spans, strict=True))]  # fmt: skip
        return {"clip_id": "c", "turn": int(t0), "text": text, "words": ws}

    tok = tiny_tokenizer()
    first, now = (
        turn("The blue man hugs.", ["man", "hugs"], 0.0),
        turn("Now the zookeeper waves.", ["zookeeper", "waves"], 2.0),
    )
    item = common.tokenize_utterance(tok, now, context=[first])
    batch = common.insert_social_tokens([item], torch.ones(4, 8), torch.nn.Embedding(30, 8), "full")
    roles = ev.speaker_roles(batch)[0]
    kept, dropped = (
        (roles == SOC_L).nonzero().flatten(),
        (roles != batch.roles[0]).nonzero().flatten(),
    )
    assert len(kept) == 2 and len(dropped) == 2 and (batch.roles[0][dropped] == SOC_L).all()
    assert dropped.max() < (batch.labels[0] != -100).nonzero().min() < kept.min()
    ids = batch.labels[0].tolist()
    assert [tok.convert_ids_to_tokens(ids[k - 1]) for k in kept.tolist()] == ["ookeeper", "▁waves"]


@pytest.mark.parametrize("alpha", [0.0, 1e4])
def test_decoding_with_the_bias_keeps_the_cache_exact(L, alpha):
    """With the bias (roles growing as [SOC-L] go in): cache = full passes; alpha 0 = no bias."""
    tagger = utils.PosTagger(utils.DEFAULT_SPACY_MODEL)
    tok, dim = tiny_tokenizer(), L.config.hidden_size
    base = torch.zeros(L.config.num_hidden_layers, L.config.num_attention_heads)
    bias = lambda batch: ev.bias_kwargs(L, batch, base, alpha, margin=-1.0, topk=0)  # noqa: E731
    p = [prompt("The blue man"), prompt("Now the")]
    social = [frames([1.0, -2.0, 3.0], dim), frames([0.5, 2.0, -1.0], dim)]
    runs = {}
    for cache in (True, False):
        for b in (bias, None):
            out = common.decode_social(L, tok, p, social, tagger, max_new_tokens=8,
                                       use_cache=cache, bias=b)  # fmt: skip
            runs[cache, b is None] = [o["ids"] for o in out]
    assert runs[True, False] == runs[False, False]  # the bias, with and without the cache
    assert (runs[True, False] == runs[True, True]) == (alpha == 0.0)


def test_decoding_marks_soc_g_a_social_key_and_the_summary_takes_any_layout(L):
    """The prefill's [SOC-G] is a [SOC-G] key for the bias (a g trained with --inject local
    decodes without one); the summary reads a bias.json of such a g (decoding rows: `full`)."""
    tok, seen = tiny_tokenizer(), []
    base = torch.zeros(L.config.num_hidden_layers, L.config.num_attention_heads)

    def bias(batch):
        kw = ev.bias_kwargs(L, batch, base, 1.0, margin=-1.0, topk=0)
        seen.append(kw["social_roles"])
        return kw

    social = [frames([1.0, 2.0, 3.0], L.config.hidden_size), None]
    common.decode_social(L, tok, [prompt("The blue"), prompt("Now the")], social,
                         utils.PosTagger(), max_new_tokens=2, bias=bias)  # fmt: skip
    assert (seen[0] == SOC_G).sum(1).tolist() == [1, 0]
    common.decode_social(L, tok, [prompt("The blue")], social[:1], utils.PosTagger(),
                         max_new_tokens=2, bias=bias, inject="local")  # fmt: skip
    assert (seen[-1] == SOC_G).sum() == 0  # "blue", the last word, waits: no [SOC-L] yet either
    row = {"ppl": 3.0, "ci95": [2.0, 4.0]}
    acc = {"accuracy": {"actor": 0.5, "action": 0.25, "target": 0.0, "all": 0.0}}
    report = {"alpha": 1.0, "val_ppl_by_alpha": {"1.0": 3.0}, "attention": {},
              "conditions": {"local": row, "local+bias": row | {"minus_unbiased": row},
                             "full": {"accuracy": acc}}}  # fmt: skip
    md = ev.summary_markdown(bias=report)
    assert "| full | — | — | 0.50 | 0.25 | 0.00 |" in md and "| local | 3.00 [2.00, 4.00]" in md
