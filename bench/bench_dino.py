"""Speed of train_dino.py: images/s per GPU and MFU, GPU multi-crop against a DINO-style CPU path.

For each --arch, the same training step (train_dino's set-up and train_step: student + teacher,
DINO loss, AdamW, EMA) is fed two ways in one run:
  gpu  train_dino's own data path: frames read from the uint8 memmap by its reader thread (pinned,
       non-blocking copy), multi-crop made on the GPU in batched matmuls and element-wise colour
       ops (train_dino.multi_crop); compiled with the networks under --compile, unless --eager-aug
  cpu  the original DINO recipe: PIL crops and torchvision transforms (RandomResizedCrop bicubic,
       flip, ColorJitter, RandomGrayscale, PIL GaussianBlur, Solarization, ToTensor, Normalize)
       in --workers DataLoader worker processes per GPU (DINO's default 10), pinned batches
MFU = images/s x model FLOPs per image (train_dino.step_flops, per crop resolution) / the bf16
matmul rate measured on the same GPU in the same run (utils.matmul_peak_tflops).
Frames are synthesised (random uint8, 224x392 canvas), so only torch, timm, numpy and PIL are needed.

  python bench/bench_dino.py                                   # one GPU
  torchrun --standalone --nproc_per_node=2 bench/bench_dino.py --paths gpu   # two GPUs
  python bench/bench_dino.py --compile --paths gpu --eager-aug  # compiled nets, eager multi-crop
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_dino  # noqa: E402
import utils  # noqa: E402

SHORT = {"vit_small_patch14_dinov2": "ViT-S/14", "vit_base_patch14_dinov2": "ViT-B/14"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--archs",
        default="vit_small_patch14_dinov2,vit_base_patch14_dinov2",
        help="comma-separated timm ViTs",
    )
    p.add_argument(
        "--paths",
        default="gpu,cpu",
        help="data paths to time: gpu, cpu, gpu-fixed (gpu without the reader: one batch reused)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="frames per GPU per step")
    p.add_argument("--local-crops", type=int, default=8, help="local crops per frame")
    p.add_argument("--frames", type=int, default=2048, help="synthetic frames in the memmap")
    p.add_argument("--warmup", type=int, default=15, help="untimed steps first")
    p.add_argument("--steps", type=int, default=25, help="timed steps")
    p.add_argument("--workers", type=int, default=10, help="DataLoader workers per GPU (cpu path)")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile networks, multi-crop and loss"
    )
    p.add_argument(
        "--eager-aug",
        action="store_true",
        help="run the multi-crop (train_dino.render_views) eagerly, even under --compile",
    )
    p.add_argument(
        "--bf16-stream", action="store_true", help="train_dino's --bf16-stream: V's stream in bf16"
    )
    p.add_argument("--profile", action="store_true", help="profile a few steps of the gpu path")
    p.add_argument("--device", default=None, help="cpu for a smoke test; default cuda")
    p.add_argument("--global-size", type=int, default=224, help="global crop side")
    p.add_argument("--local-size", type=int, default=98, help="local crop side")
    p.add_argument("--depth", type=int, default=None, help="ViT depth override (smoke tests)")
    p.add_argument("--out-dim", type=int, default=65536, help="DINO head output dimension")
    p.add_argument("--tmp", default="/tmp/bench_dino", help="where the synthetic frames go")
    p.add_argument("--json", default=None, help="append result rows to this JSON-lines file")
    return p.parse_args()


# --------------------------------------------------------------------------------------------
# The CPU path of the original DINO code (main_dino.py DataAugmentationDINO, utils.GaussianBlur)
# --------------------------------------------------------------------------------------------


class PILBlur:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img):
        from PIL import ImageFilter

        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class PILSolarize:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img):
        from PIL import ImageOps

        return ImageOps.solarize(img) if random.random() < self.p else img


class DinoAugmentation:
    """DINO's DataAugmentationDINO with our crop sizes: 2 global + n local crops of a PIL image."""

    def __init__(self, global_size: int, local_size: int, local_crops: int) -> None:
        from torchvision import transforms as T

        bicubic = T.InterpolationMode.BICUBIC
        flip_jitter = T.Compose(
            [
                T.RandomHorizontalFlip(p=0.5),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
            ]
        )
        norm = T.Compose([T.ToTensor(), T.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD)])
        crop_g = T.RandomResizedCrop(global_size, scale=(0.4, 1.0), interpolation=bicubic)
        crop_l = T.RandomResizedCrop(local_size, scale=(0.05, 0.4), interpolation=bicubic)
        self.global1 = T.Compose([crop_g, flip_jitter, PILBlur(1.0), norm])
        self.global2 = T.Compose([crop_g, flip_jitter, PILBlur(0.1), PILSolarize(0.2), norm])
        self.local = T.Compose([crop_l, flip_jitter, PILBlur(0.5), norm])
        self.n = local_crops

    def __call__(self, img) -> list[torch.Tensor]:
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.n)]


