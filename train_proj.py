"""train_proj.py — social tokens into a frozen L: train the projector g (and V).

Companion to the paper's §"Local and global social tokens" and §"Training objective and
inference". For every content word (noun/verb) of an utterance, the frame F_j nearest in time
gives v_j = V(F_j)[CLS]; g maps it into L's input-embedding space, [SOC-L]_p = g(v_j) goes right
after the word's last sub-word token t_p, and [SOC-G] = mean_p [SOC-L]_p right after BOS
(common.insert_social_tokens). L stays frozen; next-token cross-entropy on the text tokens
trains g, and V too with --train-encoder (the paper's setting). Without --train-encoder the
[CLS] of every frame is computed once, cached on disk keyed by the encoder, and g trains on it.

  python train_proj.py --data data/demo --out out/proj --encoder out/dino --epochs 3
  torchrun --nproc_per_node=2 train_proj.py --data DATA --out OUT --lm google/gemma-2-2b \\
      --encoder out/dino --train-encoder

Rerunning the same command resumes from OUT/checkpoint.pt. Writes OUT/projector.safetensors +
projector.json (g), OUT/encoder.safetensors + encoder.json when V was trained or randomly
initialised here (so evaluate.py finds the V that g was trained with), metrics.jsonl and
data_report.json (utterances skipped and why).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import common
from common import INJECT_MODES, Projector, TokenizedUtterance

# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "train_proj.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, required=True, help="prep.py --out (manifest, frames...)")
    p.add_argument("--out", type=Path, default=Path("out/proj"), help="outputs and checkpoint")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: use --epochs)")
    p.add_argument("--epochs", type=float, default=3, help="passes over the training utterances")
    p.add_argument("--batch-size", type=int, default=8, help="utterances per step per process")
    p.add_argument("--seed", type=int, default=0, help="seed for g's init, V's init, batch order")
    p.add_argument(
        "--device", default=None, help="cpu or cuda (default: cuda if available); torchrun: cuda"
    )
    p.add_argument(
        "--lm",
        default=common.EMBEDDED_LM,
        help="the frozen LLM L: 'gemma3-270m' (embedded), a Hugging Face id "
        "(google/gemma-2-2b, as in the paper) or a local folder",
    )
    p.add_argument(
        "--encoder",
        type=Path,
        default=None,
        help="V: a train_dino.py --out (encoder.safetensors); without it a randomly initialised "
        "--arch ViT (LayerScale raised so that its [CLS] differs between frames)",
    )
    p.add_argument("--arch", default=common.DEFAULT_ARCH, help="timm ViT for a random V")
    p.add_argument(
        "--inject",
        default="full",
        choices=INJECT_MODES,
        help="social tokens put in: [SOC-G] (global), the [SOC-L] (local), both (full); "
        "'none' trains nothing and only reports L's validation loss",
    )
    p.add_argument(
        "--task",
        default="utterance",
        choices=("utterance", "next-utterance"),
        help="utterance: every text token scored; next-utterance: the previous turns of the "
        "clip come first as unscored context",
    )
    p.add_argument(
        "--context-turns", type=int, default=3, help="previous turns read in next-utterance"
    )
    p.add_argument("--proj-depth", type=int, default=2, help="linear layers of g (1: linear)")
    p.add_argument("--proj-hidden", type=int, default=0, help="width of g (0: L's hidden size)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of g")
    p.add_argument("--encoder-lr", type=float, default=1e-5, help="peak learning rate of V")
    p.add_argument(
        "--train-encoder",
        action="store_true",
        help="fine-tune V jointly with g (the paper); else g trains on cached [CLS] features",
    )
    p.add_argument(
        "--weight-decay", type=float, default=0.01, help="AdamW decay (not on norms/biases)"
    )
    p.add_argument(
        "--warmup", type=float, default=0.05, help="fraction of steps of linear LR warm-up"
    )
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--max-len", type=int, default=256, help="max sequence length, social tokens in")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps")
    p.add_argument(
        "--val-every",
        type=int,
        default=200,
        help="validate every N steps, and at the start and the end (0: once per epoch)",
    )
    p.add_argument("--log-every", type=int, default=10, help="log train metrics every N steps")
    p.add_argument("--encode-batch", type=int, default=64, help="frames per V forward when caching")
    p.add_argument(
        "--attn",
        default="sdpa",
        help="L's attention implementation: sdpa (Gemma 2 has none in transformers and falls "
        "back to eager), eager, flex_attention",
    )
    p.add_argument(
        "--lm-dtype",
        default="auto",
        choices=("auto", "bfloat16", "float32"),
        help="L's weights: auto = bfloat16 on CUDA, float32 on the CPU",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile L's decoder layers and the loss's softmax passes "
        "(default: on with CUDA; bench/RESULTS_proj.md: ~2x a step)",
    )
    return p


# --------------------------------------------------------------------------------------------
# Data: tokenized utterances, the frame of each content word, length-bucketed batches
# --------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One training sequence: the tokenized utterance and the frame row of each content word."""

    item: TokenizedUtterance
    frames: np.ndarray  # int64 [w]: rows of frames.npy, nearest in time to each content word


