"""Stage 2: fine-tune the visual encoder V by DINO self-distillation on the frames F_1..F_m.

Paper §"Finetuning the visual encoder": V (timm's `vit_small_patch14_dinov2`; the paper's ViT-B with
--arch) learns DINO's objective (Caron et al. 2021) on the frames, so that its [CLS] v_j carries the
social scene. The student (V + DINO head) sees 2 global and --local-crops local crops of a frame
(made on the GPU: end of file), the teacher (an EMA of the student) the 2 global ones; the loss is
H(P_t(x), P_s(x')) over pairs of views x != x', P_t centred and sharpened. Writes checkpoint.pt
(rerun to resume), metrics.jsonl and the teacher's V (encoder.safetensors + .json) under --out.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import queue
import threading
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import checkpoint_filter_fn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import utils

# the flags that define what is trained: a checkpoint made with others is refused
IDENTITY = ("arch", "depth", "embed_dim", "out_dim", "head_hidden", "bottleneck", "pretrained",
            "init", "layerscale_init", "global_size", "local_size", "local_crops",
            "freeze_blocks", "bn_head")  # fmt: skip
PAPER_EPOCHS = 100  # DINO's run: its warm-up, last-layer freeze and ramps are fractions of it
EMA_HORIZON = 5.0  # a short run's teacher moves at least this far: sum of (1 - momentum) >= 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    # data and run
    add("--data", required=True, help="prep.py output dir (frames.npy, manifest.csv)")
    add("--out", required=True, help="output dir: checkpoint, metrics, encoder export")
    add("--splits", default=["train"], type=lambda s: s.split(","), help="manifest splits (a,b)")
    add("--epochs", type=float, default=100, help="passes over the frames")
    add("--steps", type=int, default=None, help="total optimizer steps (wins over --epochs)")
    add("--batch-size", type=int, default=64, help="frames per step, all processes together")
    add("--seed", type=int, default=0, help="seed of data order, crops and init")
    add("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if any")
    # V and the DINO head
    add("--arch", default=utils.DEFAULT_ARCH, help="timm ViT name (V)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--pretrained", action="store_true", help="start from timm's hub weights")
    start.add_argument("--init", default=None, help="start from local weights (.safetensors/.pth)")
    add("--layerscale-init", type=float, default=utils.LAYERSCALE_INIT, help="γ of a random V")
    add("--depth", type=int, default=None, help="override the ViT depth (quick runs)")
    add("--embed-dim", type=int, default=None, help="override the ViT width, heads = width/64")
    add("--drop-path", type=float, default=0.1, help="stochastic depth of the student")
    add("--out-dim", type=int, default=65536, help="DINO head output dimension K")
    add("--head-hidden", type=int, default=2048, help="DINO head MLP width")
    add("--bottleneck", type=int, default=256, help="DINO head bottleneck width")
    add("--bn-head", action="store_true", help="BatchNorm in the head (DINO's use_bn_in_head)")
    add("--freeze-blocks", type=int, default=0, help="freeze patch embed + first K blocks")
    add("--compile", action="store_true", help="torch.compile networks, crops, loss")
    add("--fp8", action="store_true", help="float8 matmuls in V (torchao; widths: multiples of 16)")
    add("--bf16-stream", action="store_true", help="V's residual stream in bf16 on GPUs (DINOv2's)")
    # optimisation
    add("--lr", type=float, default=5e-4, help="peak LR per 256 frames (scaled)")
    add("--min-lr", type=float, default=1e-6, help="LR at the end of the cosine")
    add("--warmup-epochs", type=float, default=10, help="linear LR warm-up")
    add("--weight-decay", type=float, default=0.04, help="weight decay at the start")
    add("--weight-decay-end", type=float, default=0.4, help="weight decay at the end")
    add("--clip-grad", type=float, default=3.0, help="per-parameter grad norm clip (0: off)")
    add("--freeze-last-layer", type=float, default=1, help="epochs with the last layer frozen")
    add("--momentum-teacher", type=float, default=0.996, help="EMA momentum at the start")
    add("--teacher-temp", type=float, default=0.04, help="teacher temperature")
    add("--warmup-teacher-temp", type=float, default=0.04, help="teacher temperature at step 0")
    add("--warmup-teacher-temp-epochs", type=float, default=0, help="its linear warm-up")
    # multi-crop
    add("--global-size", type=int, default=224, help="global crop side (pixels)")
    add("--local-size", type=int, default=98, help="local crop side (pixels)")
    add("--local-crops", type=int, default=8, help="local crops per frame")
    add("--global-scale", type=float, nargs=2, default=(0.4, 1.0), help="area range, globals")
    add("--local-scale", type=float, nargs=2, default=(0.05, 0.4), help="area range, locals")
    add("--jitter-p", type=float, default=0.8, help="colour jitter probability of a crop")
    add("--grey-p", type=float, default=0.2, help="grayscale probability of a crop")
    add("--blur-p", type=float, nargs=3, default=(1.0, 0.1, 0.5), help="global 1, 2, locals")
    add("--solarize-p", type=float, default=0.2, help="solarize probability, second global")
    # bookkeeping
    add("--save-every", type=int, default=500, help="checkpoint every N steps")
    add("--log-every", type=int, default=10, help="log (and sync) every N steps")
    return p.parse_args(argv)


# ============ DINO: head, loss, centre, EMA, clipping, schedules; student, V, FLOPs ============


class DINOHead(nn.Module):
    """DINO's projection head: a 3-layer MLP (GELU) to a bottleneck, L2-normalised, then a
    weight-normalised linear layer to K = out_dim logits (rows of norm 1: weight_norm, g = 1)."""

    def __init__(self, in_dim, out_dim, hidden=2048, bottleneck=256, bn=False):
        super().__init__()
        layers = [nn.Linear(*d) for d in ((in_dim, hidden), (hidden, hidden), (hidden, bottleneck))]
        mlp = [layers[0]]  # Linear (BatchNorm) GELU Linear (BatchNorm) GELU Linear
        for linear in layers[1:]:
            mlp += [nn.BatchNorm1d(hidden)] * bn + [nn.GELU(), linear]
        self.mlp = nn.Sequential(*mlp)
        for m in layers:
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=-1))


class MultiCropNet(nn.Module):
    """V + head (DINO's MultiCropWrapper): V once per crop size, the head once on all [CLS]."""

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, *crops: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([utils.run_vit(self.backbone, x) for x in crops]))


