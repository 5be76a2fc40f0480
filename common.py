"""The paper's pieces, in the paper's order: the insertion of social tokens (tokenization, t_p,
nearest frame, insert_social_tokens); g, its file and its vectors under each condition; L's loss
and forward passes; decoding with L (evaluate's, and a user's from Python). train_proj, evaluate
and analyze share them. How L and V are loaded and run, readers and plumbing: utils.py.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import utils

INJECT_MODES = ("none", "global", "local", "full")
LM_DTYPES = ("bfloat16", "float32")  # what g can be trained against (projector.json's lm_dtype)
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


def load_projector(path, device):
    """g and its projector.json (dims, lm, lm_dtype, encoder, inject, task, max_len, ...)."""
    file = Path(path) / "projector.safetensors" if Path(path).is_dir() else Path(path)
    tensors, cfg = utils.load_safetensors(file)
    if missing := [k for k in ("in_dim", "out_dim", "depth", "hidden", "inject") if k not in cfg]:
        raise ValueError(f"{file.with_suffix('.json')}: missing field(s) {missing}")
    if (dtype := cfg.get("lm_dtype", "bfloat16")) not in LM_DTYPES:  # absent: load_lm's default
        raise ValueError(f"{file.with_suffix('.json')}: lm_dtype {dtype!r}; expected {LM_DTYPES}")
    if cfg.get("encoder"):  # stored relative to the projector's folder (older files: absolute)
        cfg["encoder"] = os.path.normpath(file.parent / cfg["encoder"])
    cfg["file"] = str(file.with_suffix(".json"))  # for messages
    g = Projector(cfg["in_dim"], cfg["out_dim"], cfg["depth"], cfg["hidden"])
    g.load_state_dict(tensors)
    return g.to(device).eval(), cfg


def social_vectors(g, feats, clip_index, layout, donors, items, condition):
    """(inject, soc_l) for insert_social_tokens: soc_l = g(v_j), v_j = V's [CLS] of the frame
    nearest each content word, in the item's clip, its donor clip (`shuffled`) or 0 (`zero`);
    the controls take g's trained `layout`, so they sit where the real vectors sit."""
    if condition == "none":
        return "none", None
    inject = layout if condition in ("zero", "shuffled") else condition
    n_words = sum(len(it.t_p) for it in items)
    if condition == "zero" or n_words == 0:  # (no content word: no V features were loaded)
        return inject, torch.zeros(n_words, g.config["out_dim"], device=g.v_mean.device)
    rows = []
    for it in items:  # the frames of the item's own clip, or of its donor clip (`shuffled`)
        clip = donors[it.clip_id] if condition == "shuffled" and len(it.t_p) else None
        rows.append(word_frames(it, clip_index, clip))
    return inject, g(feats[torch.from_numpy(np.concatenate(rows)).to(feats.device)])


# ============ L (frozen): loaded as g was trained against, its loss, forward passes ============


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
    return utils.FrozenHeadCrossEntropy.apply(*args)


def load_trained_lm(cfg: dict, lm=None, lm_dtype: str = "auto", device="cpu"):
    """(L, tokenizer, {lm, lm_dtype} for the results) as g was trained against: projector.json's
    lm and lm_dtype (cfg; {} without g), unless lm or lm_dtype ("bfloat16", "float32") is given."""
    lm = lm or cfg.get("lm") or utils.EMBEDDED_LM
    dtype = cfg.get("lm_dtype") if lm_dtype == "auto" else lm_dtype  # None: load_lm's default
    L, tokenizer = utils.load_lm(lm, device, getattr(torch, dtype) if dtype else None)
    if cfg and (width := L.config.hidden_size) != cfg["out_dim"]:
        raise ValueError(f"{cfg['file']}: g's out_dim {cfg['out_dim']}, {lm}'s width {width}")
    return L, tokenizer, {"lm": lm, "lm_dtype": str(L.dtype).removeprefix("torch.")}


def forward_batches(L, items, social, condition, batch_size, device, extra=None, **flags):
    """(batch, extra(batch), L's output) per batch of `items` with the social tokens of
    `condition` (social(items, condition) -> inject, soc_l); extra(batch) -> more kwargs of L."""
    for s in range(0, len(items), batch_size):
        part = items[s : s + batch_size]
        with utils.autocast(device):
            inject, soc_l = social(part, condition)
            batch = insert_social_tokens(part, soc_l, L.get_input_embeddings(), inject)
            kw = extra(batch) if extra else {}
            out = lm_forward(L, batch, **flags, **kw)
        yield batch, kw, out


# ============ decoding with L (paper: "At test time, we repeat noun/verb extraction, frame
# selection, projection, and token insertion, and then decode with L") ============


def span_frames(t_sec: np.ndarray, start: float, end: float) -> np.ndarray:
    """The frames nearest to some time in [start, end] (those inside, and the nearest past each
    end): never empty; the frames an utterance's words can take in training."""
    return np.arange(nearest_frame(t_sec, start), nearest_frame(t_sec, end) + 1)


def word_time(span: tuple[int, int], n_chars: int, utt: dict) -> float:
    """t_sec of the word at char `span`: utils.word_times' "spread" of [start, end] over `n_chars`
    characters (while decoding, an estimate of the utterance's length), clamped to `end`."""
    t = utils.word_times([span], max(n_chars, 1), start=utt["start"], end=utt["end"])[0][0]
    return min(t, utt["end"])


def social_items(tokenizer, utts, words, social, n_chars):
    """(items, soc_l [sum w, D] | None, frames [B][w]): utterances as training reads them, their
    nouns and verbs (`words`, utils.PosTagger.tag's; none where social[b] is None) at `word_time`
    with g(v_j) of the nearest frame; earlier turns (u["context"], prep's words) first."""
    items, soc_l, frames = [], [], []
    for b, (u, w, s) in enumerate(zip(utts, words, social, strict=True)):
        w = [x | {"t_sec": word_time((x["char_start"], x["char_end"]), n_chars[b], u)} for x in w]
        context = [c if s is not None else {**c, "words": []} for c in u.get("context", ())]
        it = tokenize_utterance(tokenizer, {**u, "words": w if s is not None else []}, context)
        frames.append([nearest_frame(s[1], t) for t in it.word_t])
        items.append(it)
        soc_l += [s[0][j] for j in frames[-1]]
    return items, torch.stack(soc_l) if soc_l else None, frames


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
    turns, read first with their social tokens). social[b]: evaluate.clip_social's (g(v_j),
    t_sec) of its clip (a donor's: `shuffled`); None: no social token (`none`). `inject`: g's
    trained layout. [SOC-G] (in training the mean of the utterance's [SOC-L], unknown before
    decoding): soc_g[b] (two-pass: evaluate.training_soc_g), else the mean g(v_j) over span_frames
    from the first turn read.
    [SOC-L]: the prompt's nouns and verbs as in training; then, when the next token starts a new
    word (space, punctuation, EOS), the text so far is tagged in context (`lookahead`: with that
    token; spaCy makes a text's last word a noun: "the green") and a noun or verb gets g(v_j) of
    the frame nearest its word_time (n_chars: expected length); the token is sampled again after.
    A row ends at EOS, after max_new_tokens or at a `stop` string. use_cache=False re-reads all
    each step (tests). bias(batch) -> kwargs of L's attention function, whose `social_roles`
    grow here. Returns per prompt {text: new text, ids: BOS, prompt, new tokens (EOS), soc_l:
    [(k, j)]: g(v_j) went in after ids[k]}."""
    from transformers import DynamicCache

    B, embed, tagger = len(prompts), L.get_input_embeddings(), tagger or utils.PosTagger()
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