def build_examples(items: list[TokenizedUtterance], clip_index: dict) -> list[Example]:
    """Pair each tokenized utterance with the frame nearest in time to each of its content words."""
    return [Example(it, common.word_frames(it, clip_index)) for it in items]


def bucket_batches(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, rank: int, world: int
) -> list[np.ndarray]:
    """This rank's batches of one epoch: shuffled, then sorted by length within windows of 50
    batches so a batch holds similar lengths (little padding), then the batches shuffled.
    Every rank gets the same number of batches (DDP steps in lock step)."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    window = batch_size * 50
    batches = []
    for s in range(0, len(perm), window):
        idx = perm[s : s + window]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        batches += [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    per_rank = len(batches) // world
    return batches[rank * per_rank : (rank + 1) * per_rank]


# --------------------------------------------------------------------------------------------
# What is trained: g on V's cached [CLS] features (common.cached_features), or g and V
# --------------------------------------------------------------------------------------------


def input_stats_sample(
    V: torch.nn.Module,
    manifest: list[dict],
    frames: np.ndarray,
    features: torch.Tensor | None,
    args: argparse.Namespace,
    device: torch.device,
) -> torch.Tensor:
    """[CLS] of training frames for g's input standardisation: the cached features, or (with
    --train-encoder) V's initial features of up to 1024 of them."""
    idx = np.array([r["frame_idx"] for r in manifest if r["split"] == "train"], dtype=np.int64)
    if features is not None:
        return features[torch.from_numpy(idx).to(features.device)]
    rng = np.random.default_rng(args.seed)
    idx = np.sort(rng.choice(idx, size=min(1024, len(idx)), replace=False))
    return common.encode_frames(V, frames[idx], args.encode_batch, device)


class Grounding(torch.nn.Module):
    """What is trained: g, and V with --train-encoder. Maps a batch's frames (uint8, V trained) or
    cached [CLS] features (V frozen) to one social vector soc_l per content word."""

    def __init__(self, g: Projector, V: torch.nn.Module | None):
        super().__init__()
        self.g = g
        self.V = V

    def forward(self, x: torch.Tensor, word_index: torch.Tensor) -> torch.Tensor:
        v = self.V(common.normalize_frames(x)) if self.V is not None else x
        return self.g(v[word_index])


def grounding_inputs(
    examples: list[Example],
    features: torch.Tensor | None,
    frames: np.ndarray,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, word_index) for Grounding: each distinct frame of the batch once (its pixels when V is
    trained, else its cached feature) and, per content word, the row of its frame in x."""
    rows = np.concatenate([e.frames for e in examples])
    uniq, inverse = np.unique(rows, return_inverse=True)
    if len(uniq) == 0:  # no content word: one frame keeps the graph (and DDP) whole
        uniq = np.zeros(1, dtype=np.int64)
    word_index = torch.from_numpy(inverse.astype(np.int64)).to(device)
    if features is not None:
        return features[torch.from_numpy(uniq).to(features.device)], word_index
    x = torch.from_numpy(np.ascontiguousarray(frames[uniq]))
    return x.to(device, non_blocking=True), word_index


# --------------------------------------------------------------------------------------------
# Loss, FLOPs, schedule
# --------------------------------------------------------------------------------------------


def batch_loss(
    L,
    embed: torch.nn.Module,
    model: torch.nn.Module,
    examples: list[Example],
    inputs,
    inject: str,
    compiled: bool = False,
) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL of a batch's scored text tokens (paper §"Training objective": social
    tokens are not scored) and their count."""
    soc_l = model(*inputs) if inject != "none" else None
    batch = common.insert_social_tokens([e.item for e in examples], soc_l, embed, inject)
    nll = common.token_nll(L, batch, compiled).sum()
    if soc_l is not None:  # batches without content words still reach every trained parameter
        nll = nll + 0.0 * soc_l.sum()
    return nll, int(batch.loss_pos.numel())