def dino_loss(student_out, teacher_out, center, teacher_temp, student_temp=0.1):
    """DINO's loss: the mean over pairs (teacher view i, student view v != i) of H(P_t, P_s) =
    -sum_k P_t log P_s, P_t = softmax((t - center) / teacher_temp) (no gradient), P_s =
    softmax(s / student_temp). Rows view-major: student_out [V*B, K] (2 globals first),
    teacher_out [2*B, K]. With q_i = P_t of view i and lp_v = log P_s of view v, two products:
        sum_v sum_{i != v} q_i . lp_v = (q_0 + q_1) . sum_v lp_v - sum_{i<2} q_i . lp_i."""
    batch = teacher_out.shape[0] // 2
    log_p = F.log_softmax(student_out.float() / student_temp, -1).unflatten(0, (-1, batch))
    p_t = F.softmax((teacher_out.float() - center) / teacher_temp, -1).unflatten(0, (2, batch))
    p_t = p_t.detach()  # [2, B, K]; log_p [V, B, K]
    cross = (p_t.sum(0) * log_p.sum(0)).sum() - (p_t * log_p[:2]).sum()
    return -cross / ((2 * log_p.shape[0] - 2) * batch)  # pairs: 2 teacher views x (V - 1)


@torch.no_grad()
def update_center(center, teacher_out, momentum: float = 0.9) -> torch.Tensor:
    """center <- m·center + (1 - m)·mean teacher output of the global batch (all ranks' mean)."""
    batch_center = utils.all_reduce_mean(teacher_out.float().mean(0, keepdim=True))
    return center * momentum + batch_center * (1 - momentum)


@torch.no_grad()
def teacher_stats(t_out, center, teacher_temp) -> dict:
    """Collapse diagnostics of the teacher's targets P_t on this rank's batch: mean entropy, the
    frame-prototype mutual information H(mean P_t) - mean H(P_t) (0: nothing to distil)."""
    p_t = F.softmax((t_out.float() - center) / teacher_temp, dim=-1)
    entropy = -(p_t * p_t.clamp_min(1e-30).log()).sum(-1).mean()
    mean = p_t.mean(0)
    mi = -(mean * mean.clamp_min(1e-30).log()).sum() - entropy
    used = p_t.argmax(-1).unique().numel()  # prototypes some frame of the batch picks
    return {"teacher_entropy": entropy.item(), "teacher_mi": mi.item(), "prototypes_used": used}


def ema_update(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], m: float):
    """Teacher = EMA of the student: theta_t <- m * theta_t + (1 - m) * theta_s (one lerp)."""
    torch._foreach_lerp_(teacher_params, [p.detach() for p in student_params], 1 - m)