class MemmapFrames(torch.utils.data.Dataset):
    """Frames of the uint8 store as PIL images through DinoAugmentation (opened per worker)."""

    def __init__(self, path: Path, aug: DinoAugmentation) -> None:
        self.path, self.aug, self.frames = path, aug, None
        self.n = len(np.load(path, mmap_mode="r"))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        from PIL import Image

        if self.frames is None:
            self.frames = np.load(self.path, mmap_mode="r")
        return self.aug(Image.fromarray(np.asarray(self.frames[i])))


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def dino_args(b, arch: str, data: Path, compile_: bool, world: int) -> argparse.Namespace:
    """train_dino's flags; its --batch-size is the global batch: --batch-size per GPU x GPUs."""
    flags = [
        "--data", str(data), "--out", "-", "--arch", arch, "--batch-size", str(b.batch_size * world),
        "--local-crops", str(b.local_crops), "--global-size", str(b.global_size),
        "--local-size", str(b.local_size), "--out-dim", str(b.out_dim),
    ]  # fmt: skip
    if b.depth:
        flags += ["--depth", str(b.depth)]
    if compile_:
        flags.append("--compile")
    if b.bf16_stream:
        flags.append("--bf16-stream")
    if b.device:
        flags += ["--device", b.device]
    return train_dino.parse_args(flags)


def build_step(args, device, world: int, steps_per_epoch: int, total: int, eager_aug: bool):
    """train_dino's set-up (its "building student and teacher" and "optimizer and schedules"
    sections) -> (student, render, step): step(i, globals_, locals_) is train_dino.train_step,
    the centre carried from step to step; render is the multi-crop's (compiled unless eager_aug)."""
    cuda = device.type == "cuda"
    utils.seed_everything(args.seed)
    student, teacher = (net.to(device) for net in train_dino.build_networks(args))
    nets = [student, teacher, train_dino.dino_loss, train_dino.render_views]
    if args.compile:
        nets = [torch.compile(f, dynamic=False) for f in nets]
    student_fwd, teacher_fwd, loss_fn, render = nets
    if world > 1:
        student_fwd = DDP(student_fwd, device_ids=[device.index] if cuda else None)
    opt = torch.optim.AdamW(utils.param_groups(student, args.weight_decay), lr=0.0, fused=cuda)
    sched = train_dino.schedules(args, total, steps_per_epoch, device)
    center = torch.zeros(1, args.out_dim, device=device)

    def step(i: int, globals_: torch.Tensor, locals_: torch.Tensor) -> None:
        nonlocal center
        _, center, _ = train_dino.train_step(
            student_fwd, teacher_fwd, opt, loss_fn, center, sched, i, globals_, locals_,
            args.clip_grad,
        )  # fmt: skip

    return student, (train_dino.render_views if eager_aug else render), step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_gpu_path(args, step_fn, render, frames, batches, first, steps, warmup, rank, device, fixed,
                  profile):  # fmt: skip
    """train_dino's loop body: reader thread -> non-blocking copy -> multi_crop -> train_step
    (`fixed`: one batch kept on the GPU instead, to see what the reader costs). Returns (seconds
    for `steps` timed steps, seconds of multi_crop alone per step)."""
    gen = torch.Generator(device)
    last = first + warmup + steps
    reader = train_dino.prefetch(frames, batches, first, last, pin=device.type == "cuda")
    x = torch.from_numpy(np.array(frames[: batches.batch])).to(device)
    t0 = 0.0
    for step, batch in enumerate(reader, start=first):
        if step == first + warmup:
            sync(device)
            t0 = time.perf_counter()
        train_dino.seed_step(args.seed, step, rank, gen)
        with torch.no_grad():
            frames_gpu = x if fixed else batch.to(device, non_blocking=True)
            g, loc = train_dino.multi_crop(frames_gpu, args, gen, render)
        step_fn(step, g, loc)
    sync(device)
    total = time.perf_counter() - t0
    # the augmentation alone, on one batch
    for _ in range(3):
        train_dino.multi_crop(x, args, gen, render)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        train_dino.multi_crop(x, args, gen, render)
    sync(device)
    aug = (time.perf_counter() - t) / 10
    if profile and rank == 0:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with prof(activities=acts) as p:
            for step in range(last, last + 3):
                with torch.no_grad():
                    g, loc = train_dino.multi_crop(x, args, gen, render)
                step_fn(step, g, loc)
            sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(p.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=60))
    return total, aug