def compile_lm(L) -> None:
    """torch.compile every decoder layer of L: fuses its norms, activation and attention's
    elementwise work. The layers share their code, so one compiled graph serves them all."""
    for layer in L.get_decoder().layers:
        layer.compile()


def lm_flops(config, lengths: np.ndarray, n_scored: int) -> float:
    """FLOPs L spends on a batch: forward plus the input-gradient backward (L is frozen: no
    weight gradients). Matmuls 2 per multiply-add, backward = forward; causal attention
    (QK^T and AV over the T(T+1)/2 pairs of each sequence), backward = 2x forward; the output
    head only on the scored positions."""
    d, layers = config.hidden_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or d // heads
    per_token = 2 * layers * (d * hd * (2 * heads + 2 * kv) + 3 * d * config.intermediate_size)
    attn = 4 * layers * heads * hd * float((lengths * (lengths + 1) // 2).sum())
    head = 2 * d * config.vocab_size * n_scored
    return 2 * per_token * float(lengths.sum()) + 3 * attn + 2 * head


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over `warmup`·total steps, then a cosine to zero."""
    w = max(1, round(warmup * total))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


# --------------------------------------------------------------------------------------------
# The run: set-up, validation, checkpoints, the loop
# --------------------------------------------------------------------------------------------

# Arguments that define what is trained: a checkpoint made with others cannot be resumed.
IDENTITY_ARGS = (
    "lm", "encoder", "arch", "train_encoder", "inject", "task", "proj_depth", "proj_hidden",
)  # fmt: skip


@dataclass
class Run:
    args: argparse.Namespace
    device: torch.device
    L: torch.nn.Module
    embed: torch.nn.Module
    model: torch.nn.Module  # Grounding, DDP-wrapped when distributed
    grounding: Grounding
    V: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    train: list[Example]
    val: list[Example]
    features: torch.Tensor | None
    frames: np.ndarray
    encoder_cfg: dict
    rank: int
    world: int


def build_run(args: argparse.Namespace) -> Run:
    """Load L, V and the data; build g (calibrated to L's embedding norm) and the optimizer."""
    rank, world, device = common.setup_distributed(args.device)
    if args.compile is None:
        args.compile = device.type == "cuda"
    common.seed_everything(args.seed)
    dtype = None if args.lm_dtype == "auto" else getattr(torch, args.lm_dtype)
    L, tokenizer = common.load_lm(args.lm, device, dtype, attn_implementation=args.attn)
    embed = L.get_input_embeddings()
    if args.compile:
        compile_lm(L)

    manifest = common.read_manifest(args.data)
    clip_index = common.clip_frame_index(manifest)
    frames = common.open_frames(args.data)
    report, sets = {}, {}
    for split in ("train", "val"):
        utts = common.read_utterances(args.data, split)
        items, skipped = common.tokenize_split(
            utts, tokenizer, clip_index, args.task, args.context_turns, args.max_len
        )
        sets[split] = build_examples(items, clip_index)
        report[split] = {"utterances": len(utts), "used": len(sets[split]), "skipped": skipped}
    if common.is_main():
        common.write_json(args.out / "data_report.json", report)
    if not sets["train"]:
        raise SystemExit(f"{args.data}/utterances.jsonl: no usable train utterance (see report)")

    if args.encoder is not None:
        V, encoder_cfg = common.load_encoder(args.encoder, device)
    else:
        torch.manual_seed(args.seed)
        V = common.build_vit(args.arch).to(device)
        encoder_cfg = {"arch": args.arch, "img_size": 224, "trained_by": "train_proj.py (random)"}
    features = None
    V.train(args.train_encoder).requires_grad_(args.train_encoder)
    if not args.train_encoder and args.inject != "none":
        features = common.cached_features(V, args.data, frames, device, args.encode_batch)
        features = features.to(device)

    torch.manual_seed(args.seed)
    g = Projector(V.embed_dim, L.config.hidden_size, args.proj_depth, args.proj_hidden or None)
    if args.inject != "none":
        g.fit_input_stats_(input_stats_sample(V, manifest, frames, features, args, device))
    g.calibrate_(common.embedding_norm(embed), seed=args.seed)
    grounding = Grounding(g, V if args.train_encoder else None).to(device)
    model = grounding
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            grounding, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = None
    if args.inject != "none":
        optimizer = torch.optim.AdamW(
            param_groups(grounding, args), betas=(0.9, 0.95), fused=device.type == "cuda"
        )
    return Run(
        args,
        device,
        L,
        embed,
        model,
        grounding,
        V,
        optimizer,
        sets["train"],
        sets["val"],
        features,
        frames,
        encoder_cfg,
        rank,
        world,
    )


def param_groups(grounding: Grounding, args: argparse.Namespace) -> list[dict]:
    """AdamW groups: g at --lr, V at --encoder-lr; no weight decay on norms and biases."""
    groups = []
    for part, lr in ((grounding.g, args.lr), (grounding.V, args.encoder_lr)):
        if part is None:
            continue
        params = [p for p in part.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups += [
            {"params": decay, "weight_decay": args.weight_decay, "base_lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "base_lr": lr},
        ]
    return groups


@torch.no_grad()
def validate(run: Run) -> dict:
    """Validation loss and perplexity over every val utterance (sharded over ranks)."""
    if not run.val:
        return {}
    run.grounding.eval()
    order = np.argsort([common.social_length(e.item, run.args.inject) for e in run.val])
    mine = order[run.rank :: run.world]
    totals = torch.zeros(2, dtype=torch.float64, device=run.device)
    for s in range(0, len(mine), run.args.batch_size):
        examples = [run.val[i] for i in mine[s : s + run.args.batch_size]]
        inputs = grounding_inputs(examples, run.features, run.frames, run.device)
        with common.autocast(run.device):
            nll, n = batch_loss(
                run.L, run.embed, run.grounding, examples, inputs, run.args.inject, run.args.compile
            )
        totals[0] += nll.double()
        totals[1] += n
    if dist.is_initialized():
        dist.all_reduce(totals)
    run.grounding.train(run.args.train_encoder)
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700)), "val_tokens": int(totals[1])}


def checkpoint_state(run: Run, step: int) -> dict:
    return {
        "grounding": run.grounding.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "step": step,
        "rng": common.rng_state(),
        "args": json.dumps(vars(run.args), default=str),
    }


def resume(run: Run, ckpt: dict) -> int:
    """Restore a checkpoint of the same training (IDENTITY_ARGS must match); returns its step."""
    saved = json.loads(ckpt["args"])
    for name in IDENTITY_ARGS:
        now = json.loads(json.dumps(getattr(run.args, name), default=str))
        if saved.get(name) != now:
            raise SystemExit(
                f"{run.args.out / 'checkpoint.pt'}: made with --{name.replace('_', '-')} "
                f"{saved.get(name)!r}, this run has {now!r}; use another --out to start afresh"
            )
    run.grounding.load_state_dict(ckpt["grounding"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    common.set_rng_state(ckpt["rng"])
    return int(ckpt["step"])


def export(run: Run, record: dict) -> None:
    """projector.safetensors + projector.json (and V when it is not the --encoder export as is)."""
    args, g = run.args, run.grounding.g
    encoder = str(args.encoder.resolve()) if args.encoder is not None else None
    if args.train_encoder or args.encoder is None:  # evaluate.py needs the V that g saw
        trained_by = "train_proj.py --train-encoder" if args.train_encoder else "random init"
        cfg = {**run.encoder_cfg, "trained_by": trained_by}
        common.export_encoder(run.V, args.out, cfg)
        encoder = str(args.out.resolve())
    config = {
        **g.config,
        "lm": args.lm,
        "lm_hidden": run.L.config.hidden_size,
        "encoder": encoder,
        "encoder_trained": args.train_encoder,
        "inject": args.inject,
        "task": args.task,
        "context_turns": args.context_turns,
        "max_len": args.max_len,
        **record,
    }
    common.save_safetensors(args.out / "projector.safetensors", g.state_dict(), config)


def log(run: Run, record: dict) -> None:
    if common.is_main():
        with open(run.args.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def train_step(run: Run, examples: list[Example], lr_scale: float) -> tuple[torch.Tensor, int]:
    """One optimizer step of g (and V) on a batch; returns its summed NLL and scored tokens."""
    for grp in run.optimizer.param_groups:
        grp["lr"] = grp["base_lr"] * lr_scale
    inputs = grounding_inputs(examples, run.features, run.frames, run.device)
    with common.autocast(run.device):
        nll, n = batch_loss(
            run.L, run.embed, run.model, examples, inputs, run.args.inject, run.args.compile
        )
    (nll / max(n, 1)).backward()  # mean over the tokens of this rank; DDP averages the ranks
    if run.args.clip_grad:
        torch.nn.utils.clip_grad_norm_(run.grounding.parameters(), run.args.clip_grad)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return nll.detach(), n


def train(args: argparse.Namespace) -> Run:
    args.out.mkdir(parents=True, exist_ok=True)
    run = build_run(args)
    lengths = np.array([common.social_length(e.item, args.inject) for e in run.train])
    per_epoch = len(bucket_batches(lengths, args.batch_size, args.seed, 0, run.rank, run.world))
    if per_epoch == 0:
        raise SystemExit(
            f"{len(run.train)} train utterances make no batch of {args.batch_size} per process "
            f"on {run.world} process(es): lower --batch-size"
        )
    total = args.steps or max(1, round(args.epochs * per_epoch))
    if run.optimizer is None:  # --inject none: L alone, nothing to train
        record = {"step": 0, **validate(run)}
        log(run, record)
        print(f"train_proj: --inject none trains nothing; {record}")
        return run
    step = 0
    ckpt = common.load_checkpoint(args.out / "checkpoint.pt")
    if ckpt is not None:
        step = resume(run, ckpt)
        print(f"train_proj: resumed from {args.out / 'checkpoint.pt'} at step {step}")
    else:  # where g starts from: the reference for every later validation
        log(run, {"step": 0, "epoch": 0.0, **validate(run)})
    peak = common.matmul_peak_tflops(run.device, run.L.dtype)
    bar = tqdm(total=total, initial=step, desc="train_proj", disable=not common.is_main())
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    n_tok, n_seen, flops, t0 = 0, 0, 0.0, time.perf_counter()
    record: dict = {}
    epoch, batches = -1, []
    while step < total:
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            batches = bucket_batches(
                lengths, args.batch_size, args.seed, epoch, run.rank, run.world
            )
        batch = batches[step % per_epoch]
        nll, n = train_step(run, [run.train[i] for i in batch], lr_factor(step, total, args.warmup))
        step += 1
        bar.update()
        loss_sum += nll
        n_tok += n
        n_seen += int(lengths[batch].sum())
        flops += lm_flops(run.L.config, lengths[batch], n)
        if step % args.log_every == 0 or step == total:
            stats = torch.cat([loss_sum[None], loss_sum.new_tensor([n_tok, n_seen, flops])])
            if dist.is_initialized():  # every rank's share (the one host sync of the hot loop)
                dist.all_reduce(stats)
            loss_total, n_tok, n_seen, flops = stats.tolist()
            loss = loss_total / max(n_tok, 1)
            if not math.isfinite(loss):
                raise SystemExit(
                    f"non-finite training loss at step {step}; the last good checkpoint is "
                    f"{args.out / 'checkpoint.pt'} (lower --lr?)"
                )
            common.sync(run.device)
            dt = time.perf_counter() - t0
            record = {
                "step": step,
                "epoch": step / per_epoch,
                "loss": loss,
                "ppl": math.exp(min(loss, 700)),
                "lr": run.optimizer.param_groups[0]["lr"],
                "tokens_per_s": n_seen / dt,
                "mfu": flops / dt / (peak * 1e12 * run.world),
                "peak_mem_gb": common.peak_memory_gb(run.device),
            }
            log(run, record)
            bar.set_postfix(
                loss=f"{loss:.3f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                mfu=f"{record['mfu']:.1%}",
            )
            loss_sum.zero_()
            n_tok, n_seen, flops, t0 = 0, 0, 0.0, time.perf_counter()
        due = step % (args.val_every or per_epoch) == 0  # small sets: many epochs, few checks
        if due or step == total:
            val = {"step": step, "epoch": step / per_epoch, **validate(run)}
            log(run, val)
            if common.is_main() and val.get("val_loss") is not None:
                bar.write(f"step {step}: val loss {val['val_loss']:.4f} ppl {val['val_ppl']:.2f}")
            record = {**record, **val}
            t0 = time.perf_counter()
        if step % args.save_every == 0 or step == total:
            if common.is_main():
                common.save_checkpoint(args.out / "checkpoint.pt", checkpoint_state(run, step))
            if dist.is_initialized():
                dist.barrier()
    bar.close()
    if common.is_main():
        export(run, {k: record[k] for k in ("step", "val_loss", "val_ppl") if k in record})
        print(f"train_proj: wrote {args.out / 'projector.safetensors'}")
    return run


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    try:
        train(args)
    finally:
        common.cleanup_distributed()


if __name__ == "__main__":
    main()