@torch.no_grad()
def clip_gradients(params: list[torch.Tensor], clip: float) -> None:
    """Per-parameter clipping as in DINO: each gradient scaled to norm <= clip on its own."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack(torch._foreach_norm(grads))
    torch._foreach_mul_(grads, (clip / (norms + 1e-6)).clamp(max=1.0).unbind())


def schedules(args, total: int, steps_per_epoch: int, device) -> dict:
    """DINO's, one value per step: LR (peak --lr x global batch / 256), weight decay, momentum to 1,
    teacher temperature (on the device), last layer frozen. A run shorter than DINO's 100 epochs
    keeps warm-ups and freeze as fractions and starts the teacher momentum low (EMA_HORIZON)."""

    def in_steps(epochs: float) -> int:  # a run shorter than DINO's keeps the fraction
        return min(total, round(epochs * steps_per_epoch), round(epochs / PAPER_EPOCHS * total))

    peak_lr = args.lr * args.batch_size / 256
    # the cosine from m0 to 1 sums (1 - m0)·total/2 of (1 - m): at least EMA_HORIZON
    m0 = min(args.momentum_teacher, max(0.0, 1 - 2 * EMA_HORIZON / total))
    warm = in_steps(args.warmup_teacher_temp_epochs)
    temp = np.linspace(args.warmup_teacher_temp, args.teacher_temp, warm)  # then constant
    temp = np.concatenate([temp, np.full(total - warm, args.teacher_temp)])
    return {
        "lr": utils.cosine_schedule(peak_lr, args.min_lr, total, in_steps(args.warmup_epochs)),
        "weight_decay": utils.cosine_schedule(args.weight_decay, args.weight_decay_end, total),
        "momentum": utils.cosine_schedule(m0, 1.0, total),
        "teacher_temp": torch.tensor(temp, dtype=torch.float32, device=device),
        "freeze_last_layer": np.arange(total) < in_steps(args.freeze_last_layer),
    }


def vit_overrides(args: argparse.Namespace) -> dict:  # timm's, from --depth / --embed-dim
    over = {} if args.depth is None else {"depth": args.depth}
    if args.embed_dim is not None:
        over.update(embed_dim=args.embed_dim, num_heads=max(1, args.embed_dim // 64))
    return over


def build_networks(args: argparse.Namespace) -> tuple[MultiCropNet, MultiCropNet]:
    """Student (V + DINO head) and teacher (a copy: no gradient, eval mode so no drop-path; a
    BatchNorm head in train mode, on batch statistics, as DINO's teacher)."""
    layerscale = None if args.init else args.layerscale_init  # --init: the file's LayerScale
    V = utils.build_vit(args.arch, pretrained=args.pretrained, layerscale_init=layerscale,
                         img_size=args.global_size, drop_path_rate=args.drop_path,
                         half_stream=args.bf16_stream, **vit_overrides(args))  # fmt: skip
    if args.init:
        load_vit_weights(V, args.init)
    if args.freeze_blocks > 0:  # patch embedding, [CLS], register and position tokens, K blocks
        tokens = [getattr(V, name, None) for name in ("cls_token", "pos_embed", "reg_token")]
        tokens = [t for t in tokens if isinstance(t, nn.Parameter)]
        for part in [V.patch_embed, *tokens, *V.blocks[: args.freeze_blocks]]:
            part.requires_grad_(False)
    head = DINOHead(V.embed_dim, args.out_dim, args.head_hidden, args.bottleneck, args.bn_head)
    student = MultiCropNet(V, head)
    if args.bn_head and dist.is_initialized() and dist.get_backend() == "nccl":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)  # statistics of all ranks
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    teacher.head.train()  # only BatchNorm cares: batch statistics, never the running ones
    if args.fp8:  # the same parameters, float8 matmuls; the teacher stays in bf16
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(student.backbone)
    return student, teacher


