"""What two or more stages share: data readers, frame lookup, models, g, the insertion, DDP, I/O.

Sections, in the order the pipeline needs them:
  1. Files and atomic I/O            (every stage)
  2. Distributed set-up              (train_dino, train_proj, evaluate)
  3. Data: manifest, utterances, frames, word times, POS tagging   (prep, train_*, evaluate)
  4. The visual encoder V            (train_dino, train_proj, evaluate)
  5. The frozen LLM L                (train_proj, evaluate)
  6. The projector g and insert_social_tokens   (train_proj, evaluate)
"""

from __future__ import annotations

import json
import os
import random
import tempfile
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
# 2. Distributed set-up (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python is rank 0 of 1)
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


# --------------------------------------------------------------------------------------------
# 3. Data: manifest, utterances, frames, word times, POS tagging
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# 4. The visual encoder V
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# 5. The frozen LLM L
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# 6. The projector g and insert_social_tokens
# --------------------------------------------------------------------------------------------
