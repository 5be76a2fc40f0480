"""train_proj.py — social tokens into a frozen L: train the projector g (and V).

Paper §"Local and global social tokens" and §"Training objective and inference". For every
content word (noun/verb) of an utterance the frame F_j nearest in time gives v_j = V(F_j)[CLS];
[SOC-L]_p = g(v_j) goes right after the word's last sub-word token t_p and [SOC-G] = mean_p
[SOC-L]_p right after BOS (common.insert_social_tokens). L stays frozen; next-token
cross-entropy on the text trains g, and V too with --train-encoder (the paper's setting).
Without --train-encoder V's [CLS] of every frame is computed once (cached on disk) and g
trains on it.

  python train_proj.py --data data/demo --out out/proj --encoder out/dino --epochs 3
  torchrun --nproc_per_node=2 train_proj.py --data DATA --out OUT --lm google/gemma-2-2b \\
      --encoder out/dino --train-encoder

Rerunning the same command resumes from OUT/checkpoint.pt. Writes OUT/projector.safetensors +
projector.json (g), OUT/encoder.safetensors + encoder.json when V was trained or randomly
initialised here (evaluate.py then finds the V that g saw), metrics.jsonl and data_report.json
(utterances skipped and why).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
import utils


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "train_proj.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, required=True, help="prep.py --out (manifest, frames...)")
    p.add_argument("--out", type=Path, default=Path("out/proj"), help="outputs and checkpoint")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: use --epochs)")
    p.add_argument("--epochs", type=float, default=3, help="passes over the training utterances")
    p.add_argument("--batch-size", type=int, default=8, help="utterances per step, all processes")
    p.add_argument("--seed", type=int, default=0, help="seed of g's init, V's init, batch order")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    # what is trained
    p.add_argument("--lm", default=utils.EMBEDDED_LM, help="L: gemma3-270m, hub id, folder")
    p.add_argument("--encoder", type=Path, help="V: a train_dino.py --out (none: a random --arch)")
    p.add_argument("--arch", default=utils.DEFAULT_ARCH, help="timm ViT for a random V")
    p.add_argument("--inject", default="full", choices=common.INJECT_MODES, help="[SOC-*] put in")
    p.add_argument("--task", default="utterance", choices=("utterance", "next-utterance"))
    p.add_argument("--context-turns", type=int, default=3, help="earlier turns (next-utterance)")
    p.add_argument("--proj-depth", type=int, default=2, help="linear layers of g (1: linear)")
    p.add_argument("--proj-hidden", type=int, default=0, help="width of g (0: L's hidden size)")
    p.add_argument("--train-encoder", action="store_true", help="fine-tune V with g (the paper)")
    # optimisation
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of g")
    p.add_argument("--encoder-lr", type=float, default=1e-5, help="peak learning rate of V")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay (not on 1-d)")
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps of LR warm-up")
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--max-len", type=int, default=256, help="max sequence length, social tokens in")
    # engineering
    p.add_argument("--lm-dtype", default="auto", choices=("auto", *common.LM_DTYPES))
    p.add_argument("--attn", default="sdpa", help="L's attention: sdpa, eager, flex_attention")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="default: on CUDA")
    p.add_argument("--encode-batch", type=int, default=64, help="frames per V forward when caching")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps")
    p.add_argument("--val-every", type=int, default=200, help="validate every N steps (0: epoch)")
    p.add_argument("--log-every", type=int, default=10, help="log train metrics every N steps")
    return p


# Flags that define what is trained: a checkpoint made with others is refused.
IDENTITY = ("lm", "encoder", "arch", "train_encoder", "inject", "task", "proj_depth", "proj_hidden")

# ============ the paper's pieces: g's start, the social vectors, the loss ============


@torch.no_grad()
def init_projector(in_dim: int, L, v_train: torch.Tensor | None, args) -> common.Projector:
    """g's start: inputs standardised with the mean and std over training frames of their [CLS]
    (v_train), outputs at the median norm of L's token embeddings as they enter L (Gemma 3
    scales inside get_input_embeddings()): [SOC-*] start where text tokens live."""
    torch.manual_seed(args.seed)
    g = common.Projector(in_dim, L.config.hidden_size, args.proj_depth, args.proj_hidden)
    if v_train is not None:
        std = v_train.float().std(0)
        g.v_mean.copy_(v_train.float().mean(0))
        g.v_std.copy_(std.clamp_min(1e-6 * std.max().item() + 1e-12))
    embed, vocab = L.get_input_embeddings(), L.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (min(4096, vocab),), generator=torch.Generator().manual_seed(0))
    target = embed(ids.to(embed.weight.device)).float().norm(dim=-1).median().item()
    last = g.net[-1]
    last.bias.zero_()
    x = torch.randn(
        1024, in_dim, generator=torch.Generator().manual_seed(args.seed)
    )  # standardised
    last.weight.mul_(target / g.net(x.to(last.weight)).norm(dim=-1).mean().item())
    return g


def soc_l_of_frames(g, V, rows: list[np.ndarray], features, frames, device) -> torch.Tensor:
    """soc_l = g(v_j), one per content word of the batch: v_j from the cached features, or
    V(F_j) with --train-encoder (each distinct frame through V once)."""
    uniq, inverse = np.unique(np.concatenate(rows), return_inverse=True)
    if len(uniq) == 0:  # no content word: one frame keeps every trained parameter in the graph
        uniq = np.zeros(1, dtype=np.int64)
    if features is not None:
        v = features[torch.from_numpy(uniq).to(features.device)]
    else:
        x = torch.from_numpy(np.ascontiguousarray(frames[uniq])).to(device, non_blocking=True)
        v = V(utils.normalize_frames(x))
    return g(v[torch.from_numpy(inverse.astype(np.int64)).to(device)])


def batch_nll(L, g, V, items, rows, features, frames, args, device) -> tuple[torch.Tensor, int]:
    """Summed -log P_L of the batch's scored text tokens (social tokens are not scored, paper
    §"Training objective") and their count."""
    soc_l = None
    if args.inject != "none":
        soc_l = soc_l_of_frames(g, V, rows, features, frames, device)
    batch = common.insert_social_tokens(items, soc_l, L.get_input_embeddings(), args.inject)
    nll = common.token_nll(L, batch, args.compile).sum()
    if soc_l is not None:  # a batch without content words still reaches every parameter (DDP)
        nll = nll + 0.0 * soc_l.sum()
    return nll, int(batch.loss_pos.numel())


def lm_flops(config, lengths: np.ndarray, n_scored: int, backward: bool = True) -> float:
    """FLOPs L spends on a batch: forward and input-gradient backward (L is frozen: no weight
    gradients, backward = forward for matmuls, 2x for causal attention over T(T+1)/2 pairs);
    the output head on the scored positions only. 2 FLOPs per multiply-add."""
    d, layers = config.hidden_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or d // heads
    per_token = 2 * layers * (d * hd * (2 * heads + 2 * kv) + 3 * d * config.intermediate_size)
    attn = 4 * layers * heads * hd * float((lengths * (lengths + 1) // 2).sum())
    fwd = per_token * float(lengths.sum()), attn, 2 * d * config.vocab_size * n_scored
    return 2 * fwd[0] + 3 * fwd[1] + 2 * fwd[2] if backward else sum(fwd)


# ============ the run ============


def train_proj(args: argparse.Namespace):
    """Train g (and V) against the frozen L; returns (g, L)."""
    rank, world, device = utils.setup_distributed(args.device)
    per_rank = utils.rank_batch(args.batch_size, world)
    args.out.mkdir(parents=True, exist_ok=True)
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    utils.seed_everything(args.seed)

    # ============ loading L and the data ============
    dtype = None if args.lm_dtype == "auto" else getattr(torch, args.lm_dtype)
    L, tokenizer = utils.load_lm(args.lm, device, dtype, attn_implementation=args.attn)
    if args.compile:
        utils.compile_lm(L)
    manifest = utils.read_manifest(args.data)
    clip_index = utils.clip_frame_index(manifest)
    frames = utils.open_frames(args.data)
    sets, report = {}, {}
    for split in ("train", "val"):
        utts = utils.read_utterances(args.data, split)
        items, skipped = common.tokenize_split(
            utts, tokenizer, clip_index, args.task, args.context_turns, args.max_len
        )
        rows = [common.word_frames(it, clip_index) for it in items]
        lengths = np.array([common.social_length(it, args.inject) for it in items], dtype=np.int64)
        sets[split] = (items, rows, lengths)
        report[split] = {"utterances": len(utts), "used": len(items), "skipped": skipped}
    if utils.is_main():
        utils.write_json(args.out / "data_report.json", report)
    if not sets["train"][0]:
        raise SystemExit(f"{args.data}/utterances.jsonl: no usable train utterance (see report)")

    # ============ V, its features, and g ============
    if args.encoder is not None:
        V, encoder_cfg = utils.load_encoder(args.encoder, device)
    else:
        torch.manual_seed(args.seed)
        V = utils.build_vit(args.arch).to(device)
        encoder_cfg = {"arch": args.arch, "img_size": 224}
    V.train(args.train_encoder).requires_grad_(args.train_encoder)
    train_rows = np.array([r["frame_idx"] for r in manifest if r["split"] == "train"])
    features, v_train = None, None
    if args.inject != "none" and not args.train_encoder:
        features = utils.cached_features(V, args.data, frames, device, args.encode_batch)
        features = features.to(device)
        v_train = features[torch.from_numpy(train_rows).to(device)]
    elif args.inject != "none":  # V's initial [CLS] of up to 1024 training frames
        pick = np.random.default_rng(args.seed).choice(
            train_rows, min(1024, len(train_rows)), False
        )
        v_train = utils.encode_frames(V, frames[np.sort(pick)], args.encode_batch, device)
    g = init_projector(V.embed_dim, L, v_train, args).to(device)
    g_fwd, V_fwd = g, V  # what the step calls: DDP averages the gradients across ranks
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        g_fwd = DDP(g, device_ids=ids)
        V_fwd = DDP(V, device_ids=ids) if args.train_encoder else V

    def nll_of(s: str, idx, g_, V_) -> tuple[torch.Tensor, int]:
        items, rows, _ = sets[s]
        with utils.autocast(device):
            return batch_nll(
                L, g_, V_, [items[i] for i in idx], [rows[i] for i in idx],
                features, frames, args, device,
            )  # fmt: skip

    @torch.no_grad()
    def validate() -> dict:
        """Validation loss and perplexity over every val utterance (sharded over ranks)."""
        if not sets["val"][0]:
            return {}
        g.eval()
        V.eval()
        mine = np.argsort(sets["val"][2], kind="stable")[rank::world]
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        for s in range(0, len(mine), per_rank):
            nll, n = nll_of("val", mine[s : s + per_rank], g, V)
            totals += torch.stack([nll.double(), totals.new_tensor(n)])
        if dist.is_initialized():
            dist.all_reduce(totals)
        g.train()
        V.train(args.train_encoder)
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700)), "val_tokens": int(totals[1])}

    lengths = sets["train"][2]
    scored = np.array([len(it.input_ids) - it.score_from for it in sets["train"][0]])  # tokens
    per_epoch = len(bucket_batches(lengths, args.batch_size, args.seed, 0))
    if per_epoch == 0:
        raise SystemExit(
            f"{len(lengths)} train utterances make no batch of {args.batch_size}: lower --batch-size"
        )
    total = args.steps or max(1, round(args.epochs * per_epoch))
    if args.inject == "none":  # L alone: nothing to train, only its validation loss
        record = {"step": 0, **validate()}
        utils.log_metrics(args.out, record)
        utils.print0(f"train_proj: --inject none trains nothing; {record}")
        return g, L

    # ============ optimizer, schedule, optionally resume ============
    groups = utils.param_groups(g, args.weight_decay, base_lr=args.lr)
    if args.train_encoder:
        groups += utils.param_groups(V, args.weight_decay, base_lr=args.encoder_lr)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=device.type == "cuda")
    lr_scale = utils.cosine_schedule(1.0, 0.0, total, max(1, round(args.warmup * total)))
    ckpt_path = args.out / "checkpoint.pt"
    ckpt = utils.resume_checkpoint(ckpt_path, args, IDENTITY)
    step = 0
    if ckpt is not None:
        g.load_state_dict(ckpt["g"])
        if args.train_encoder:
            V.load_state_dict(ckpt["V"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = int(ckpt["step"])
        utils.print0(f"train_proj: resumed from {ckpt_path} at step {step}")
    else:  # where g starts from: the reference for every later validation
        utils.log_metrics(args.out, {"step": 0, "epoch": 0.0, **validate()})

    # ============ training ============
    utils.print0(
        f"train_proj: {len(lengths)} utterances, global batch {args.batch_size} = {world} "
        f"process(es) x {per_rank}, {per_epoch} steps/epoch, steps {step}->{total}"
    )
    peak = utils.matmul_peak_tflops(device, L.dtype)
    bar = tqdm(total=total, initial=step, desc="train_proj", disable=not utils.is_main())
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_tok, n_seen, flops, t0, record, batches = 0, 0, 0.0, time.perf_counter(), {}, []
    while step < total:
        utils.fail_point(rank, step)
        epoch, j = divmod(step, per_epoch)
        if j == 0 or not batches:  # one epoch's batches at a time
            batches = bucket_batches(lengths, args.batch_size, args.seed, epoch)
        batch = batches[j][rank::world]  # this rank's rows of the global batch
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * float(lr_scale[step])
        nll, n = nll_of("train", batch, g_fwd, V_fwd)
        # the mean over the global batch's tokens: DDP averages the ranks' gradients (÷ world)
        (nll * world / max(int(scored[batches[j]].sum()), 1)).backward()
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(
                [p for grp in groups for p in grp["params"]], args.clip_grad
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update()
        loss_sum += nll.detach()
        n_tok, n_seen = n_tok + n, n_seen + int(lengths[batch].sum())
        flops += lm_flops(L.config, lengths[batch], n)
        if step % args.log_every == 0 or step % args.save_every == 0 or step == total:
            stats = torch.cat([loss_sum[None], loss_sum.new_tensor([n_tok, n_seen, flops])])
            if dist.is_initialized():  # every rank's share: the one host sync of the loop
                dist.all_reduce(stats)
            loss = stats[0].item() / max(stats[1].item(), 1)
            utils.check_finite(loss, step, ckpt_path, "Lower --lr?")
            utils.sync(device)
            dt = time.perf_counter() - t0
            record = {
                "step": step, "epoch": step / per_epoch, "loss": loss,
                "ppl": math.exp(min(loss, 700)), "lr": optimizer.param_groups[0]["lr"],
                "tokens_per_s": stats[2].item() / dt, "mfu": stats[3].item() / dt / (peak * 1e12 * world),
                "peak_mem_gb": utils.peak_memory_gb(device),
            }  # fmt: skip
            utils.log_metrics(args.out, record)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            loss_sum.zero_()
            n_tok, n_seen, flops, t0 = 0, 0, 0.0, time.perf_counter()
        if step % (args.val_every or per_epoch) == 0 or step == total:
            val = {"step": step, "epoch": step / per_epoch, **validate()}
            utils.log_metrics(args.out, val)
            if "val_loss" in val:
                bar.write(f"step {step}: val loss {val['val_loss']:.4f} ppl {val['val_ppl']:.2f}")
            record, t0 = {**record, **val}, time.perf_counter()
        if step % args.save_every == 0 or step == total:
            if utils.is_main():
                state = {"g": g.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
                if args.train_encoder:
                    state["V"] = V.state_dict()
                utils.save_checkpoint(ckpt_path, state, args)
            if dist.is_initialized():
                dist.barrier()
    bar.close()
    utils.plot_metrics(args.out, ("loss", "val_ppl", "lr"))

    # ============ export ============
    if utils.is_main():
        encoder = args.encoder
        if args.train_encoder or args.encoder is None:  # evaluate.py needs the V that g saw
            by = "train_proj.py --train-encoder" if args.train_encoder else "train_proj.py (random)"
            utils.export_encoder(V, args.out, {**encoder_cfg, "trained_by": by})
            encoder = args.out
        # relative to the projector's folder (lexically): the two can move together (out/ copied
        # off a GPU box)
        encoder = os.path.relpath(os.path.abspath(encoder), os.path.abspath(args.out))
        config = {
            **g.config, "lm": args.lm, "lm_hidden": L.config.hidden_size,
            "lm_dtype": str(L.dtype).removeprefix("torch."), "encoder": encoder,
            "encoder_trained": args.train_encoder, "inject": args.inject, "task": args.task,
            "context_turns": args.context_turns, "max_len": args.max_len,
            "frame_size": list(frames.shape[1:3]),  # the canvas V saw: evaluate --frame's
            **{k: record[k] for k in ("step", "val_loss", "val_ppl") if k in record},
        }  # fmt: skip
        utils.save_safetensors(args.out / "projector.safetensors", g.state_dict(), config)
        print(f"train_proj: wrote {args.out / 'projector.safetensors'}")
    return g, L


# ============ engineering: length-bucketed batches ============


def bucket_batches(lengths, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The global batches of one epoch, a function of (seed, epoch) alone (not of the number of
    processes): shuffled, sorted by length within windows of 50 batches (little padding), full
    batches only, the batches shuffled. Rank r of N takes rows r::N of each (similar lengths)."""
    rng = np.random.default_rng([seed, epoch])
    perm, window, batches = rng.permutation(len(lengths)), batch_size * 50, []
    for s in range(0, len(perm), window):
        idx = perm[s : s + window]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        full = range(0, len(idx) - batch_size + 1, batch_size)  # a short last batch is dropped
        batches += [idx[i : i + batch_size] for i in full]
    return [batches[i] for i in rng.permutation(len(batches))]


def main(argv: list[str] | None = None) -> None:
    with utils.distributed_exit():
        train_proj(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    main()