def load_vit_weights(V: nn.Module, path: str | Path) -> None:
    """Load local weights into V (--init): .safetensors (train_dino's export) or a torch file read
    with weights_only=True: a DINOv2 .pth, a timm state dict or a DINO checkpoint ({"teacher":
    ...}, "module." / "_orig_mod." / "backbone." prefixes, its DINO head left out)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file (expected .safetensors or .pth)")
    sd = (safetensors.torch.load_file(str(path)) if path.suffix == ".safetensors"
          else torch.load(path, map_location="cpu", weights_only=True))  # fmt: skip
    sd = next((sd[k] for k in ("teacher", "model", "state_dict") if k in sd), sd)
    state = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} is not a tensor (expected a state dict of V)")
        k = k.removeprefix("module.").removeprefix("_orig_mod.").removeprefix("backbone.")
        if not k.startswith("head."):
            state[k] = v
    state = checkpoint_filter_fn(state, V)  # resamples position embeddings
    missing, unexpected = V.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit {type(V).__name__} (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}); expected V's own state dict")  # fmt: skip


def vit_flops(V: nn.Module, height: int, width: int) -> float:
    """Forward FLOPs of V on one height×width image (2 per multiply-add): patch embedding, then per
    block qkv/proj/MLP matmuls (2·N·D·(4D + 2·mlp)) and attention (4·N²·D), N tokens."""
    p = V.patch_embed.patch_size
    patches = (height // p[0]) * (width // p[1])
    n, d = patches + V.num_prefix_tokens, V.embed_dim
    flops = 2 * patches * 3 * p[0] * p[1] * d
    for blk in V.blocks:
        flops += 2 * n * d * (4 * d + 2 * blk.mlp.fc1.out_features) + 4 * n * n * d
    return float(flops)


def step_flops(V: nn.Module, head: DINOHead, args: argparse.Namespace) -> float:
    """Model FLOPs per frame of one step, per crop resolution: the student's forward and backward
    (3x forward) over 2 global + n local crops, the teacher's forward over the globals."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    head_f = 2.0 * sum(m.in_features * m.out_features for m in linears)
    glob, loc = (vit_flops(V, s, s) + head_f for s in (args.global_size, args.local_size))
    return 3 * (2 * glob + args.local_crops * loc) + 2 * glob


# ============ frame batches: training frames, each rank's share of a step, a reader ============


class FrameBatches:
    """The frames of each step: the frames of `splits` permuted in epoch e by (seed, e), cut into
    global batches of `batch`, rank r of `world` taking rows [r*B, (r+1)*B), B = batch / world. A
    function of the step: a resumed run sees the same data, N ranks what one sees."""

    def __init__(self, data_dir, splits: list[str], batch, rank, world, seed: int) -> None:
        rows = utils.read_manifest(data_dir)
        self.ids = np.array(sorted({r["frame_idx"] for r in rows if r["split"] in splits}))
        if len(self.ids) == 0:
            raise ValueError(f"{data_dir}/manifest.csv: no frames in split(s) {splits}: "
                             f"{sorted({r['split'] for r in rows})}")  # fmt: skip
        self.rank, self.world, self.seed = rank, world, seed
        self.batch = utils.rank_batch(batch, world)  # this rank's rows of each step
        self.steps_per_epoch = len(self.ids) // batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.ids)} training frames cannot fill one step of {batch} "
                             "frames: lower --batch-size")  # fmt: skip

    def __call__(self, step: int) -> np.ndarray:
        epoch, j = divmod(step, self.steps_per_epoch)
        perm = self.ids[np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))]
        lo = (j * self.world + self.rank) * self.batch
        return np.sort(perm[lo : lo + self.batch])  # sorted: sequential memmap reads


