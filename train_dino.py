"""Stage 2: fine-tune the visual encoder V by DINO self-distillation on the frames F_1..F_m.

Paper §"Finetuning the visual encoder": V (DINOv2, timm `vit_small_patch14_dinov2` by default,
`--arch vit_base_patch14_dinov2` for the paper's base model) is fine-tuned on the dataset's frames
with the teacher-student objective of DINO (Caron et al. 2021), so that its [CLS] embedding v_j
carries the social scene. The pieces, in the order of the DINO paper and of main_dino.py:

  multi-crop     2 global crops (--global-size) + --local-crops local crops (--local-size) of each
                 frame, made on the GPU from the uint8 frame store: crop, resize, flip and blur as
                 batched matmuls with per-crop resampling matrices, colour ops element-wise
  student        V + DINO head (MLP, L2-normalised bottleneck, weight-normalised last layer),
                 sees every crop; trained with AdamW
  teacher        the same network, an exponential moving average of the student (momentum on a
                 cosine schedule to 1), sees only the global crops
  loss           H(P_t(x), P_s(x')) summed over pairs of different views x != x', with the teacher
                 output centred (a moving mean all-reduced over ranks) and sharpened (--teacher-temp)

Runs as `python train_dino.py ...` (CPU or one GPU) and `torchrun --nproc_per_node=N train_dino.py
...` (one process per GPU, multi-node through torchrun's own options). Writes under --out:
checkpoint.pt (every --save-every steps; rerunning the same command resumes), metrics.jsonl, and at
the end the teacher backbone as encoder.safetensors + encoder.json (common.load_encoder reads it).

Defaults are DINO's ViT settings for GPUs: 64 frames per GPU, 8 local crops, lr 5e-4 per 256
frames with 10 warm-up epochs and a cosine to 1e-6, weight decay 0.04 -> 0.4, teacher momentum
0.996 -> 1, teacher temperature 0.04, K = 65536, per-parameter clipping at 3, last layer frozen for
the first epoch, drop-path 0.1. Two changes: crops of 224 / 98 pixels (98 = 7 patches of 14; DINO's
96 was for patch 16), and LayerScale started at 0.1 when V starts from random weights (README,
common.LAYERSCALE_INIT). On a small frame set a smaller --out-dim (4096) is cheaper; a 2-core CPU
run uses small crops (README: --batch-size 16 --global-size 112 --local-size 56 --local-crops 2
--out-dim 4096 on the 112x196 demo canvas).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common

STUDENT_TEMP = 0.1  # DINO's student temperature
CENTER_MOMENTUM = 0.9  # DINO's centering momentum


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="prep.py output dir (frames.npy, manifest.csv)")
    p.add_argument("--out", required=True, help="output dir: checkpoint, metrics, encoder export")
    p.add_argument("--splits", default="train", help="comma-separated manifest splits to train on")
    p.add_argument("--epochs", type=float, default=100, help="passes over the frames")
    p.add_argument(
        "--steps", type=int, default=None, help="total optimizer steps (wins over --epochs)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="frames per GPU (process) per step")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, crops and init")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if any")
    # model
    p.add_argument("--arch", default=common.DEFAULT_ARCH, help="timm ViT name (V)")
    p.add_argument("--pretrained", action="store_true", help="start from timm's hub weights")
    p.add_argument("--init", default=None, help="start from local weights (.safetensors / .pth)")
    p.add_argument(
        "--layerscale-init",
        type=float,
        default=common.LAYERSCALE_INIT,
        help="LayerScale gamma when starting from random weights (timm's 1e-5 gives a [CLS]\n"
        "nearly equal for every image)",
    )
    p.add_argument("--depth", type=int, default=None, help="override the ViT depth (quick runs)")
    p.add_argument(
        "--embed-dim", type=int, default=None, help="override the ViT width, heads = width/64"
    )
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth of the student")
    p.add_argument("--out-dim", type=int, default=65536, help="DINO head output dimension K")
    p.add_argument("--head-hidden", type=int, default=2048, help="DINO head MLP width")
    p.add_argument("--bottleneck", type=int, default=256, help="DINO head bottleneck width")
    p.add_argument(
        "--freeze-blocks", type=int, default=0, help="freeze patch embed + first K blocks"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile networks, crops, loss")
    # optimisation
    p.add_argument("--lr", type=float, default=5e-4, help="peak LR per 256 frames (scaled)")
    p.add_argument("--min-lr", type=float, default=1e-6, help="LR at the end of the cosine")
    p.add_argument("--warmup-epochs", type=float, default=10, help="linear LR warm-up")
    p.add_argument("--weight-decay", type=float, default=0.04, help="weight decay at the start")
    p.add_argument("--weight-decay-end", type=float, default=0.4, help="weight decay at the end")
    p.add_argument("--clip-grad", type=float, default=3.0, help="per-parameter grad norm clip")
    p.add_argument(
        "--freeze-last-layer",
        type=float,
        default=1,
        help="epochs with the head's last layer frozen",
    )
    p.add_argument("--momentum-teacher", type=float, default=0.996, help="EMA momentum at start")
    p.add_argument("--teacher-temp", type=float, default=0.04, help="teacher temperature")
    p.add_argument(
        "--warmup-teacher-temp", type=float, default=0.04, help="teacher temperature at step 0"
    )
    p.add_argument(
        "--warmup-teacher-temp-epochs", type=float, default=0, help="linear teacher temp warm-up"
    )
    # multi-crop
    p.add_argument("--global-size", type=int, default=224, help="global crop side (pixels)")
    p.add_argument("--local-size", type=int, default=98, help="local crop side (pixels)")
    p.add_argument("--local-crops", type=int, default=8, help="local crops per frame")
    p.add_argument(
        "--global-scale", type=float, nargs=2, default=(0.4, 1.0), help="area range, global crops"
    )
    p.add_argument(
        "--local-scale", type=float, nargs=2, default=(0.05, 0.4), help="area range, local crops"
    )
    # bookkeeping
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    p.add_argument("--log-every", type=int, default=10, help="log (and sync) every N steps")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Schedules (one value per step, computed up front: reading one costs no device sync)
# --------------------------------------------------------------------------------------------


def cosine_schedule(
    base: float, final: float, total: int, warmup: int = 0, start: float = 0.0
) -> np.ndarray:
    """Linear warm-up from `start` to `base` over `warmup` steps, then a cosine to `final`."""
    warm = np.linspace(start, base, warmup, endpoint=False)
    t = np.arange(total - warmup)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(1, len(t))))
    return np.concatenate([warm, cos])


def teacher_temp_schedule(start: float, final: float, total: int, warmup: int) -> np.ndarray:
    """Teacher temperature: linear warm-up from `start` to `final`, then constant."""
    warmup = min(warmup, total)
    return np.concatenate([np.linspace(start, final, warmup), np.full(total - warmup, final)])


# --------------------------------------------------------------------------------------------
# Multi-crop augmentation on the GPU (DINO's DataAugmentationDINO, batched)
# --------------------------------------------------------------------------------------------


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(n, device=gen.device).uniform_(lo, hi, generator=gen)


def _coin(n: int, p: float | torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """n Bernoulli(p) draws (p a number or one per draw) as 0/1 floats."""
    return (torch.rand(n, device=gen.device, generator=gen) < p).float()


def random_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    gen: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    tries: int = 10,
) -> torch.Tensor:
    """RandomResizedCrop boxes [n, 4] (x0, y0, x1, y1) in pixels: area fraction in `scale`, aspect
    ratio log-uniform in `ratio`, the first of `tries` draws that fits the frame, placed uniformly;
    where none fits, torchvision's fallback (the largest centred box of an allowed ratio)."""
    area = _uniform(n * tries, *scale, gen).view(n, tries) * height * width
    log_r = _uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), gen).view(n, tries)
    w = (area * log_r.exp()).sqrt()
    h = (area / log_r.exp()).sqrt()
    fits = (w <= width) & (h <= height)
    first = fits.float().argmax(1, keepdim=True)
    fit = fits.any(1)
    r = min(max(width / height, ratio[0]), ratio[1])
    fall_w, fall_h = min(width, height * r), min(height, width / r)
    w = torch.where(fit, w.gather(1, first).squeeze(1), fall_w)
    h = torch.where(fit, h.gather(1, first).squeeze(1), fall_h)
    u = torch.where(fit[:, None], torch.rand(n, 2, device=gen.device, generator=gen), 0.5)
    x0, y0 = u[:, 0] * (width - w), u[:, 1] * (height - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def resample_matrix(lo: torch.Tensor, hi: torch.Tensor, n_in: int, size: int) -> torch.Tensor:
    """[n, size, n_in]: row o of crop i is the weights over the n_in input pixels of output pixel o
    when the span [lo[i], hi[i]) (pixel units) is resized to `size` pixels. Antialiased bilinear,
    as PIL resizes: a triangle filter around the output pixel's centre c = lo + (o + 0.5)·step
    (step = (hi - lo) / size), its support widened by max(1, step) when shrinking; each row is
    renormalised to sum 1, so the frame's edge pixels take the weight that falls outside it."""
    step = (hi - lo) / size
    out = torch.arange(size, device=lo.device, dtype=torch.float32)
    centre = lo[:, None] + (out + 0.5) * step[:, None]  # [n, size]
    pixel = torch.arange(n_in, device=lo.device, dtype=torch.float32) + 0.5
    support = step.clamp(min=1.0)[:, None, None]
    w = (1 - (pixel - centre[..., None]).abs() / support).clamp(min=0)
    return w / w.sum(-1, keepdim=True)


def resized_crops(img: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Crops of the frames img [B, H, 3·W] (a row holds its 3 channels side by side) by resampling
    matrices in frame-major order (row i·V + v: view v of frame i), rows [B·V, S, H] and cols
    [B·V, S, W] -> view-major crops [V·B, 3, S, S] in float32, x = rows @ frame @ colsᵀ. Two
    batched matmuls in img's dtype; the V crops of a frame are stacked along the first matmul's
    output rows, so no frame is copied per crop."""
    b, h, _ = img.shape
    n, s, w = cols.shape
    views = n // b
    x = torch.bmm(rows.to(img.dtype).view(b, views * s, h), img)  # [B, V·S, 3·W]
    x = torch.bmm(x.view(n, s * 3, w), cols.to(img.dtype).mT)  # [B·V, S·3, S]
    x = x.view(b, views, s, 3, s).permute(1, 0, 3, 2, 4)  # [V, B, 3, S, S]
    return x.reshape(n, 3, s, s).float()


def _luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 grey [n, 1, H, W] of RGB [n, 3, H, W] (torchvision's rgb_to_grayscale)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).clamp(0, 1)


def hue_basis(device: torch.device | str = "cpu") -> torch.Tensor:
    """[3, 3, 3]: A, B, C with A + cos(a)·B + sin(a)·C = the RGB map turning the chroma plane
    (I, Q) of YIQ by angle a."""
    yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
        dtype=torch.float64,
    )
    inv = torch.linalg.inv(yiq)
    keep = torch.diag(torch.tensor([1.0, 0, 0], dtype=torch.float64))
    turn = torch.diag(torch.tensor([0, 1.0, 1], dtype=torch.float64))
    quarter = torch.tensor([[0, 0, 0], [0, 0, -1.0], [0, 1, 0]], dtype=torch.float64)
    return torch.stack([inv @ keep @ yiq, inv @ turn @ yiq, inv @ quarter @ yiq]).float().to(device)


def draw_jitter(
    n: int,
    gen: torch.Generator,
    p: float = 0.8,
    strength: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
) -> torch.Tensor:
    """ColorJitter(brightness, contrast, saturation, hue = `strength`) applied with probability p:
    [n, 4] factors (b, c, s, hue angle); images the coin skips get the identity (1, 1, 1, 0)."""
    on = _coin(n, p, gen)
    bcs = [1 + on * _uniform(n, -v, v, gen) for v in strength[:3]]
    angle = on * _uniform(n, -strength[3], strength[3], gen) * 2 * math.pi
    return torch.stack([*bcs, angle], 1)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation, hue of [n, 3, H, W] in [0, 1] by `draw_jitter` factors,
    in a fixed order (torchvision draws one); hue turns the chroma plane in YIQ space (`basis` =
    hue_basis()), a linear stand-in for torchvision's HSV shift."""
    b, c, s = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
    x = (x * b).clamp(0, 1)
    mean = _luma(x).mean((1, 2, 3), keepdim=True)
    x = ((x - mean) * c + mean).clamp(0, 1)
    grey = _luma(x)
    x = ((x - grey) * s + grey).clamp(0, 1)
    angle = factors[:, 3]
    coef = torch.stack([torch.ones_like(angle), angle.cos(), angle.sin()], 1)  # [n, 3]
    m = torch.einsum("nk,kij->nij", coef, basis)
    return torch.einsum("nij,njhw->nihw", m, x).clamp(0, 1)


def grayscale(x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Grey copies of the images where `on` [n] is 1 (RandomGrayscale)."""
    return x + on.view(-1, 1, 1, 1) * (_luma(x) - x)


def blur_matrix(sigma: torch.Tensor, size: int, radius: int) -> torch.Tensor:
    """[n, size, size]: 1-D Gaussian blur of `size` pixels with sigma[i], truncated at `radius`,
    reflect padding (torch's "reflect": the edge pixel is not repeated) folded in: row o holds
    the weight of every input pixel in output pixel o."""
    if radius >= size:
        raise ValueError(
            f"blur radius {radius} needs crops larger than {radius} pixels, got {size}"
        )
    tap = torch.arange(-radius, radius + 1, device=sigma.device)
    k = torch.exp(-(tap.float() ** 2) / (2 * sigma[:, None].float() ** 2))
    k = k / k.sum(1, keepdim=True)  # [n, 2r+1]
    src = (torch.arange(size, device=sigma.device)[:, None] + tap).abs()  # [size, 2r+1]
    src = torch.where(src > size - 1, 2 * (size - 1) - src, src)
    reads = (src[..., None] == torch.arange(size, device=sigma.device)).float()  # [o, tap, p]
    return torch.einsum("nt,otp->nop", k, reads)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Blur image i of [n, C, H, W] with sigma[i] (a near-0 sigma leaves it as it is), separable:
    x <- K_H @ x @ K_Wᵀ per image and channel, K = blur_matrix, in x's dtype."""
    _, _, h, w = x.shape
    k_h = blur_matrix(sigma, h, radius).to(x.dtype)
    k_w = k_h if w == h else blur_matrix(sigma, w, radius).to(x.dtype)
    return k_h[:, None] @ x @ k_w[:, None].mT


def solarize(x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Solarize (invert pixels >= 128/255) the images where `on` [n] is 1."""
    return torch.where((on.view(-1, 1, 1, 1) > 0) & (x >= 0.5), 1 - x, x)


BLUR_SIGMA = (0.1, 2.0)  # DINO's GaussianBlur radius range
BLUR_RADIUS = math.ceil(3 * BLUR_SIGMA[1])


def _per_view(values: list[float], b: int, device: torch.device) -> torch.Tensor:
    """One probability per row of a view-major batch (made on the device: no host copy)."""
    return torch.cat([torch.full((b,), v, device=device) for v in values])


def draw_views(
    b: int,
    views: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    blur_p: list[float],
    solarize_p: list[float],
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Every random choice of `views` crops of b images (view-major rows v*b + i: view v of image
    i): crop boxes (x0, y0, x1, y1), flips, jitter factors, grey, blur sigma (per-view blur
    probabilities; a near-0 sigma where the coin says no), solarize."""
    n = views * b
    dev = gen.device
    boxes = random_boxes(n, height, width, scale, gen)
    blur_on = _coin(n, _per_view(blur_p, b, dev), gen) > 0
    return {
        "boxes": boxes,
        "flip": _coin(n, 0.5, gen),
        "jitter": draw_jitter(n, gen),
        "grey": _coin(n, 0.2, gen),
        "sigma": torch.where(blur_on, _uniform(n, *BLUR_SIGMA, gen), 1e-3),
        "solarize": _coin(n, _per_view(solarize_p, b, dev), gen),
    }


def _frame_major(x: torch.Tensor, b: int) -> torch.Tensor:
    """Rows v*b + i (view-major) of x reordered to i*V + v (frame-major)."""
    return x.view(-1, b, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


def render_views(
    img: torch.Tensor, params: dict[str, torch.Tensor], size: int, basis: torch.Tensor
) -> torch.Tensor:
    """The crops of `draw_views` from frames img [B, H, 3·W] (0..255, in the matmul dtype; see
    multi_crop) -> [n, 3, size, size] in [0, 1], float32: RandomResizedCrop (antialiased bilinear,
    resample_matrix) and flip (its x-direction matrix reversed) as matmuls, colour jitter and
    grayscale in float32, blur as matmuls, solarize. Deterministic given `params` (torch.compile
    fuses it under --compile)."""
    b, h, w = img.shape[0], img.shape[1], img.shape[2] // 3
    boxes, flip = _frame_major(params["boxes"], b), _frame_major(params["flip"], b)
    rows = resample_matrix(boxes[:, 1], boxes[:, 3], h, size) / 255  # to [0, 1] for free
    cols = resample_matrix(boxes[:, 0], boxes[:, 2], w, size)
    cols = torch.where(flip.view(-1, 1, 1) > 0, cols.flip(1), cols)
    x = resized_crops(img, rows, cols)
    x = grayscale(color_jitter(x, params["jitter"], basis), params["grey"])
    x = gaussian_blur(x.to(img.dtype), params["sigma"], BLUR_RADIUS).float()
    return solarize(x, params["solarize"])


def frame_rows(frames: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 frames [B, H, W, 3] -> [B, H, 3·W] in `dtype` (values 0..255), each row holding its
    3 channels side by side: the layout resized_crops reads."""
    b, h, w, _ = frames.shape
    return frames.permute(0, 1, 3, 2).reshape(b, h, 3 * w).to(dtype)


_HUE_BASIS: dict[torch.device, torch.Tensor] = {}  # per device, made there once


def multi_crop(
    frames: torch.Tensor, args: argparse.Namespace, gen: torch.Generator, render=render_views
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames [B, H, W, 3] -> (global crops [2B, 3, G, G], local crops [nB, 3, L, L]),
    view-major. DINO's recipe: global view 1 always blurred, view 2 blurred with p 0.1 and
    solarized with p 0.2, local views blurred with p 0.5; then ImageNet normalisation. `render`:
    render_views or its compiled form. The crop and blur matmuls run in bfloat16 on the GPU (the
    uint8 values are exact in it, and V sees bf16 under autocast anyway), float32 on the CPU."""
    b, h, w, _ = frames.shape
    img = frame_rows(frames, torch.bfloat16 if frames.device.type == "cuda" else torch.float32)
    if img.device not in _HUE_BASIS:
        _HUE_BASIS[img.device] = hue_basis(img.device)
    basis = _HUE_BASIS[img.device]
    n = args.local_crops
    g = draw_views(b, 2, h, w, args.global_scale, [1.0, 0.1], [0.0, 0.2], gen)
    loc = draw_views(b, n, h, w, args.local_scale, [0.5] * n, [0.0] * n, gen)
    return (
        common.normalize_frames(render(img, g, args.global_size, basis)),
        common.normalize_frames(render(img, loc, args.local_size, basis)),
    )


# --------------------------------------------------------------------------------------------
# Student, teacher, DINO head and loss
# --------------------------------------------------------------------------------------------


class DINOHead(nn.Module):
    """DINO's projection head: a 3-layer MLP (GELU) to a bottleneck, L2-normalised, then a
    weight-normalised linear layer to K = out_dim logits (rows of norm 1: weight_norm with g = 1)."""

    def __init__(
        self, in_dim: int, out_dim: int, hidden: int = 2048, bottleneck: int = 256
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=-1))


class MultiCropNet(nn.Module):
    """V + head over crop sets of different sizes (DINO's MultiCropWrapper): one backbone pass per
    size, the [CLS] embeddings concatenated in view-major order, one head pass."""

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, *crops: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.backbone(x) for x in crops]))


def dino_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float | torch.Tensor,
    student_temp: float = STUDENT_TEMP,
) -> torch.Tensor:
    """DINO's loss: mean over pairs (teacher view i, student view v), v != i, of the cross-entropy
    H(P_t, P_s) = -sum_k P_t log P_s, with P_t = softmax((t - center) / teacher_temp) (centred
    and sharpened, no gradient) and P_s = softmax(s / student_temp). Rows are view-major:
    student_out [V*B, K] (the 2 global views first), teacher_out [2*B, K] (global views only).
    With q_i = P_t of teacher view i and lp_v = log P_s of student view v, the 2V - 2 pairs sum
    in two products instead of one per pair:
        sum_v sum_{i != v} q_i . lp_v = (q_0 + q_1) . sum_v lp_v - sum_{i<2} q_i . lp_i."""
    batch = teacher_out.shape[0] // 2
    log_p = F.log_softmax(student_out.float() / student_temp, dim=-1)
    log_p = log_p.view(-1, batch, log_p.shape[-1])  # [V, B, K]
    p_t = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1).detach()
    p_t = p_t.view(2, batch, -1)
    cross = (p_t.sum(0) * log_p.sum(0)).sum() - (p_t * log_p[:2]).sum()
    pairs = 2 * log_p.shape[0] - 2
    return -cross / (pairs * batch)


@torch.no_grad()
def update_center(
    center: torch.Tensor, teacher_out: torch.Tensor, momentum: float = CENTER_MOMENTUM
) -> torch.Tensor:
    """center <- m * center + (1 - m) * mean of the teacher outputs of the whole global batch
    (the per-rank means all-reduced: every rank holds the same center)."""
    batch_center = common.all_reduce_mean(teacher_out.float().mean(0, keepdim=True))
    return center * momentum + batch_center * (1 - momentum)


@torch.no_grad()
def ema_update(
    teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], m: float
) -> None:
    """Teacher = EMA of the student: theta_t <- m * theta_t + (1 - m) * theta_s (one lerp)."""
    torch._foreach_lerp_(teacher_params, [p.detach() for p in student_params], 1 - m)