def time_cpu_path(b, args, step_fn, data_file, first, steps, warmup, rank, world, device):
    """The same step fed by DINO-style PIL augmentation in DataLoader workers."""
    aug = DinoAugmentation(args.global_size, args.local_size, args.local_crops)
    ds = MemmapFrames(data_file, aug)
    sampler = torch.utils.data.DistributedSampler(ds, world, rank, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=b.batch_size,
        sampler=sampler,
        num_workers=b.workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=True,
    )
    step, t0, epoch = first, 0.0, 0
    while step < first + warmup + steps:
        sampler.set_epoch(epoch)
        epoch += 1
        for crops in loader:
            if step == first + warmup:
                sync(device)
                t0 = time.perf_counter()
            g = torch.cat(crops[:2]).to(device, non_blocking=True)
            loc = torch.cat(crops[2:]).to(device, non_blocking=True)
            step_fn(step, g, loc)
            step += 1
            if step == first + warmup + steps:
                break
    sync(device)
    return time.perf_counter() - t0


def mean_over_ranks(x: float, device: torch.device) -> float:
    t = torch.tensor([x], device=device, dtype=torch.float64)
    return utils.all_reduce_mean(t).item()


def main() -> None:
    b = parse_args()
    rank, world, device = utils.setup_distributed(b.device)
    tmp = Path(b.tmp)
    data = tmp / "data"
    if rank == 0 and not (data / "frames.npy").exists():
        rng = np.random.default_rng(0)
        frames = rng.integers(0, 256, (b.frames, 224, 392, 3), dtype=np.uint8)
        manifest = ["split,clip_id,frame_idx,frame_path,t_sec"]
        manifest += [f"train,c{i // 16},{i},x.jpg,{i % 16}" for i in range(b.frames)]
        data.mkdir(parents=True, exist_ok=True)
        np.save(data / "frames.npy", frames)
        (data / "frames.json").write_text(
            json.dumps({"height": 224, "width": 392, "count": b.frames})
        )
        (data / "manifest.csv").write_text("\n".join(manifest) + "\n")
    if world > 1:
        dist.barrier()
    frames = utils.open_frames(data)
    peak = utils.matmul_peak_tflops(
        device, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(
            f"device {name} x{world}, torch {torch.__version__}, measured peak {peak:.0f} TFLOP/s"
        )
    rows = []
    paths = b.paths.split(",")
    for arch in b.archs.split(","):
        # one run per model, fed by each path in turn (compiled once)
        args = dino_args(b, arch, data, b.compile, world)
        batches = train_dino.FrameBatches(data, ["train"], args.batch_size, rank, world, args.seed)
        per_path = b.warmup + b.steps + 3
        total = len(paths) * per_path + 3
        student, render, step_fn = build_step(
            args, device, world, batches.steps_per_epoch, total, b.eager_aug
        )
        flops = train_dino.step_flops(student.backbone, student.head, args)
        for i, path in enumerate(paths):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t_start = time.perf_counter()
            aug_s = float("nan")
            if path in ("gpu", "gpu-fixed"):
                secs, aug_s = time_gpu_path(
                    args, step_fn, render, frames, batches, i * per_path, b.steps, b.warmup,
                    rank, device, path == "gpu-fixed", b.profile and i == 0,
                )  # fmt: skip
            else:
                secs = time_cpu_path(
                    b, args, step_fn, data / "frames.npy", i * per_path, b.steps, b.warmup, rank,
                    world, device,
                )  # fmt: skip
            ips = mean_over_ranks(b.batch_size * b.steps / secs, device)
            row = {
                "arch": SHORT.get(arch, arch),
                "path": path,
                "gpus": world,
                "batch": b.batch_size,
                "compile": args.compile,
                "aug": "compiled" if args.compile and not b.eager_aug else "eager",
                "images_per_s_per_gpu": ips,
                "mfu": ips * flops / (peak * 1e12),
                "aug_ms": aug_s * 1000,
                "step_ms": 1000 * b.batch_size / ips,
                "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30
                if device.type == "cuda"
                else float("nan"),
                "peak_tflops": peak,
                "wall_s": time.perf_counter() - t_start,
            }
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
        del student, render, step_fn
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        print(f"\n{'model':9} {'path':9} {'GPUs':>4} {'batch':>5} {'compile':>7} {'aug':>8} "
              f"{'img/s/GPU':>9} {'MFU':>6} {'step ms':>8} {'aug ms':>7} {'mem GB':>6}")  # fmt: skip
        for r in rows:
            print(
                f"{r['arch']:9} {r['path']:9} {r['gpus']:>4} {r['batch']:>5} "
                f"{r['compile']!s:>7} {r['aug']:>8} {r['images_per_s_per_gpu']:>9.1f} "
                f"{r['mfu']:>6.1%} {r['step_ms']:>8.1f} {r['aug_ms']:>7.1f} {r['peak_mem_gb']:>6.1f}"
            )
        if b.json:
            with open(b.json, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    with utils.distributed_exit():
        main()