def prefetch(frames: np.ndarray, batches: FrameBatches, start: int, stop: int, pin: bool):
    """The uint8 frames [B, H, W, 3] of steps start..stop-1, read (and pinned) by a thread ahead."""
    q: queue.Queue = queue.Queue(maxsize=3)

    def read() -> None:
        try:
            for step in range(start, stop):
                x = torch.from_numpy(np.ascontiguousarray(frames[batches(step)]))
                q.put(x.pin_memory() if pin else x)
        except BaseException as e:  # handed to the training loop, which re-raises it
            q.put(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    for _ in range(start, stop):
        item = q.get()
        if isinstance(item, BaseException):
            raise item
        yield item
    reader.join()  # done: no pinning in flight when the process group is torn down


def seed_step(seed: int, step: int, rank: int, gen: torch.Generator) -> None:
    """Seed every draw of a step (crops into `gen`, drop-path from torch's global RNG) from (seed,
    step, rank): a resumed run draws what an uninterrupted one would, with no generator states."""
    aug, drop = np.random.SeedSequence([seed, step, rank]).generate_state(2)
    gen.manual_seed(int(aug))
    torch.manual_seed(int(drop))


# ============ one step, and the training run ============


def train_step(student, teacher, opt, loss_fn, center, sched, step, globals_, locals_, clip_grad):
    """One DINO step. `student` and `teacher` as called (compiled, the student in DDP), `sched`
    from schedules(). Returns (loss, new centre, teacher output), device tensors: no host sync."""
    for group in opt.param_groups:
        group["lr"] = float(sched["lr"][step])
    opt.param_groups[0]["weight_decay"] = float(sched["weight_decay"][step])  # [1]: 1-d, none
    with torch.autocast(globals_.device.type, torch.bfloat16, enabled=globals_.is_cuda):
        with torch.no_grad():
            t_out = teacher(globals_)  # the teacher sees the 2 global views only
        s_out = student(globals_, locals_)
    loss = loss_fn(s_out, t_out, center, sched["teacher_temp"][step])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = dict(student.named_parameters())
    if clip_grad > 0:
        clip_gradients([p for p in params.values() if p.requires_grad], clip_grad)
    if sched["freeze_last_layer"][step]:  # DINO: the last layer learns after the first epoch
        for name, p in params.items():
            if "last_layer" in name:
                p.grad = None
    opt.step()
    ema_update(list(teacher.parameters()), list(params.values()), float(sched["momentum"][step]))
    return loss.detach(), update_center(center, t_out), t_out


def train_dino(args: argparse.Namespace) -> dict:
    """Train (or resume) DINO, export the teacher's V; return this rank's last checkpoint state."""
    rank, world, device = utils.setup_distributed(args.device)
    out, cuda = Path(args.out), device.type == "cuda"
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"

    # ============ preparing data ... ============
    frames = utils.open_frames(args.data)
    batches = FrameBatches(args.data, args.splits, args.batch_size, rank, world, args.seed)
    spe = batches.steps_per_epoch
    total = args.steps or max(1, round(args.epochs * spe))

    # ============ building student and teacher networks ... ============
    utils.seed_everything(args.seed)  # every rank starts from the same weights
    student, teacher = (net.to(device) for net in build_networks(args))
    nets = [student, teacher, dino_loss, render_views]
    if args.compile:  # static shapes: one graph per crop size, not one dynamic graph for both
        nets = [torch.compile(f, dynamic=False) for f in nets]
    student_fwd, teacher_fwd, loss_fn, render = nets
    if world > 1:  # DDP all-reduces the gradients: the student is called through it, not .module
        student_fwd = DDP(student_fwd, device_ids=[device.index] if cuda else None)

    # ============ optimizer and schedules ... ============
    opt = torch.optim.AdamW(utils.param_groups(student, args.weight_decay), lr=0.0, fused=cuda)
    sched = schedules(args, total, spe, device)
    center = torch.zeros(1, args.out_dim, device=device)

    # ============ optionally resume training ... ============
    state, start = utils.resume_checkpoint(ckpt_path, args, IDENTITY), 0  # RNG: (seed, step)
    if state is not None:
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        opt.load_state_dict(state["optimizer"])
        center, start = state["center"].to(device), state["step"]
    elif utils.is_main():  # V before DINO: the control of analyze's probe
        utils.export_encoder(teacher.backbone, out, {**export_config(args), "steps": 0}, "start")
    utils.print0(f"train_dino: {len(batches.ids)} frames, global batch {args.batch_size} = {world} "
                  f"x {batches.batch}, {spe} steps/epoch, steps {start}->{total}")  # fmt: skip

    # ============ training ... ============
    flops = step_flops(student.backbone, student.head, args)  # per frame
    peak = utils.matmul_peak_tflops(device, torch.bfloat16 if cuda else torch.float32)
    gen = torch.Generator(device)
    loss_sum, n_log, t_log, record = torch.zeros((), device=device), 0, time.perf_counter(), {}
    bar = tqdm(total=total, initial=start, desc="train_dino", disable=not utils.is_main())
    for step, batch in enumerate(prefetch(frames, batches, start, total, pin=cuda), start=start):
        utils.fail_point(rank, step)
        seed_step(args.seed, step, rank, gen)
        with torch.no_grad():
            globals_, locals_ = multi_crop(batch.to(device, non_blocking=True), args, gen, render)
        loss, center, t_out = train_step(student_fwd, teacher_fwd, opt, loss_fn, center, sched,
                                         step, globals_, locals_, args.clip_grad)  # fmt: skip
        loss_sum += loss
        done, n_log, last = step + 1, n_log + 1, step + 1 == total
        bar.update(1)
        log, save = last or done % args.log_every == 0, last or done % args.save_every == 0
        if not (log or save):
            continue
        # host syncs at logs and saves only; a non-finite loss in the window makes its mean so
        mean_loss = utils.all_reduce_mean(loss_sum / n_log).item()
        utils.check_finite(mean_loss, done, ckpt_path, "Lower --lr or raise --warmup-epochs.")
        if log:
            ips = batches.batch * n_log / (time.perf_counter() - t_log)  # this rank's
            record = {"step": done, "epoch": done / spe, "loss": mean_loss}
            record.update({k: float(v[step]) for k, v in sched.items() if k != "freeze_last_layer"})
            record.update(images_per_s_per_device=ips, images_per_s=ips * world,
                          mfu=ips * flops / (peak * 1e12),
                          peak_mem_gb=utils.peak_memory_gb(device),
                          **teacher_stats(t_out, center, sched["teacher_temp"][step]))  # fmt: skip
            utils.log_metrics(out, record)
            bar.set_postfix(loss=f"{mean_loss:.4f}", ips=f"{ips:.1f}", mfu=f"{record['mfu']:.1%}")
            loss_sum.zero_()
            t_log, n_log = time.perf_counter(), 0
        if save:
            t_save = time.perf_counter()
            state = {"student": student.state_dict(), "teacher": teacher.state_dict(),
                     "optimizer": opt.state_dict(), "center": center.cpu(), "step": done}  # fmt: skip
            if utils.is_main():
                utils.save_checkpoint(ckpt_path, state, args)
            t_log += time.perf_counter() - t_save  # writing a checkpoint is no training time
    bar.close()
    utils.plot_metrics(out, ("loss", "teacher_mi", "prototypes_used", "lr"))

    # ============ export the teacher's V ... ============
    ln_k = math.log(args.out_dim)  # the loss of uniform targets: DINO's trivial fixed point
    loss, mi = record.get("loss", 0.0), record.get("teacher_mi")
    if uniform := loss > 0.99 * ln_k:
        utils.print0(f"train_dino: WARNING: DINO is at its uniform fixed point (loss {loss:.3f}, "
                      f"ln K {ln_k:.3f}, teacher MI {mi:.3f}): every frame gets the same target, V "
                      "learned nothing. Try --bn-head, lower --jitter-p --grey-p --blur-p "
                      "--solarize-p or --teacher-temp, or --pretrained / --init.")  # fmt: skip
    if utils.is_main():
        cfg = {**export_config(args), "steps": total, "final_loss": record.get("loss"),
               "uniform_fixed_point": uniform}  # fmt: skip
        print(f"train_dino: wrote {utils.export_encoder(teacher.backbone, out, cfg)}")
    return state


def export_config(args) -> dict:  # encoder.json: how V was built and trained
    start = "pretrained" if args.pretrained else (args.init or "random")
    return {"arch": args.arch, "img_size": args.global_size, "overrides": vit_overrides(args),
            "layerscale_init": args.layerscale_init, "start": start, "seed": args.seed,
            "out_dim": args.out_dim, "bn_head": args.bn_head, "trained_by": "train_dino.py"}  # fmt: skip


# ============ multi-crop on the GPU (DINO's DataAugmentationDINO, batched) ============
# crop, resize, flip and blur as matmuls with per-crop resampling matrices; colour element-wise

BLUR_SIGMA = (0.1, 2.0)  # DINO's GaussianBlur radius range
BLUR_RADIUS = math.ceil(3 * BLUR_SIGMA[1])


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(n, device=gen.device).uniform_(lo, hi, generator=gen)


def _coin(n: int, p, gen: torch.Generator) -> torch.Tensor:  # Bernoulli(p) as 0/1, p [n] or one
    return (torch.rand(n, device=gen.device, generator=gen) < p).float()


def random_boxes(n, height, width, scale, gen, ratio=(3 / 4, 4 / 3), tries=10) -> torch.Tensor:
    """RandomResizedCrop boxes [n, 4] (x0, y0, x1, y1): area fraction in `scale`, aspect ratio in
    `ratio`, the first of `tries` draws that fits, else torchvision's fallback (largest centred)."""
    area = _uniform(n * tries, *scale, gen).view(n, tries) * height * width
    log_r = _uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), gen).view(n, tries)
    w, h = (area * log_r.exp()).sqrt(), (area / log_r.exp()).sqrt()
    fits = (w <= width) & (h <= height)
    first, fit = fits.float().argmax(1, keepdim=True), fits.any(1)
    r = min(max(width / height, ratio[0]), ratio[1])
    w = torch.where(fit, w.gather(1, first).squeeze(1), min(width, height * r))
    h = torch.where(fit, h.gather(1, first).squeeze(1), min(height, width / r))
    u = torch.where(fit[:, None], torch.rand(n, 2, device=gen.device, generator=gen), 0.5)
    x0, y0 = u[:, 0] * (width - w), u[:, 1] * (height - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def resample_matrix(lo: torch.Tensor, hi: torch.Tensor, n_in: int, size: int) -> torch.Tensor:
    """[n, size, n_in]: row o of crop i weighs the input pixels of output pixel o when [lo[i], hi[i])
    is resized to `size` pixels, antialiased bilinear as PIL's: a triangle around lo + (o + 0.5)·step
    (step = (hi - lo) / size) of half-width max(1, step), rows renormalised to sum 1."""
    step = (hi - lo) / size
    out = torch.arange(size, device=lo.device, dtype=torch.float32)
    centre = lo[:, None] + (out + 0.5) * step[:, None]  # [n, size]
    pixel = torch.arange(n_in, device=lo.device, dtype=torch.float32) + 0.5
    support = step.clamp(min=1.0)[:, None, None]
    w = (1 - (pixel - centre[..., None]).abs() / support).clamp(min=0)
    return w / w.sum(-1, keepdim=True)


def resized_crops(img: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x = rows @ frame @ colsᵀ, two batched matmuls in img's dtype: frames [B, H, 3·W], rows
    [B·V, S, H], cols [B·V, S, W] frame-major (i·V + v) -> view-major crops [V·B, 3, S, S]."""
    b, h, _ = img.shape
    n, s, w = cols.shape
    views = n // b
    x = torch.bmm(rows.to(img.dtype).view(b, views * s, h), img)  # [B, V·S, 3·W]
    x = torch.bmm(x.view(n, s * 3, w), cols.to(img.dtype).mT)  # [B·V, S·3, S]
    x = x.view(b, views, s, 3, s).permute(1, 0, 3, 2, 4)  # [V, B, 3, S, S]
    return x.reshape(n, 3, s, s).float()


def _luma(x: torch.Tensor) -> torch.Tensor:  # ITU-R 601 grey [n, 1, H, W], as torchvision's
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).clamp(0, 1)


@functools.lru_cache  # one per device, made there once
def hue_basis(device: torch.device | str = "cpu") -> torch.Tensor:
    """[3, 3, 3]: A, B, C with A + cos(a)·B + sin(a)·C = the RGB map turning the chroma plane
    (I, Q) of YIQ by angle a."""
    yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    inv, quarter = np.linalg.inv(yiq), np.array([[0, 0, 0], [0, 0, -1.0], [0, 1, 0]])
    maps = [inv @ m @ yiq for m in (np.diag([1.0, 0, 0]), np.diag([0, 1.0, 1]), quarter)]
    return torch.from_numpy(np.stack(maps)).float().to(device)


def draw_jitter(n: int, gen: torch.Generator, p=0.8, strength=(0.4, 0.4, 0.2, 0.1)):
    """ColorJitter(brightness, contrast, saturation, hue = `strength`) applied with probability p:
    [n, 4] factors (b, c, s, hue angle); images the coin skips get the identity (1, 1, 1, 0)."""
    on = _coin(n, p, gen)
    bcs = [1 + on * _uniform(n, -v, v, gen) for v in strength[:3]]
    angle = on * _uniform(n, -strength[3], strength[3], gen) * 2 * math.pi
    return torch.stack([*bcs, angle], 1)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation, hue of [n, 3, H, W] in [0, 1] in a fixed order; hue turns
    the chroma plane in YIQ space (`basis` = hue_basis()), a linear stand-in for HSV's shift."""
    b, c, s = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
    x = (x * b).clamp(0, 1)
    mean = _luma(x).mean((1, 2, 3), keepdim=True)
    x = ((x - mean) * c + mean).clamp(0, 1)
    grey = _luma(x)
    x = ((x - grey) * s + grey).clamp(0, 1)
    angle = factors[:, 3]
    coef = torch.stack([torch.ones_like(angle), angle.cos(), angle.sin()], 1)  # [n, 3]
    m = torch.einsum("nk,kij->nij", coef, basis)[..., None, None]  # [n, 3, 3, 1, 1]: RGB -> RGB
    return sum(m[:, :, j] * x[:, j : j + 1] for j in range(3)).clamp(0, 1)  # (as a GEMM, K=3: slow)


def grayscale(x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:  # where on [n] is 1
    return x + on.view(-1, 1, 1, 1) * (_luma(x) - x)


def solarize(x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:  # pixels >= 128/255 inverted
    return torch.where((on.view(-1, 1, 1, 1) > 0) & (x >= 0.5), 1 - x, x)


def blur_matrix(sigma: torch.Tensor, size: int, radius: int) -> torch.Tensor:
    """[n, size, size]: a 1-D Gaussian blur of `size` pixels with sigma[i], truncated at `radius`,
    with torch's "reflect" padding folded in: row o weighs every input pixel of output pixel o."""
    if radius >= size:
        raise ValueError(f"blur radius {radius} needs crops larger than {radius} pixels: {size}")
    tap = torch.arange(-radius, radius + 1, device=sigma.device)
    k = torch.exp(-(tap.float() ** 2) / (2 * sigma[:, None].float() ** 2))
    k = k / k.sum(1, keepdim=True)  # [n, 2r+1]
    src = (torch.arange(size, device=sigma.device)[:, None] + tap).abs()  # [size, 2r+1]
    src = torch.where(src > size - 1, 2 * (size - 1) - src, src)
    reads = (src[..., None] == torch.arange(size, device=sigma.device)).float()  # [o, tap, p]
    return torch.einsum("nt,otp->nop", k, reads)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Blur image i of [n, C, H, W] with sigma[i] (near 0: unchanged), separable: x <- K_H @ x @
    K_Wᵀ per image and channel, K = blur_matrix, in x's dtype."""
    _, _, h, w = x.shape
    k_h = blur_matrix(sigma, h, radius).to(x.dtype)
    k_w = k_h if w == h else blur_matrix(sigma, w, radius).to(x.dtype)
    return k_h[:, None] @ x @ k_w[:, None].mT


def draw_views(b, views, height, width, scale, blur_p, solarize_p, gen, jitter_p=0.8, grey_p=0.2):
    """Every random choice of `views` crops of b images, view-major (row v*b + i: view v of image
    i): boxes, flips, jitter, grey, blur sigma (near 0 where the coin says no), solarize."""
    n, dev = views * b, gen.device  # per-view probabilities, made on the device (no host copy):
    blur_p = torch.cat([torch.full((b,), p, device=dev) for p in blur_p])
    solarize_p = torch.cat([torch.full((b,), p, device=dev) for p in solarize_p])
    boxes = random_boxes(n, height, width, scale, gen)
    blur_on = _coin(n, blur_p, gen) > 0
    flip, jitter, grey = _coin(n, 0.5, gen), draw_jitter(n, gen, jitter_p), _coin(n, grey_p, gen)
    sigma = torch.where(blur_on, _uniform(n, *BLUR_SIGMA, gen), 1e-3)
    solarize = _coin(n, solarize_p, gen)
    return dict(boxes=boxes, flip=flip, jitter=jitter, grey=grey, sigma=sigma, solarize=solarize)


def render_views(img: torch.Tensor, params: dict, size: int, basis: torch.Tensor) -> torch.Tensor:
    """The crops `params` of frames img [B, H, 3·W] (0..255) -> [n, 3, size, size] in [0, 1]: crop
    and flip (a reversed x-matrix), jitter, grey, blur (matmuls), solarize. Deterministic."""
    b, h, w = img.shape[0], img.shape[1], img.shape[2] // 3
    # view-major rows (v*b + i) to frame-major (i*V + v), the order resized_crops reads
    boxes = params["boxes"].view(-1, b, 4).transpose(0, 1).reshape(-1, 4)
    flip = params["flip"].view(-1, b).transpose(0, 1).reshape(-1)
    rows = resample_matrix(boxes[:, 1], boxes[:, 3], h, size) / 255  # to [0, 1] for free
    cols = resample_matrix(boxes[:, 0], boxes[:, 2], w, size)
    cols = torch.where(flip.view(-1, 1, 1) > 0, cols.flip(1), cols)
    x = resized_crops(img, rows, cols)
    x = grayscale(color_jitter(x, params["jitter"], basis), params["grey"])
    x = gaussian_blur(x.to(img.dtype), params["sigma"], BLUR_RADIUS).float()
    return solarize(x, params["solarize"])


def multi_crop(frames: torch.Tensor, args, gen: torch.Generator, render=render_views):
    """uint8 frames [B, H, W, 3] -> normalised global crops [2B, 3, G, G] and local [nB, 3, L, L],
    view-major, by DINO's recipe (blur p 1 / 0.1 / 0.5 for global 1 / 2 / locals, solarize p 0.2
    on global 2, jitter p 0.8, grey p 0.2: the --*-p flags). bf16 matmuls on a GPU."""
    b, h, w, _ = frames.shape
    dtype = torch.bfloat16 if frames.device.type == "cuda" else torch.float32
    img = frames.permute(0, 1, 3, 2).reshape(b, h, 3 * w).to(dtype)  # [B, H, 3·W]: RGB in a row
    basis, n = hue_basis(frames.device), args.local_crops
    (b1, b2, bl), colour = args.blur_p, (args.jitter_p, args.grey_p)
    g = draw_views(b, 2, h, w, args.global_scale, [b1, b2], [0.0, args.solarize_p], gen, *colour)
    loc = draw_views(b, n, h, w, args.local_scale, [bl] * n, [0.0] * n, gen, *colour)
    crops = (render(img, g, args.global_size, basis), render(img, loc, args.local_size, basis))
    return tuple(utils.normalize_frames(x) for x in crops)


def main(argv: list[str] | None = None) -> None:
    with utils.distributed_exit():
        train_dino(parse_args(argv))


if __name__ == "__main__":
    main()