@torch.no_grad()
def clip_gradients(params: list[torch.Tensor], clip: float) -> None:
    """Per-parameter clipping as in DINO: each gradient scaled to norm <= clip on its own."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack(torch._foreach_norm(grads))
    torch._foreach_mul_(grads, (clip / (norms + 1e-6)).clamp(max=1.0).unbind())


def param_groups(model: nn.Module) -> list[dict]:
    """Trainable parameters, with weight decay except on norms, biases and LayerScale (1-d)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay}, {"params": plain, "weight_decay": 0.0}]


def vit_overrides(args: argparse.Namespace) -> dict:
    """timm size overrides from --depth / --embed-dim (heads of 64 channels)."""
    over = {} if args.depth is None else {"depth": args.depth}
    if args.embed_dim is not None:
        over.update(embed_dim=args.embed_dim, num_heads=max(1, args.embed_dim // 64))
    return over


def build_networks(args: argparse.Namespace) -> tuple[MultiCropNet, MultiCropNet]:
    """Student (V + head, drop-path, first --freeze-blocks blocks frozen) and teacher (a copy:
    same start, no gradient, eval mode so drop-path is off)."""
    V = common.build_vit(
        args.arch,
        pretrained=args.pretrained,
        init=args.init,
        layerscale_init=args.layerscale_init,
        img_size=args.global_size,
        drop_path_rate=args.drop_path,
        **vit_overrides(args),
    )
    if args.freeze_blocks > 0:
        for part in [V.patch_embed, *V.blocks[: args.freeze_blocks]]:
            part.requires_grad_(False)
        for name in ("cls_token", "pos_embed", "reg_token"):
            if isinstance(getattr(V, name, None), nn.Parameter):
                getattr(V, name).requires_grad_(False)
    student = MultiCropNet(
        V, DINOHead(V.embed_dim, args.out_dim, args.head_hidden, args.bottleneck)
    )
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    return student, teacher


def step_flops(V: nn.Module, head: DINOHead, args: argparse.Namespace) -> float:
    """Model FLOPs per frame of one step, counted per crop resolution: the student's forward and
    backward (3x forward) over 2 global + n local crops, the teacher's forward over the globals."""
    head_f = 2.0 * sum(
        m.in_features * m.out_features for m in head.modules() if isinstance(m, nn.Linear)
    )
    glob = common.vit_flops(V, args.global_size, args.global_size) + head_f
    loc = common.vit_flops(V, args.local_size, args.local_size) + head_f
    return 3 * (2 * glob + args.local_crops * loc) + 2 * glob


def mfu_dtype(device: torch.device) -> torch.dtype:
    """The dtype the step's matmuls run in: bf16 under autocast on CUDA, fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# --------------------------------------------------------------------------------------------
# Data: frames of the training splits, per-rank batches, a reader thread
# --------------------------------------------------------------------------------------------


def train_frame_ids(data_dir: str | Path, splits: list[str]) -> np.ndarray:
    """Rows of frames.npy listed in manifest.csv under `splits` (sorted, unique)."""
    rows = common.read_manifest(data_dir)
    ids = sorted({r["frame_idx"] for r in rows if r["split"] in splits})
    if not ids:
        found = sorted({r["split"] for r in rows})
        raise ValueError(
            f"{Path(data_dir) / 'manifest.csv'}: no frames in split(s) {splits}; it has {found}"
        )
    return np.asarray(ids, dtype=np.int64)


class FrameBatches:
    """The frames of each step. Every epoch is a permutation of the training frames drawn from
    (seed, epoch), cut into global batches of batch*world; rank r takes rows [r*B, (r+1)*B) of
    each (DistributedSampler's shards, by blocks). A function of the step alone: a resumed run
    sees the same data, and world*B on N ranks sees the data of batch N*B on one."""

    def __init__(self, ids: np.ndarray, batch: int, rank: int, world: int, seed: int) -> None:
        self.ids, self.batch, self.rank, self.world, self.seed = ids, batch, rank, world, seed
        self.steps_per_epoch = len(ids) // (batch * world)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(ids)} training frames cannot fill one step of {batch} frames x {world} "
                "ranks: lower --batch-size"
            )
        self._epoch, self._perm = -1, ids

    def __call__(self, step: int) -> np.ndarray:
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = self.ids[
                np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))
            ]
        lo = (j * self.world + self.rank) * self.batch
        return np.sort(self._perm[lo : lo + self.batch])  # sorted: sequential memmap reads


def prefetch(frames: np.ndarray, batches: FrameBatches, start: int, stop: int, pin: bool):
    """Yield the uint8 frames [B, H, W, 3] of steps start..stop-1, read from the memmap (pinned
    when `pin`) by a background thread up to 3 steps ahead of the GPU."""
    q: queue.Queue = queue.Queue(maxsize=3)

    def read() -> None:
        try:
            for step in range(start, stop):
                x = torch.from_numpy(np.ascontiguousarray(frames[batches(step)]))
                q.put(x.pin_memory() if pin else x)
        except BaseException as e:  # handed to the training loop, which re-raises it
            q.put(e)

    threading.Thread(target=read, daemon=True).start()
    for _ in range(start, stop):
        item = q.get()
        if isinstance(item, BaseException):
            raise item
        yield item


def seed_step(seed: int, step: int, rank: int, gen: torch.Generator) -> None:
    """Seed every draw of one step (crops into `gen`, drop-path from torch's global RNG) from
    (seed, step, rank): the RNG state is a function of the step, so a resumed run draws exactly
    what an uninterrupted one would, on every rank, without carrying generator states."""
    aug, drop = np.random.SeedSequence([seed, step, rank]).generate_state(2)
    gen.manual_seed(int(aug))
    torch.manual_seed(int(drop))


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one training step needs: networks, optimizer, center and the per-step schedules."""

    student: MultiCropNet
    teacher: MultiCropNet
    student_fwd: nn.Module  # the student as called: compiled and/or wrapped in DDP
    teacher_fwd: nn.Module
    render: Callable  # render_views, compiled under --compile
    loss: Callable  # dino_loss, compiled under --compile
    opt: torch.optim.Optimizer
    center: torch.Tensor
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    temp: torch.Tensor  # on the device: indexing it costs no copy, and a compiled loss
    frozen_last_until: int  # steps with the head's last layer frozen
    clip_grad: float
    device: torch.device


def build_run(
    args: argparse.Namespace, device: torch.device, world: int, steps_per_epoch: int, total: int
) -> Run:
    """Networks (seeded: every rank starts the same), AdamW (fused on CUDA) and the schedules of
    DINO: cosine LR with linear warm-up (peak --lr scaled by the global batch / 256), cosine weight
    decay, cosine teacher momentum to 1, teacher temperature warm-up."""

    def in_steps(epochs: float) -> int:
        return min(total, round(epochs * steps_per_epoch))

    common.seed_everything(args.seed)
    student, teacher = build_networks(args)
    student.to(device)
    teacher.to(device)
    # static shapes: one graph per crop size, not one dynamic graph for both
    maybe_compile = functools.partial(torch.compile, dynamic=False) if args.compile else _same
    student_fwd = maybe_compile(student)
    if dist.is_initialized() and dist.get_world_size() > 1:  # DDP all-reduces the gradients:
        ids = [device.index] if device.type == "cuda" else None  # the student's forward goes
        student_fwd = DDP(student_fwd, device_ids=ids)  # through it, not through .module
    peak_lr = args.lr * args.batch_size * world / 256
    return Run(
        student=student,
        teacher=teacher,
        student_fwd=student_fwd,
        teacher_fwd=maybe_compile(teacher),
        render=maybe_compile(render_views),
        loss=maybe_compile(dino_loss),
        opt=torch.optim.AdamW(param_groups(student), lr=0.0, fused=device.type == "cuda"),
        center=torch.zeros(1, args.out_dim, device=device),
        lr=cosine_schedule(peak_lr, args.min_lr, total, in_steps(args.warmup_epochs)),
        wd=cosine_schedule(args.weight_decay, args.weight_decay_end, total),
        momentum=cosine_schedule(args.momentum_teacher, 1.0, total),
        temp=torch.tensor(
            teacher_temp_schedule(
                args.warmup_teacher_temp,
                args.teacher_temp,
                total,
                in_steps(args.warmup_teacher_temp_epochs),
            ),
            dtype=torch.float32,
            device=device,
        ),
        frozen_last_until=in_steps(args.freeze_last_layer),
        clip_grad=args.clip_grad,
        device=device,
    )


def _same(f: Callable) -> Callable:
    return f


def train_step(run: Run, step: int, globals_: torch.Tensor, locals_: torch.Tensor) -> torch.Tensor:
    """One DINO step on a batch of crops; returns the loss (a device tensor: no host sync)."""
    for group in run.opt.param_groups:
        group["lr"] = float(run.lr[step])
    run.opt.param_groups[0]["weight_decay"] = float(run.wd[step])
    with torch.autocast(run.device.type, torch.bfloat16, enabled=run.device.type == "cuda"):
        with torch.no_grad():
            t_out = run.teacher_fwd(globals_)
        s_out = run.student_fwd(globals_, locals_)
    loss = run.loss(s_out, t_out, run.center, run.temp[step])
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.clip_grad > 0:
        clip_gradients([p for p in run.student.parameters() if p.requires_grad], run.clip_grad)
    if step < run.frozen_last_until:  # DINO: the last layer learns only after the first epoch
        for p in run.student.head.last_layer.parameters():
            p.grad = None
    run.opt.step()
    ema_update(
        list(run.teacher.parameters()), list(run.student.parameters()), float(run.momentum[step])
    )
    run.center = update_center(run.center, t_out)
    return loss.detach()


def checkpoint_state(run: Run, step: int, args: argparse.Namespace) -> dict:
    """Everything a resume needs. The RNG state is (--seed, step): see seed_step."""
    return {
        "student": run.student.state_dict(),
        "teacher": run.teacher.state_dict(),
        "optimizer": run.opt.state_dict(),
        "center": run.center.cpu(),
        "step": step,
        "args": json.dumps(vars(args)),
    }


def resume(run: Run, ckpt: dict, args: argparse.Namespace) -> int:
    """Load a checkpoint into `run`; return its step."""
    run.student.load_state_dict(ckpt["student"])
    run.teacher.load_state_dict(ckpt["teacher"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.center = ckpt["center"].to(run.device)
    changed = {k: v for k, v in json.loads(ckpt["args"]).items() if vars(args).get(k, v) != v}
    if changed and common.is_main():
        print(f"train_dino: flags differ from the checkpoint's (now in force): {changed}")
    return ckpt["step"]


def train(args: argparse.Namespace) -> Run:
    """Run (or resume) DINO training and export the teacher backbone; return this rank's Run."""
    from tqdm import tqdm

    rank, world, device = common.setup_distributed(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frames = common.open_frames(args.data)
    ids = train_frame_ids(args.data, args.splits.split(","))
    batches = FrameBatches(ids, args.batch_size, rank, world, args.seed)
    spe = batches.steps_per_epoch
    total = args.steps or max(1, round(args.epochs * spe))
    run = build_run(args, device, world, spe, total)
    ckpt_path = out / "checkpoint.pt"
    ckpt = common.load_checkpoint(ckpt_path)
    start = resume(run, ckpt, args) if ckpt is not None else 0
    last_good = start if ckpt is not None else None
    if common.is_main():
        print(
            f"train_dino: {len(ids)} frames, {world} process(es) x {args.batch_size}, "
            f"{spe} steps/epoch, steps {start}->{total}"
        )
    flops = step_flops(run.student.backbone, run.student.head, args)
    peak = common.matmul_peak_tflops(device, mfu_dtype(device))
    gen = torch.Generator(device)
    loss_sum = torch.zeros((), device=device)
    bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite loss
    bar = tqdm(total=total, initial=start, desc="train_dino", disable=not common.is_main())
    t_log, n_log = time.perf_counter(), 0

    def check_finite() -> None:
        """All ranks stop together on a non-finite loss (a host sync: only at logs and saves)."""
        flag = bad_step.clone()
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() >= 0:
            kept = f"{ckpt_path} (step {last_good})" if last_good is not None else "none yet"
            raise SystemExit(
                f"train_dino: non-finite DINO loss at step {flag.item()}; stopped. "
                f"Last good checkpoint: {kept}. Lower --lr or raise --warmup-epochs."
            )

    reader = prefetch(frames, batches, start, total, pin=device.type == "cuda")
    for step, batch in enumerate(reader, start=start):
        seed_step(args.seed, step, rank, gen)
        with torch.no_grad():
            globals_, locals_ = multi_crop(
                batch.to(device, non_blocking=True), args, gen, run.render
            )
        loss = train_step(run, step, globals_, locals_)
        loss_sum += loss
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step, bad_step)
        done, n_log = step + 1, n_log + 1
        bar.update(1)
        if done % args.log_every == 0 or done == total:
            check_finite()
            mean_loss = common.all_reduce_mean(loss_sum / n_log).item()
            ips = args.batch_size * n_log / (time.perf_counter() - t_log)
            if ips * flops > peak * 1e12:  # the peak was measured while others used the CPU
                peak = max(peak, common.matmul_peak_tflops(device, mfu_dtype(device)))
            record = {
                "step": done,
                "epoch": done / spe,
                "loss": mean_loss,
                "lr": float(run.lr[step]),
                "weight_decay": float(run.wd[step]),
                "momentum": float(run.momentum[step]),
                "teacher_temp": float(run.temp[step]),
                "images_per_s_per_device": ips,
                "images_per_s": ips * world,
                "mfu": ips * flops / (peak * 1e12),
                "peak_mem_gb": common.peak_memory_gb(device),
            }
            if common.is_main():
                with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(
                    loss=f"{mean_loss:.4f}", ips=f"{ips:.1f}", mfu=f"{record['mfu']:.1%}"
                )
            loss_sum.zero_()
            t_log, n_log = time.perf_counter(), 0
        if done % args.save_every == 0 or done == total:
            check_finite()
            if common.is_main():
                common.save_checkpoint(ckpt_path, checkpoint_state(run, done, args))
            last_good = done
    bar.close()
    if common.is_main():
        cfg = {
            "arch": args.arch,
            "img_size": args.global_size,
            "layerscale_init": args.layerscale_init,
            "overrides": vit_overrides(args),
            "start": "pretrained" if args.pretrained else (args.init or "random"),
            "steps": total,
            "trained_by": "train_dino.py",
        }
        print(f"train_dino: wrote {common.export_encoder(run.teacher.backbone, out, cfg)}")
    return run


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    finally:
        common.cleanup_distributed()


if __name__ == "__main__":
    main()
