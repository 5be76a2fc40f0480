"""Decoding with social tokens (common.decode_social), the demo parser (demo.parse_demo_text) and
generation accuracy (evaluate): a tiny random Gemma 3, a tiny sub-word tokenizer, spaCy's tagger."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import evaluate as ev
import utils
from common import decode_social, span_frames
from demo import parse_demo_text

# sub-words as Gemma writes them ("▁" a leading space); "zookeeper" is two tokens
PIECES = ["<pad>", "<eos>", "<bos>", "<unk>", "The", "Now", "Look", ",", ".", "▁the", "▁blue"]
PIECES += ["▁green", "▁man", "▁woman", "▁hugs", "▁waves", "▁at", "▁is", "▁z", "ookeeper", "▁"]
TEXT = "The blue man hugs the zookeeper."


def tiny_tokenizer():
    """A Unigram tokenizer over PIECES, BOS first, character offsets, spaces as Gemma's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram([(p, -1.0) for p in PIECES], unk_id=3))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 2)]
    )
    special = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tagger():
    return utils.PosTagger(utils.DEFAULT_SPACY_MODEL)


def tiny_gemma():
    """A 2-layer random Gemma 3 (a sliding layer of window 4, shorter than the sequences, and a
    global one) over PIECES, with logits that its inputs move."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=len(PIECES), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], initializer_range=0.3,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation="sdpa",
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).requires_grad_(False).eval()


def frames(values, dim: int):
    """(g(v_j) [n, dim] constant rows of `values`, t_sec 0, 1, 2, ...): a clip for decode_social."""
    return torch.tensor(values, dtype=torch.float32)[:, None].repeat(1, dim), np.arange(
        len(values), dtype=np.float64
    )


def prompt(text: str, start: float = 0.0, end: float = 2.0) -> dict:
    return {"clip_id": "c", "text": text, "start": start, "end": end}


# ---- the KV cache: the same tokens as full forward passes ----


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_decoding_matches_full_forward_passes(tokenizer, tagger, temperature):
    L = tiny_gemma()
    torch.manual_seed(1)
    prompts = [prompt("The blue"), prompt("Now the green woman waves"), prompt("Look, the")]
    social = [(torch.randn(3, 32), np.arange(3.0)), None, (torch.randn(3, 32), np.arange(3.0))]
    kw = dict(tagger=tagger, max_new_tokens=10, temperature=temperature, top_p=0.9, seed=3)
    cached = decode_social(L, tokenizer, prompts, social, **kw)
    full = decode_social(L, tokenizer, prompts, social, use_cache=False, **kw)
    assert [r["ids"] for r in cached] == [r["ids"] for r in full]
    assert [r["soc_l"] for r in cached] == [r["soc_l"] for r in full]
    assert sum(len(r["soc_l"]) for r in cached) > 0  # the test saw [SOC-L] go in
    if temperature == 0:  # left padding: each prompt alone decodes as in the batch
        for p, s, r in zip(prompts, social, cached, strict=True):
            alone = decode_social(L, tokenizer, [p], [s], **kw)[0]
            assert (alone["ids"], alone["soc_l"]) == (r["ids"], r["soc_l"])


# ---- online insertion: [SOC-L] right after the last sub-word of a noun or verb ----


class ScriptedL(torch.nn.Module):
    """A stand-in for L that writes `script`, whatever it reads: after reading k text tokens
    (BOS first) its next token is script[k]. Token embeddings are their ids and social vectors
    100 + frame, so `fed` (what the last forward read) reads back as ids and frames."""

    def __init__(self, script: list[int]):
        super().__init__()
        self.script, self.fed = script, []
        self.embed = torch.nn.Embedding(len(PIECES), 4)
        self.embed.weight.data = torch.arange(len(PIECES)).float()[:, None].repeat(1, 4)
        self.generation_config = types.SimpleNamespace(eos_token_id=1)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, inputs_embeds, attention_mask, **_):
        self.fed = inputs_embeds[0, attention_mask[0].bool(), 0].tolist()
        logits = torch.full((1, 1, len(PIECES)), -1e9)
        logits[0, 0, self.script[sum(v < 100 for v in self.fed)]] = 0.0
        return types.SimpleNamespace(logits=logits)


def test_soc_l_goes_right_after_the_last_subword_of_nouns_and_verbs(tokenizer, tagger):
    ids = tokenizer(TEXT)["input_ids"]  # <bos> The ▁blue ▁man ▁hugs ▁the ▁z ookeeper .
    L = ScriptedL([*ids, 1, 1])
    social = [frames([100, 101, 102], 4)]
    # word times spread over [0, 2] s and 32 characters: man 0.66 s, hugs 0.94 s (frame 1),
    # zookeeper 1.66 s (frame 2); [SOC-G]: the mean of frames 0-2 (101)
    out = decode_social(L, tokenizer, [prompt("The blue")], social, tagger, 20,
                        n_chars=len(TEXT), use_cache=False)[0]  # fmt: skip
    assert out["text"] == TEXT.removeprefix("The blue")
    want = [2, 101, 4, 10, 12, 101, 14, 101, 9, 18, 19, 102, 8]  # "blue" is ADJ: no [SOC-L]
    assert L.fed == want
    assert out["soc_l"] == [(3, 1), (4, 1), (7, 2)]  # after ▁man, ▁hugs, ookeeper (not ▁z)
    assert out["ids"] == ids + [1]


def test_next_utterance_prompts_read_earlier_turns_with_their_social_tokens(tokenizer, tagger):
    """--task next-utterance: the earlier turn first, its nouns and verbs (prep's words) with
    [SOC-L] of the frames nearest their times, as in training; [SOC-G] over the frames from the
    first turn read on; `none` reads the earlier turn's text alone."""
    before = "The blue man hugs the zookeeper."
    words = [("man", 0.0), ("hugs", 0.6), ("zookeeper", 1.0)]
    words = [dict(text=w, char_start=before.index(w), char_end=before.index(w) + len(w),
                  t_sec=t, content=True) for w, t in words]  # fmt: skip
    context = [{"clip_id": "c", "text": before, "words": words, "start": 0.0, "end": 1.5}]
    now = prompt("Now the", start=2.0, end=3.0) | {"context": context}
    ids = tokenizer(before + "\n" + "Now the green woman waves.")["input_ids"]
    head = ids[: ids.index(5) + 2]  # <bos> ... . <unk> (the newline) Now ▁the
    L = ScriptedL([*ids, 1, 1])
    out = decode_social(L, tokenizer, [now], [frames([100, 101, 102, 103], 4)], tagger, 20,
                        use_cache=False)[0]  # fmt: skip
    assert out["text"] == " green woman waves."
    soc_g = (100 + 101 + 102 + 103) / 4  # frames 0-3: from the earlier turn's start on
    assert L.fed[: len(head) + 4] == [2, soc_g, *head[1:4], 100, head[4], 101, *head[5:8], 101,
                                      *head[8:]]  # fmt: skip
    assert out["soc_l"][:3] == [(3, 0), (4, 1), (7, 1)]  # ▁man, ▁hugs, ookeeper
    assert len(out["soc_l"]) == 5  # and the generated woman, waves
    L = ScriptedL([*ids, 1, 1])
    decode_social(L, tokenizer, [now], [None], tagger, 20, use_cache=False)
    assert L.fed[: len(head)] == head and max(L.fed) < 100


def test_without_lookahead_a_final_colour_is_a_noun(tokenizer, tagger):
    """Tagged alone, "The green" ends in a noun: a [SOC-L] after "green", never seen in
    training (the reason for `lookahead`)."""
    text = TEXT.replace("blue", "green")
    L = ScriptedL([*tokenizer(text)["input_ids"], 1, 1])
    social = [frames([100, 101, 102], 4)]
    for lookahead, first in ((False, 2), (True, 3)):  # after ▁green, or after ▁man
        out = decode_social(L, tokenizer, [prompt("The green")], social, tagger, 20,
                            n_chars=len(text), lookahead=lookahead, use_cache=False)[0]  # fmt: skip
        assert out["soc_l"][0][0] == first


def test_training_soc_g_is_the_mean_of_the_words_soc_l(tokenizer, tagger):
    social = [frames([100, 101, 102], 4), None]
    utts = [prompt(TEXT), prompt(TEXT)]
    soc_g = ev.training_soc_g(tokenizer, torch.nn.Embedding(len(PIECES), 4), tagger, utts, social)
    torch.testing.assert_close(soc_g[0], torch.full((4,), (101 + 101 + 102) / 3))
    assert soc_g[1] is None


def test_span_frames():
    t = np.arange(4.0)
    assert span_frames(t, 0.784, 2.246).tolist() == [1, 2]
    assert span_frames(t, 0.40, 0.45).tolist() == [0]  # no frame inside: the nearest
    assert span_frames(t, 1.6, 1.7).tolist() == [2]


# ---- the demo parser and accuracy ----


@pytest.mark.parametrize(
    "text, want",
    [
        ("Now the blue man waves at the green woman.", ("blue man", "wave", "green woman")),
        ("Look, the pink woman is shaking hands with the red man.", ("pink woman", "shake", "red man")),
        ("The red man cries.", ("red man", "cry", None)),
        ("The purple woman sits down next to the blue man.", ("purple woman", "sit", None)),
        ("The green man smiles.", ("green man", None, None)),
        ("Look, the 2016 Honda Civic is a great car.", (None, None, None)),
        ("The blue man. The red woman jumps at the green man.", ("blue man", None, None)),
        ("Now the yellow woman is laughing at the pink woman", ("yellow woman", "laugh", "pink woman")),
        ("The blue man and the red woman hug", ("blue man", None, None)),  # "hug": not a form
        ("The blue man turns away from the woman.", ("blue man", "turn", None)),
    ],
)  # fmt: skip
def test_parse_demo_text(text, want):
    assert parse_demo_text(text) == dict(zip(("actor", "action", "target"), want, strict=True))


def test_accuracy_report_is_paired():
    full = np.array([[1, 1, 0, 0]] * 6 + [[0, 1, 0, 0]] * 2, dtype=bool)
    shuffled = np.array([[0, 1, 0, 0]] * 8, dtype=bool)
    r = ev.accuracy_report({"full": full, "shuffled": shuffled}, 200, 0)
    assert r["conditions"]["full"]["accuracy"]["actor"] == 0.75
    assert r["visual"]["actor"]["accuracy"] == 0.75
    assert r["visual"]["action"]["ci95"] == [0.0, 0.0]  # paired: the same resamples


def test_earlier_turns_take_the_clips_previous_turns_in_order():
    utts = [{"clip_id": c, "turn": k, "text": f"{c}{k}", "start": k, "end": k + 1} for c, k in
            [("a", 2), ("b", 0), ("a", 0), ("a", 1), ("b", 1), ("a", 3)]]  # fmt: skip
    got = [[t["text"] for t in ctx] for ctx in ev.earlier_turns(utts, 2)]
    assert got == [["a0", "a1"], [], [], ["a0"], ["b0"], ["a1", "a2"]]
    assert ev.earlier_turns(utts, 0) == [[]] * 6
    assert ev.prompt_of(utts[0], 1, got[0])["context"] == ["a0", "a1"]
    bad = {"clip_id": "b", "turn": 2, "text": "b2", "start": 2, "end": 3}
    bad["words"] = [{"text": "x", "char_start": 1, "char_end": 9, "t_sec": 2, "content": True}]
    later = {"clip_id": "b", "turn": 3, "text": "b3", "start": 3, "end": 4}
    got = ev.earlier_turns([*utts, bad, later], 5)[-1]  # a malformed turn is not read
    assert [t["text"] for t in got] == ["b0", "b1"]
