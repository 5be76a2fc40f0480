"""train_dino.py and utils.py's V (build, export, encode), on the CPU with tiny ViTs."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_dino
import utils

REPO = Path(__file__).resolve().parents[1]

# A ViT of 2 blocks x 64 channels, a small head and small crops: a step takes well under a second.
TINY = [
    "--device", "cpu", "--depth", "2", "--embed-dim", "64", "--out-dim", "128",
    "--head-hidden", "128", "--bottleneck", "32", "--global-size", "56", "--local-size", "28",
    "--local-crops", "2", "--batch-size", "8", "--warmup-epochs", "0", "--log-every", "1",
]  # fmt: skip


# The recommended CPU settings (README / run_all.sh): ViT-S/14 with 6 blocks, 112/56-pixel
# crops on the 112x196 demo canvas; the test runs a few steps of them, the demo runs 25.
CPU_DEMO = [
    "--device", "cpu", "--batch-size", "16", "--global-size", "112", "--local-size", "56",
    "--local-crops", "2", "--out-dim", "4096", "--depth", "6",
]  # fmt: skip


def write_frames(data: Path, frames: np.ndarray, splits: list[str]) -> Path:
    """A data dir in prep.py's format (frames.npy, frames.json, manifest.csv)."""
    data.mkdir(parents=True, exist_ok=True)
    np.save(data / "frames.npy", frames)
    n, h, w, _ = frames.shape
    (data / "frames.json").write_text(json.dumps({"height": h, "width": w, "count": n}))
    with open(data / "manifest.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(utils.MANIFEST_COLUMNS)
        for i, split in enumerate(splits):
            out.writerow([split, f"c{i // 4}", i, f"frames/c{i // 4}/frame_{i % 4:05d}.jpg", i % 4])
    return data


def scene_frames(n: int, seed: int = 0, h: int = 56, w: int = 98) -> np.ndarray:
    """Frames of two coloured 'people' on a plain background."""
    rng = np.random.default_rng(seed)
    colours = np.array([[220, 40, 40], [40, 40, 220], [40, 200, 40], [230, 200, 40]], np.uint8)
    frames = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i] = rng.integers(120, 220)
        for c in rng.choice(4, 2, replace=False):
            x0, y0 = rng.integers(0, w - 14), rng.integers(0, h - 28)
            frames[i, y0 : y0 + 28, x0 : x0 + 12] = colours[c]
    return frames


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    splits = ["train"] * 32 + ["val"] * 8
    return write_frames(tmp_path_factory.mktemp("dino_data"), scene_frames(40), splits)


def args_for(data: Path, out: Path, *extra: str):
    return train_dino.parse_args([*TINY, "--data", str(data), "--out", str(out), *extra])


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


def test_cosine_schedule_warmup_and_ends():
    s = utils.cosine_schedule(1.0, 0.1, total=100, warmup=10)
    assert len(s) == 100
    assert s[0] == pytest.approx(0.1) and np.all(np.diff(s[:10]) > 0)  # linear warm-up
    assert s[9] == pytest.approx(1.0) and s[10] == pytest.approx(1.0)  # the peak, then cosine
    assert np.all(np.diff(s[10:]) < 0) and s[-1] == pytest.approx(0.1, abs=1e-3)
    assert s[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 45 / 90)))
    m = utils.cosine_schedule(0.996, 1.0, total=50)
    assert m[0] == pytest.approx(0.996) and m[-1] == pytest.approx(1.0, abs=1e-5)


def test_schedules_lr_scaled_by_global_batch_and_teacher_temp_warmup(tiny_data, tmp_path):
    flags = ["--lr", "0.256", "--warmup-epochs", "1", "--teacher-temp", "0.07"]
    flags += ["--warmup-teacher-temp", "0.04", "--warmup-teacher-temp-epochs", "1.25"]
    args = args_for(tiny_data, tmp_path, *flags)
    sched = train_dino.schedules(args, total=4000, steps_per_epoch=4, device="cpu")
    lr = sched["lr"]
    assert lr.max() == pytest.approx(0.256 * 8 / 256)  # the global batch, on any number of ranks
    assert lr[0] == pytest.approx(lr.max() / 4) and np.argmax(lr) == 3  # 1 epoch = 4 steps
    assert sched["freeze_last_layer"][:4].all() and not sched["freeze_last_layer"][4:].any()
    t = sched["teacher_temp"]  # 1.25 epochs = 5 steps of linear warm-up, then constant
    assert t.dtype == torch.float32 and len(t) == 4000
    assert t[0].item() == pytest.approx(0.04) and t[4].item() == pytest.approx(0.07)
    assert torch.all(t[5:] == t[4]) and torch.all(torch.diff(t[:5]) > 0)
    assert sched["weight_decay"][0] == pytest.approx(0.04)
    assert sched["momentum"][0] == pytest.approx(0.996)


def test_short_runs_scale_the_schedules_to_their_length(tiny_data, tmp_path):
    """A run shorter than DINO's 100 epochs keeps the warm-up and the freeze as fractions of it,
    and its teacher moves: the sum of (1 - momentum) reaches EMA_HORIZON. Long runs: DINO's."""
    args = args_for(tiny_data, tmp_path, "--warmup-epochs", "10", "--freeze-last-layer", "1")
    short = train_dino.schedules(args, total=30, steps_per_epoch=59, device="cpu")
    assert np.argmax(short["lr"]) == 2  # 10% of 30 steps of warm-up, not 590
    assert not short["freeze_last_layer"].any()  # 1% of 30 steps rounds to none
    assert (1 - short["momentum"]).sum() >= train_dino.EMA_HORIZON - 0.5
    long = train_dino.schedules(args, total=6000, steps_per_epoch=50, device="cpu")
    assert np.argmax(long["lr"]) == 499 and long["freeze_last_layer"].sum() == 50
    assert long["momentum"][0] == pytest.approx(0.996)  # DINO's own start
    tiny = train_dino.schedules(args, total=4, steps_per_epoch=59, device="cpu")
    assert tiny["momentum"][0] == 0.0  # never below 0: the teacher follows the student


def test_teacher_stats_read_collapse():
    """Mutual information H(mean P_t) - mean H(P_t): 0 for one target for all, ln B for B
    distinct one-hot targets; prototypes used: distinct argmaxes."""
    center = torch.zeros(1, 16)
    same = train_dino.teacher_stats(torch.zeros(8, 16), center, 0.04)
    assert same["teacher_mi"] == pytest.approx(0.0, abs=1e-5)
    assert same["teacher_entropy"] == pytest.approx(math.log(16), rel=1e-5)
    distinct = train_dino.teacher_stats(100 * torch.eye(16)[:8], center, 0.04)
    assert distinct["teacher_mi"] == pytest.approx(math.log(8), rel=1e-4)
    assert distinct["prototypes_used"] == 8 and same["prototypes_used"] == 1


def test_bn_head_teacher_uses_batch_statistics(tiny_data, tmp_path):
    student, teacher = train_dino.build_networks(args_for(tiny_data, tmp_path, "--bn-head"))
    bns = [m for m in teacher.head.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bns) == 2 and all(m.training for m in bns) and not teacher.backbone.training
    with torch.no_grad():  # an output depends on the rest of its batch: batch statistics
        x = torch.randn(6, 64)
        alone, together = teacher.head(x[:3]), teacher.head(x)[:3]
    assert not torch.allclose(alone, together)
    names = [k for k in student.state_dict() if "mlp.1." in k]
    assert "head.mlp.1.running_mean" in names  # Linear, BatchNorm, GELU, ...


def test_uniform_fixed_point_is_flagged(tiny_data, tmp_path, capsys):
    """A planted uniform run (teacher temperature 100: every target uniform, loss >= ln K) ends
    with a warning that names the fix, and encoder.json records it."""
    flags = ["--steps", "2", "--teacher-temp", "100", "--warmup-teacher-temp", "100"]
    train_dino.train_dino(args_for(tiny_data, tmp_path, *flags))
    assert "DINO is at its uniform fixed point" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "encoder.json").read_text())
    assert cfg["uniform_fixed_point"] and cfg["out_dim"] == 128
    last = metrics(tmp_path)[-1]
    assert last["teacher_mi"] == pytest.approx(0.0, abs=1e-3) and last["prototypes_used"] >= 1


# --------------------------------------------------------------------------------------------
# Multi-crop augmentation on the device
# --------------------------------------------------------------------------------------------


def crops(seed: int, frames: np.ndarray, **flags):
    args = train_dino.parse_args(["--data", "-", "--out", "-", *TINY])
    for k, v in flags.items():
        setattr(args, k, v)
    gen = torch.Generator().manual_seed(seed)
    return train_dino.multi_crop(torch.from_numpy(frames), args, gen)


def test_patch_matmul_is_the_patch_convolution():
    """build_vit's V computes what timm's ViT computes, forward and backward, with the same state
    dict; PatchMatmul floors partial patches as the convolution does."""
    import timm

    torch.manual_seed(0)
    V = utils.build_vit(depth=1, img_size=56, layerscale_init=None)
    torch.manual_seed(0)
    plain = timm.create_model(utils.DEFAULT_ARCH, num_classes=0, dynamic_img_size=True, depth=1,
                              img_size=56)  # fmt: skip
    assert isinstance(V.patch_embed.proj, utils.PatchMatmul)
    ours, theirs = V.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    x = torch.randn(2, 3, 56, 98)
    V(x).square().sum().backward()
    plain(x).square().sum().backward()
    torch.testing.assert_close(V(x), plain(x), atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(V.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)
    proj, x = V.patch_embed.proj, torch.randn(1, 3, 60, 45)  # not whole patches
    torch.testing.assert_close(proj(x), F.conv2d(x, proj.weight, proj.bias, stride=14))


def test_bf16_stream_changes_only_the_autocast_stream(tiny_data, tmp_path):
    """--bf16-stream: student and teacher (a deep copy) carry bf16 tokens into every block under
    autocast, checkpointed too, close to the float32 stream; without autocast V is V, same weights."""
    torch.manual_seed(0)
    plain, _ = train_dino.build_networks(args_for(tiny_data, tmp_path))
    torch.manual_seed(0)
    nets = train_dino.build_networks(args_for(tiny_data, tmp_path, "--bf16-stream"))
    V0, x, dtypes = plain.backbone.eval(), torch.randn(2, 3, 56, 98), []
    ours, theirs = nets[0].state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    for V in (net.backbone.eval() for net in nets):
        for block in V.blocks:  # what each block reads
            block.register_forward_pre_hook(lambda m, a: dtypes.append(a[0].dtype))
        assert torch.equal(V(x), V0(x)) and set(dtypes) == {torch.float32}
        for checkpointed in (False, True):  # timm's checkpoint_seq calls the blocks one by one
            V.set_grad_checkpointing(checkpointed)
            dtypes.clear()
            with torch.autocast("cpu", torch.bfloat16):
                ours, theirs = V(x), V0(x)
            assert dtypes == [torch.bfloat16] * len(V.blocks)
            assert F.cosine_similarity(ours.float(), theirs.float()).min() > 0.99
            assert not torch.equal(ours.float(), theirs.float())  # the stream did change
        dtypes.clear()


def test_run_vit_sends_short_gpu_images_to_the_memory_efficient_kernel(monkeypatch):
    """run_vit is V(x) on the CPU; on a GPU, images of under 128 patches run inside sdpa_kernel
    with the memory-efficient kernel first (SDPA's others after it), longer ones as they are."""
    import torch.nn.attention as attention

    V, x = utils.build_vit(depth=1, img_size=56), torch.randn(2, 3, 56, 98)
    assert torch.equal(utils.run_vit(V, x), V(x))
    seen = []

    @contextlib.contextmanager
    def record(backends, set_priority=False):
        seen.append((backends, set_priority))
        yield

    class Stub:  # V's patch size; reads an image and returns it
        patch_embed = types.SimpleNamespace(patch_size=(14, 14))

        def __call__(self, image):
            return image

    monkeypatch.setattr(attention, "sdpa_kernel", record)
    for side, short in ((98, True), (154, True), (168, False), (224, False)):  # 49 ... 256 patches
        seen.clear()
        image = types.SimpleNamespace(is_cuda=True, shape=(2, 3, side, side))
        assert utils.run_vit(Stub(), image) is image
        if short:
            ((backends, priority),) = seen
            assert backends[0] == attention.SDPBackend.EFFICIENT_ATTENTION and priority
            assert attention.SDPBackend.MATH in backends  # a fallback where it cannot run
        else:
            assert seen == []


def test_multi_crop_shapes_ranges_determinism():
    frames = scene_frames(5)
    g, loc = crops(0, frames)
    assert g.shape == (2 * 5, 3, 56, 56) and loc.shape == (2 * 5, 3, 28, 28)
    lo = (0 - torch.tensor(utils.IMAGENET_MEAN)) / torch.tensor(utils.IMAGENET_STD)
    hi = (1 - torch.tensor(utils.IMAGENET_MEAN)) / torch.tensor(utils.IMAGENET_STD)
    for x in (g, loc):
        assert x.dtype == torch.float32 and torch.isfinite(x).all()
        per_channel = x.transpose(0, 1).reshape(3, -1)
        assert (per_channel.min(1).values >= lo - 1e-4).all()
        assert (per_channel.max(1).values <= hi + 1e-4).all()
    g2, loc2 = crops(0, frames)
    assert torch.equal(g, g2) and torch.equal(loc, loc2)  # same seed, same crops
    g3, _ = crops(1, frames)
    assert not torch.allclose(g, g3)
    assert not torch.allclose(g[:5], g[5:])  # the two global views of a frame differ


def test_random_boxes_inside_and_scaled():
    gen = torch.Generator().manual_seed(0)
    b = train_dino.random_boxes(2000, 56, 98, (0.2, 0.6), gen)
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 2] <= 98 + 1e-4).all() and (b[:, 3] <= 56 + 1e-4).all()
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (56 * 98)
    assert area.min() >= 0.2 - 1e-4 and area.max() <= 0.6 + 1e-4
    ratio = (b[:, 2] - b[:, 0]) / (b[:, 3] - b[:, 1])
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    # no draw fits (the whole 56x98 frame at ratios <= 4/3): torchvision's centred fallback
    w = 56 * 4 / 3
    fallback = torch.tensor([[(98 - w) / 2, 0, (98 + w) / 2, 56]] * 3)
    assert torch.allclose(train_dino.random_boxes(3, 56, 98, (1.0, 1.0), gen), fallback)


def test_photometric_ops():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 20, 20)
    basis = train_dino.hue_basis()
    off = train_dino.draw_jitter(6, gen, p=0.0)
    assert torch.equal(off, torch.tensor([[1.0, 1, 1, 0]] * 6))
    assert torch.allclose(train_dino.color_jitter(x, off, basis), x, atol=1e-6)
    y = train_dino.color_jitter(x, train_dino.draw_jitter(6, gen, p=1.0), basis)
    assert not torch.allclose(y, x) and y.min() >= 0 and y.max() <= 1
    one, zero = torch.ones(6), torch.zeros(6)
    grey = train_dino.grayscale(x, one)
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    assert torch.equal(train_dino.grayscale(x, zero), x)
    assert torch.equal(train_dino.solarize(x, one), torch.where(x >= 0.5, 1 - x, x))
    assert torch.equal(train_dino.solarize(x, zero), x)
    sharp = train_dino.gaussian_blur(x, torch.full((6,), 1e-3), radius=6)
    assert torch.allclose(sharp, x, atol=1e-6)
    blurred = train_dino.gaussian_blur(x, torch.full((6,), 2.0), radius=6)
    assert blurred.std() < 0.5 * x.std()  # smoother
    assert torch.allclose(blurred.mean(), x.mean(), atol=0.02)  # a normalised kernel
    # a hue turn keeps grey pixels grey, and a quarter turn moves colours
    flat = torch.full((4, 3, 5, 5), 0.3)
    quarter = torch.tensor([[1.0, 1, 1, math.pi / 2]] * 4)
    assert torch.allclose(train_dino.color_jitter(flat, quarter, basis), flat, atol=1e-6)
    red = torch.zeros(4, 3, 5, 5)
    red[:, 0] = 0.8
    assert not torch.allclose(train_dino.color_jitter(red, quarter, basis), red, atol=0.05)


def test_view_probabilities_follow_dino():
    """Per-view blur / solarize probabilities: global view 1 always blurred, view 2 solarized
    sometimes, never view 1."""
    gen = torch.Generator().manual_seed(0)
    p = train_dino.draw_views(2000, 2, 56, 98, (0.4, 1.0), [1.0, 0.1], [0.0, 0.2], gen)
    blurred = p["sigma"] > 0.05
    assert blurred[:2000].all() and 0.05 < blurred[2000:].float().mean() < 0.15
    assert p["solarize"][:2000].sum() == 0 and 0.15 < p["solarize"][2000:].mean() < 0.25
    assert 0.15 < p["grey"].mean() < 0.25 and 0.45 < p["flip"].mean() < 0.55
    assert p["boxes"].shape == (4000, 4) and p["sigma"].shape == (4000,)


def test_resample_matrix_rows_identity_and_constant():
    gen = torch.Generator().manual_seed(0)
    lo = torch.rand(50, generator=gen) * 30
    hi = lo + 1 + torch.rand(50, generator=gen) * (70 - 1 - lo)  # shrink and enlarge, in frame
    m = train_dino.resample_matrix(lo, hi, 70, 16)
    assert m.shape == (50, 16, 70) and (m >= 0).all()
    assert torch.allclose(m.sum(-1), torch.ones(50, 16), atol=1e-6)
    eye = train_dino.resample_matrix(torch.zeros(1), torch.full((1,), 12.0), 12, 12)
    assert torch.equal(eye[0], torch.eye(12))
    half = train_dino.resample_matrix(torch.zeros(1), torch.full((1,), 40.0), 40, 20)
    assert torch.allclose(half[0] @ torch.full((40,), 0.7), torch.full((20,), 0.7), atol=1e-6)
    assert (half[0] > 0).sum(-1).min() > 2  # antialiased: more than 2 taps when shrinking 2x


def frame_rows(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> [B, H, 3·W] float32, a row's channels side by side (multi_crop's)."""
    b, h, w, _ = frames.shape
    return frames.permute(0, 1, 3, 2).reshape(b, h, 3 * w).float()


def test_resized_crops_match_pil_bilinear():
    """resample_matrix is PIL's antialiased bilinear resize (PIL rounds to uint8 between its two
    passes, hence the tolerance of about one level)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    img = frame_rows(torch.from_numpy(frame[None]))
    for box in [(3.5, 2.0, 60.25, 37.0), (10.0, 5.5, 22.0, 17.5), (0.0, 0.0, 70.0, 40.0)]:
        rows = train_dino.resample_matrix(torch.tensor([box[1]]), torch.tensor([box[3]]), 40, 16)
        cols = train_dino.resample_matrix(torch.tensor([box[0]]), torch.tensor([box[2]]), 70, 16)
        ours = train_dino.resized_crops(img, rows, cols)[0].permute(1, 2, 0)
        pil = Image.fromarray(frame).resize((16, 16), Image.Resampling.BILINEAR, box=box)
        diff = (ours - torch.from_numpy(np.array(pil)).float()).abs()
        assert diff.max() <= 1.5 and diff.mean() < 0.5, (box, diff.max())


def plain_views(b: int, views: int, h: int, w: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """draw_views' boxes and flips with jitter, grey, blur and solarize off."""
    gen = torch.Generator().manual_seed(seed)
    p = train_dino.draw_views(b, views, h, w, (0.05, 0.6), [0.0] * views, [0.0] * views, gen)
    n = b * views
    p.update(jitter=torch.tensor([[1.0, 1, 1, 0]] * n), grey=torch.zeros(n))
    p.update(sigma=torch.full((n,), 1e-3), solarize=torch.zeros(n))
    return p


def render(frames: np.ndarray, params: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    img = frame_rows(torch.from_numpy(frames))
    return train_dino.render_views(img, params, size, train_dino.hue_basis())


def test_crop_rows_are_view_major_and_follow_their_boxes():
    """Row v*b + i is view v of frame i, cut by box and flip v*b + i."""
    b, views, size = 3, 4, 12
    colours = np.array([[200, 10, 30], [20, 180, 60], [40, 90, 250]], np.uint8)
    flat = np.broadcast_to(colours[:, None, None], (b, 30, 50, 3)).copy()
    out = render(flat, plain_views(b, views, 30, 50), size)
    assert out.shape == (views * b, 3, size, size)
    want = torch.from_numpy(colours).float().div(255).repeat(views, 1)[:, :, None, None]
    assert torch.allclose(out, want.expand_as(out), atol=1e-5)
    # every crop against its own box and flip, one frame and one matmul pair at a time
    frames = np.random.default_rng(0).integers(0, 256, (b, 30, 50, 3), dtype=np.uint8)
    p = plain_views(b, views, 30, 50, seed=1)
    assert 0 < p["flip"].sum() < views * b
    out = render(frames, p, size)
    for v in range(views):
        for i in range(b):
            k = v * b + i
            x0, y0, x1, y1 = p["boxes"][k : k + 1].unbind(1)
            rows = train_dino.resample_matrix(y0, y1, 30, size)[0]
            cols = train_dino.resample_matrix(x0, x1, 50, size)[0]
            frame = torch.from_numpy(frames[i]).permute(2, 0, 1).float() / 255
            crop = rows @ frame @ cols.T
            crop = crop.flip(-1) if p["flip"][k] else crop
            assert torch.allclose(out[k], crop, atol=1e-5), (v, i)


def test_flipped_crop_is_the_crop_flipped():
    frames = np.random.default_rng(1).integers(0, 256, (2, 30, 50, 3), dtype=np.uint8)
    p = plain_views(2, 3, 30, 50)
    p["jitter"] = train_dino.draw_jitter(6, torch.Generator().manual_seed(0), p=1.0)
    p["sigma"] = torch.full((6,), 1.5)  # blur and jitter too: they commute with the flip
    unflipped = render(frames, {**p, "flip": torch.zeros(6)}, 14)
    flipped = render(frames, {**p, "flip": torch.ones(6)}, 14)
    assert torch.allclose(flipped, unflipped.flip(-1), atol=1e-5)
    assert not torch.allclose(flipped, unflipped, atol=1e-2)


def test_blur_matrix_is_reflect_padded_gaussian():
    sigma = torch.tensor([1e-3, 0.7, 2.0])
    k = train_dino.blur_matrix(sigma, 15, radius=6)
    assert torch.equal(k[0], torch.eye(15))
    assert torch.allclose(k.sum(-1), torch.ones(3, 15), atol=1e-6)
    x = torch.rand(3, 3, 15, 20)
    ours = train_dino.gaussian_blur(x, sigma, radius=6)
    for i, s in enumerate(sigma):  # reference: a depthwise separable conv, reflect padding
        t = torch.arange(-6, 7, dtype=torch.float32)
        g = torch.exp(-(t**2) / (2 * s**2))
        g = (g / g.sum()).expand(3, 13)
        y = F.pad(x[i : i + 1], (6, 6, 6, 6), mode="reflect")
        y = F.conv2d(F.conv2d(y, g[:, None, None, :], groups=3), g[:, None, :, None], groups=3)
        assert torch.allclose(ours[i], y[0], atol=1e-5), i
    with pytest.raises(ValueError, match="blur radius 6 needs crops larger than 6 pixels"):
        train_dino.blur_matrix(sigma, 6, radius=6)


# --------------------------------------------------------------------------------------------
# Loss, centering, EMA
# --------------------------------------------------------------------------------------------


def reference_dino_loss(s_out, t_out, center, temp, n_crops):
    """DINO's DINOLoss.forward, written out loop by loop."""
    student = (s_out / 0.1).chunk(n_crops)
    teacher = F.softmax((t_out - center) / temp, dim=-1).chunk(2)
    total, terms = 0.0, 0
    for iq, q in enumerate(teacher):
        for v in range(n_crops):
            if v == iq:
                continue
            total += torch.sum(-q * F.log_softmax(student[v], dim=-1), dim=-1).mean()
            terms += 1
    return total / terms


def test_dino_loss_matches_reference_and_skips_same_view():
    torch.manual_seed(0)
    b, k = 4, 16
    for n_crops in (2, 10, 4):  # globals only, DINO's 2 + 8, and the case below
        s_out, t_out = torch.randn(n_crops * b, k), torch.randn(2 * b, k)
        center = torch.randn(1, k)
        loss = train_dino.dino_loss(s_out, t_out, center, 0.04)
        want = reference_dino_loss(s_out, t_out, center, 0.04, n_crops)
        assert loss.item() == pytest.approx(want.item(), rel=1e-5), n_crops
    # only pairs of different views count: a student that copies view 1 of the teacher onto its
    # own view 1 changes nothing in the loss term for that pair (it is skipped)
    s2 = s_out.clone()
    s2[:b] = 1000 * t_out[:b]
    manual = [
        -(F.softmax((t_out[i * b : (i + 1) * b] - center) / 0.04, -1) * F.log_softmax(
            s2[v * b : (v + 1) * b] / 0.1, -1)).sum(-1).mean()
        for i in range(2) for v in range(n_crops) if v != i
    ]  # fmt: skip
    assert len(manual) == 2 * n_crops - 2
    got = train_dino.dino_loss(s2, t_out, center, 0.04)
    assert got.item() == pytest.approx(torch.stack(manual).mean().item(), rel=1e-5)


def test_teacher_gets_no_gradient_and_center_shifts_with_the_batch():
    torch.manual_seed(0)
    s_out = torch.randn(8, 10, requires_grad=True)
    t_out = torch.randn(4, 10, requires_grad=True)
    center = torch.zeros(1, 10)
    train_dino.dino_loss(s_out, t_out, center, 0.04).backward()
    assert s_out.grad is not None and s_out.grad.abs().sum() > 0
    assert t_out.grad is None  # the teacher's output is detached inside the loss
    # centering: center <- 0.9 center + 0.1 mean(batch), toward each new batch
    new = train_dino.update_center(center, t_out.detach(), 0.9)
    assert torch.allclose(new, 0.1 * t_out.detach().mean(0, keepdim=True))
    batch = torch.randn(4, 10) + 5.0
    c = new
    for _ in range(200):
        c = train_dino.update_center(c, batch, 0.9)
    assert torch.allclose(c, batch.mean(0, keepdim=True), atol=1e-5)
    # centring changes the teacher targets, hence the loss
    shifted = train_dino.dino_loss(s_out, t_out, c, 0.04)
    assert shifted.item() != pytest.approx(train_dino.dino_loss(s_out, t_out, center, 0.04).item())


def test_train_step_teacher_is_ema_of_student(tiny_data, tmp_path):
    args = args_for(tiny_data, tmp_path, "--steps", "4", "--momentum-teacher", "0.9")
    torch.manual_seed(0)
    student, teacher = train_dino.build_networks(args)
    assert all(not p.requires_grad for p in teacher.parameters())
    opt = torch.optim.AdamW(utils.param_groups(student, args.weight_decay))
    # a long run (1000 epochs): DINO's own momentum start and first-epoch freeze
    sched = train_dino.schedules(args, total=4000, steps_per_epoch=4, device="cpu")
    t0 = [p.detach().clone() for p in teacher.parameters()]
    s0 = student.head.last_layer.weight.detach().clone()
    frames = torch.from_numpy(scene_frames(8))
    g, loc = train_dino.multi_crop(frames, args, torch.Generator().manual_seed(0))
    c0 = torch.zeros(1, args.out_dim)
    loss, center, _ = train_dino.train_step(
        student, teacher, opt, train_dino.dino_loss, c0, sched, 0, g, loc, args.clip_grad
    )
    assert torch.isfinite(loss) and not loss.requires_grad
    m = sched["momentum"][0]
    assert m == pytest.approx(0.9)
    for p_t, p0, p_s in zip(teacher.parameters(), t0, student.parameters(), strict=True):
        assert p_t.grad is None
        assert torch.allclose(p_t, m * p0 + (1 - m) * p_s.detach(), atol=1e-6)
    moved = sum((a - b).abs().sum() for a, b in zip(teacher.parameters(), t0, strict=True))
    assert moved > 0
    assert not torch.equal(center, c0)
    # the head's last layer is frozen in the first epoch (--freeze-last-layer 1)
    assert student.head.last_layer.weight.grad is None
    assert torch.equal(student.head.last_layer.weight, s0)


def test_fp8_student_keeps_its_parameters_and_the_teacher_stays(tiny_data, tmp_path):
    """--fp8: the student's V computes in float8 (torchao), with the same parameters in the same
    order, so the EMA pairs them as before; the teacher and the head keep plain linears. torchao
    is optional (with it installed, transformers imports it and torch logs warnings at every
    model load), so this runs where it is installed."""
    Float8Linear = pytest.importorskip("torchao.float8.float8_linear").Float8Linear

    args = args_for(tiny_data, tmp_path, "--steps", "4", "--fp8")
    student, teacher = train_dino.build_networks(args)
    assert any(isinstance(m, Float8Linear) for m in student.backbone.modules())
    assert not any(
        isinstance(m, Float8Linear) for m in [*teacher.modules(), *student.head.modules()]
    )
    names = [n for n, _ in student.named_parameters()]
    assert names == [n for n, _ in teacher.named_parameters()]
    opt = torch.optim.AdamW(utils.param_groups(student, args.weight_decay))
    sched = train_dino.schedules(args, total=4, steps_per_epoch=4, device="cpu")
    t0 = [p.detach().clone() for p in teacher.parameters()]
    g, loc = train_dino.multi_crop(torch.from_numpy(scene_frames(8)), args, torch.Generator())
    loss, _, _ = train_dino.train_step(student, teacher, opt, train_dino.dino_loss,
                                       torch.zeros(1, args.out_dim), sched, 0, g, loc, 3.0)  # fmt: skip
    assert torch.isfinite(loss)
    m = sched["momentum"][0]
    for p_t, p0, p_s in zip(teacher.parameters(), t0, student.parameters(), strict=True):
        assert torch.allclose(p_t, m * p0 + (1 - m) * p_s.detach(), atol=1e-6)


def test_freeze_blocks_and_weight_decay_groups(tiny_data, tmp_path):
    args = args_for(tiny_data, tmp_path, "--freeze-blocks", "1")
    student, _ = train_dino.build_networks(args)
    V = student.backbone
    assert not any(p.requires_grad for p in V.blocks[0].parameters())
    assert not V.patch_embed.proj.weight.requires_grad and not V.pos_embed.requires_grad
    assert all(p.requires_grad for p in V.blocks[1].parameters())
    decay, plain = utils.param_groups(student, 0.04)
    assert plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert sum(p.numel() for g in (decay, plain) for p in g["params"]) == sum(
        p.numel() for p in student.parameters() if p.requires_grad
    )


def test_clip_gradients_per_parameter():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([0.3, 0.4])
    train_dino.clip_gradients([a, b], 3.0)
    assert a.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    assert torch.allclose(b.grad, torch.tensor([0.3, 0.4]))  # under the limit: untouched


# --------------------------------------------------------------------------------------------
# Training runs: loss goes down, resume, non-finite loss, export
# --------------------------------------------------------------------------------------------


def test_training_lowers_the_loss(tiny_data, tmp_path, monkeypatch):
    """A few steps on the data lower the loss. The centre is held still here: from random weights
    centring first flattens the teacher's targets (the loss then climbs toward log K, as in DINO's
    first epochs), which would hide what the steps do to the student."""
    monkeypatch.setattr(train_dino, "update_center", lambda center, teacher_out: center)
    train_dino.train_dino(args_for(tiny_data, tmp_path, "--steps", "16", "--lr", "0.05"))
    lines = metrics(tmp_path)
    assert [r["step"] for r in lines] == list(range(1, 17))
    keys = ["step", "epoch", "loss", "lr", "weight_decay", "momentum", "teacher_temp"]
    keys += ["images_per_s_per_device", "images_per_s", "mfu", "peak_mem_gb"]
    keys += ["teacher_entropy", "teacher_mi", "prototypes_used"]  # collapse diagnostics
    assert all(list(r) == keys for r in lines)
    assert (tmp_path / "metrics.png").stat().st_size > 1000  # the training curve
    for key in keys:
        assert all(math.isfinite(r[key]) for r in lines), key
    assert lines[3]["epoch"] == 1.0 and lines[0]["lr"] == pytest.approx(0.05 * 8 / 256)
    first, last = lines[0]["loss"], np.mean([r["loss"] for r in lines[-3:]])
    assert last < 0.6 * first, (first, last)


def test_resume_equals_uninterrupted(tiny_data, tmp_path, monkeypatch):
    flags = ["--steps", "6", "--save-every", "3", "--lr", "0.01"]
    whole = train_dino.train_dino(args_for(tiny_data, tmp_path / "a", *flags))
    real_save = utils.save_checkpoint

    def save_then_die(path, state, args):
        real_save(path, state, args)
        raise KeyboardInterrupt  # the job is killed right after its first checkpoint

    monkeypatch.setattr(utils, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_dino.train_dino(args_for(tiny_data, tmp_path / "b", *flags))
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(utils, "save_checkpoint", real_save)
    resumed = train_dino.train_dino(args_for(tiny_data, tmp_path / "b", *flags))
    assert whole["step"] == resumed["step"] == 6
    for net in ("student", "teacher"):
        sa, sb = whole[net], resumed[net]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), net
    assert torch.equal(whole["center"], resumed["center"])
    oa, ob = whole["optimizer"]["state"], resumed["optimizer"]["state"]
    assert all(torch.equal(oa[i]["exp_avg"], ob[i]["exp_avg"]) for i in oa)
    ea = utils.load_encoder(tmp_path / "a")[0].state_dict()
    eb = utils.load_encoder(tmp_path / "b")[0].state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # the checkpoint on disk is the state returned
    disk = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(disk["teacher"][k], v) for k, v in resumed["teacher"].items())
    # the logged losses, before and after the interruption, are those of the uninterrupted run
    la, lb = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in lb] == list(range(1, 7))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_resume_refuses_a_checkpoint_of_other_identity_flags(tiny_data, tmp_path):
    train_dino.train_dino(args_for(tiny_data, tmp_path, "--steps", "2"))
    for flag, value in [("--out-dim", "64"), ("--local-crops", "3"), ("--depth", "1")]:
        with pytest.raises(SystemExit, match=f"made with {flag} .*use another --out"):
            train_dino.train_dino(args_for(tiny_data, tmp_path, "--steps", "4", flag, value))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2  # untouched
    # other flags (here more steps, another LR) continue the run from its checkpoint
    train_dino.train_dino(args_for(tiny_data, tmp_path, "--steps", "4", "--lr", "1e-4"))
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize("log_every", ["1", "5"])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    tiny_data, tmp_path, monkeypatch, log_every
):
    """A NaN loss at step 3 (0-based) stops the run at the next log or save: with a log every
    step, at once; with a log every 5 steps, at the save of step 4, which must not be written."""
    args = args_for(
        tiny_data, tmp_path, "--steps", "6", "--save-every", "2", "--log-every", log_every
    )
    real_loss = train_dino.dino_loss
    calls = {"n": 0}

    def loss_breaking_at_step_3(*a, **k):
        calls["n"] += 1
        out = real_loss(*a, **k)
        return out * float("nan") if calls["n"] == 4 else out

    monkeypatch.setattr(train_dino, "dino_loss", loss_breaking_at_step_3)
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(
        SystemExit, match=rf"non-finite loss \(nan\) at or before step 4.*{re.escape(str(ckpt))}"
    ):
        train_dino.train_dino(args)
    assert calls["n"] == 4  # stopped at step 4, not later
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["student"].values())
    assert not (tmp_path / "encoder.safetensors").exists()
    if log_every == "1":
        assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]


def test_bad_data_is_named(tmp_path):
    data = write_frames(tmp_path / "d", scene_frames(4), ["val"] * 4)
    with pytest.raises(ValueError, match=r"manifest.csv: no frames in split\(s\) \['train'\]"):
        train_dino.train_dino(args_for(data, tmp_path / "o"))
    data2 = write_frames(tmp_path / "d2", scene_frames(4), ["train"] * 4)
    with pytest.raises(ValueError, match="4 training frames cannot fill one step"):
        train_dino.train_dino(args_for(data2, tmp_path / "o2"))


# --------------------------------------------------------------------------------------------
# The encoder V: LayerScale, weights, export / load, encode_frames, FLOPs
# --------------------------------------------------------------------------------------------


def cls_spread(V, frames: np.ndarray) -> float:
    """Mean distance of each [CLS] from the mean [CLS], relative to the mean's norm."""
    f = utils.encode_frames(V, frames, batch_size=8)
    return ((f - f.mean(0)).norm(dim=1).mean() / f.mean(0).norm()).item()


def test_default_layerscale_gives_frames_distinct_cls():
    """With timm's LayerScale 1e-5 a random ViT-S/14 gives nearly one [CLS] for all
    frames; the default start (utils.LAYERSCALE_INIT) spreads them."""
    frames = scene_frames(8)
    torch.manual_seed(0)
    V = utils.build_vit()
    gammas = [p for n, p in V.named_parameters() if n.endswith(".gamma")]
    assert gammas and all(torch.all(g == utils.LAYERSCALE_INIT) for g in gammas)
    default = cls_spread(V, frames)
    torch.manual_seed(0)
    timm_start = cls_spread(utils.build_vit(layerscale_init=None), frames)
    assert timm_start < 1e-3 < 1e-2 < default


def test_pretrained_goes_through_timm_and_keeps_its_layerscale(tmp_path):
    """--pretrained is timm's own loader (the hub online; a local file stands in for it here via
    timm's pretrained_cfg_overlay) and the loaded weights, LayerScale included, stay as loaded."""
    import timm

    small = {"depth": 2, "embed_dim": 64, "num_heads": 1, "img_size": 56}
    hub = timm.create_model(utils.DEFAULT_ARCH, num_classes=0, **small)
    with torch.no_grad():
        for p in hub.parameters():
            p.normal_()
    torch.save(hub.state_dict(), tmp_path / "hub.pth")
    overlay = {"file": str(tmp_path / "hub.pth")}
    V = utils.build_vit(pretrained=True, pretrained_cfg_overlay=overlay, **small)
    got = V.state_dict()
    assert all(torch.equal(got[k], v) for k, v in hub.state_dict().items())
    gammas = [p for n, p in V.named_parameters() if n.endswith(".gamma")]
    assert gammas and not any(torch.all(g == utils.LAYERSCALE_INIT) for g in gammas)


def test_pretrained_and_init_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        train_dino.parse_args(["--data", "d", "--out", "o", "--pretrained", "--init", "w.pth"])
    assert "--init: not allowed with argument --pretrained" in capsys.readouterr().err


def test_export_load_encode_and_init(tiny_data, tmp_path):
    state = train_dino.train_dino(args_for(tiny_data, tmp_path, "--steps", "2"))
    V, cfg = utils.load_encoder(tmp_path, "cpu")
    assert not V.training and cfg["embed_dim"] == 64 and cfg["img_size"] == 56
    assert cfg["overrides"] == {"depth": 2, "embed_dim": 64, "num_heads": 1}
    assert cfg["start"] == "random" and cfg["steps"] == 2 and cfg["layerscale_init"] == 0.1
    teacher = {k.removeprefix("backbone."): v for k, v in state["teacher"].items()}
    assert all(torch.equal(teacher[k], v) for k, v in V.state_dict().items())
    frames = np.load(tiny_data / "frames.npy", mmap_mode="r")
    emb = utils.encode_frames(V, frames, batch_size=16)  # 40 frames in 3 batches
    assert emb.shape == (40, 64) and emb.dtype == torch.float32
    with torch.no_grad():
        direct = V(utils.normalize_frames(torch.from_numpy(np.array(frames[:5]))))
    assert torch.allclose(emb[:5], direct, atol=1e-5)

    # --init: the exported file, and a DINO-style checkpoint (teacher/backbone./head. keys)
    def from_file(path, img_size=56):
        W = utils.build_vit(img_size=img_size, layerscale_init=None, **cfg["overrides"])
        train_dino.load_vit_weights(W, path)
        return W

    for W in (from_file(tmp_path / "encoder.safetensors"), from_file(tmp_path / "checkpoint.pt")):
        assert all(torch.equal(teacher[k], v) for k, v in W.state_dict().items())
    # position embeddings are resampled when the file was made at another size
    assert from_file(tmp_path / "encoder.safetensors", 112).pos_embed.shape[1] == 1 + 8 * 8
    bad = tmp_path / "bad.pt"
    torch.save({"something": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="bad.pt: weights do not fit"):
        from_file(bad)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        from_file(tmp_path / "nothing.safetensors")
    # train_dino --init: V starts from the file (its LayerScale included), then trains on
    init = args_for(tiny_data, tmp_path / "i", "--init", str(tmp_path / "encoder.safetensors"))
    student, _ = train_dino.build_networks(init)
    assert all(torch.equal(teacher[k], v) for k, v in student.backbone.state_dict().items())


def test_normalize_frames():
    x = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    y = utils.normalize_frames(x)
    assert y.shape == (2, 3, 5, 7)
    want = (x[0, 1, 2, 0] / 255 - utils.IMAGENET_MEAN[0]) / utils.IMAGENET_STD[0]
    assert y[0, 0, 1, 2].item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.allclose(utils.normalize_frames(x.permute(0, 3, 1, 2).float() / 255), y)


def test_vit_flops_matches_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    V = utils.build_vit(depth=2, embed_dim=64, num_heads=2, img_size=56).eval()
    for h, w in ((56, 56), (28, 42)):
        # the math attention kernel is made of matmuls the counter sees
        with (
            FlopCounterMode(display=False) as counter,
            torch.no_grad(),
            sdpa_kernel(SDPBackend.MATH),
        ):
            V(torch.randn(1, 3, h, w))
        assert train_dino.vit_flops(V, h, w) == pytest.approx(counter.get_total_flops(), rel=0.02)


# --------------------------------------------------------------------------------------------
# Two processes (torchrun, gloo): replicas stay identical, the centre is all-reduced
# --------------------------------------------------------------------------------------------

WORKER = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {repo!r})
import train_dino

args = train_dino.parse_args(sys.argv[1:])
state = train_dino.train_dino(args)
rank = dist.get_rank()
# update_center with a different batch on each rank must give the mean over both ranks
probe = train_dino.update_center(torch.zeros(1, 3), torch.full((4, 3), float(rank)), 0.5)
keep = {{k: state[k] for k in ("student", "teacher", "center", "step")}}
torch.save({{**keep, "probe": probe}}, f"{{args.out}}/rank{{rank}}.pt")
"""


def test_frame_batches_split_the_global_batch(tiny_data):
    """--batch-size is the global batch: rank r of N reads its rows of each step's frames, and
    together the N ranks read what one process does, step by step."""
    one = train_dino.FrameBatches(tiny_data, ["train"], 8, 0, 1, seed=0)
    two = [train_dino.FrameBatches(tiny_data, ["train"], 8, r, 2, seed=0) for r in (0, 1)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == 4 and two[0].batch == 4
    for step in range(10):  # across epochs
        assert np.array_equal(np.sort(np.concatenate([b(step) for b in two])), one(step))
    with pytest.raises(SystemExit, match="--batch-size 8 is the global batch.*multiple of the 3"):
        train_dino.FrameBatches(tiny_data, ["train"], 8, 0, 3, seed=0)


def test_two_process_torchrun_gloo(tiny_data, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(repo=str(REPO)))
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(worker), *TINY, "--data", str(tiny_data), "--out", str(out), "--steps", "3",
        "--batch-size", "8", "--lr", "0.05",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for net in ("student", "teacher"):
        assert all(torch.equal(r0[net][k], r1[net][k]) for k in r0[net]), net
    start = train_dino.build_networks(args_for(tiny_data, out))[0].state_dict()
    assert any(not torch.equal(start[k], r0["student"][k]) for k in start)  # it did train
    assert torch.equal(r0["center"], r1["center"]) and r0["center"].abs().sum() > 0
    assert torch.allclose(r0["probe"], torch.full((1, 3), 0.25))  # 0.5 * mean(0, 1)
    assert torch.allclose(r1["probe"], torch.full((1, 3), 0.25))
    assert (out / "encoder.safetensors").exists()
    assert r0["step"] == r1["step"] == 3
    # rank 0 alone logs; the LR is scaled by the global batch (--batch-size 8: 4 frames x 2 ranks)
    lines = metrics(out)
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert lines[0]["lr"] == pytest.approx(0.05 * 8 / 256)
    assert "global batch 8 = 2 x 4" in done.stdout
    assert lines[0]["images_per_s"] == pytest.approx(2 * lines[0]["images_per_s_per_device"])


# --------------------------------------------------------------------------------------------
# The exported encoder reads the demo's scenes (a linear probe of [CLS])
# --------------------------------------------------------------------------------------------


def scene_of_frames(data: Path) -> tuple[list[dict], list[dict]]:
    """Manifest rows and, for each, its scene row of scenes.csv (start <= t_sec < end)."""
    rows = utils.read_manifest(data)
    with open(data / "scenes.csv", newline="") as f:
        scenes = list(csv.DictReader(f))
    by_clip: dict[str, list[dict]] = {}
    for s in scenes:
        by_clip.setdefault(s["clip_id"], []).append(s)
    labels = []
    for r in rows:
        hit = [
            s for s in by_clip[r["clip_id"]] if float(s["start"]) <= r["t_sec"] < float(s["end"])
        ]
        assert len(hit) == 1, r
        labels.append(hit[0])
    return rows, labels


def linear_probe(train_z: torch.Tensor, train_y: np.ndarray, test_z: torch.Tensor) -> np.ndarray:
    """Fit a softmax regression (L-BFGS, small L2) on train_z; predict the labels of test_z."""
    classes, yi = np.unique(train_y, return_inverse=True)
    w = torch.zeros(train_z.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")
    target = torch.from_numpy(yi)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(train_z @ w + b, target) + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return classes[(test_z @ w + b).argmax(1).numpy()]


def probe_accuracy(feats: torch.Tensor, y: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """Cross-validated accuracy of a linear probe over held-out groups, and that of the majority
    class of the training folds (chance)."""
    hits = chance = 0
    for g in np.unique(groups):
        test = groups == g
        z = (feats - feats[~test].mean(0)) / (feats[~test].std(0) + 1e-6)
        pred = linear_probe(z[torch.from_numpy(~test)], y[~test], z[torch.from_numpy(test)])
        hits += (pred == y[test]).sum()
        values, counts = np.unique(y[~test], return_counts=True)
        chance += (values[counts.argmax()] == y[test]).sum()
    return hits / len(y), chance / len(y)


def test_exported_encoder_reads_the_demo_scenes(demo_data, tmp_path):
    """After (a short run of) the recommended CPU training, a linear probe on the exported
    encoder's [CLS] recovers who is in the frame, who acts and what they do, on scenes it never
    saw (5 folds of whole scenes), clearly above chance."""
    train_dino.train_dino(
        train_dino.parse_args(
            [*CPU_DEMO, "--data", str(demo_data), "--out", str(tmp_path), "--steps", "3"]
        )
    )
    V, _ = utils.load_encoder(tmp_path)
    rows, scenes = scene_of_frames(demo_data)
    frames = utils.open_frames(demo_data)
    feats = utils.encode_frames(V, frames[[r["frame_idx"] for r in rows]], batch_size=32)
    spread = ((feats - feats.mean(0)).norm(dim=1).mean() / feats.mean(0).norm()).item()
    assert spread > 1e-2  # distinct [CLS] per frame
    scene_id = np.array([f"{s['clip_id']}@{s['start']}" for s in scenes])  # not id(): stable folds
    folds = np.unique(scene_id, return_inverse=True)[1] % 5
    for key in ("people", "actor", "action"):
        y = np.array([s[key] for s in scenes])
        acc, chance = probe_accuracy(feats, y, folds)
        floor = max(chance, 1 / len(set(y)))
        print(f"probe {key}: {acc:.2f} (chance {floor:.2f})")
        assert acc >= 2 * floor and acc > floor + 0.1, (key, acc, floor)


def test_tiny_vit_learns_on_demo_frames(demo_data, tmp_path):
    """A tiny ViT with the BatchNorm head, no colour operations and a sharp teacher, over a short
    run (schedules scaled to it): its DINO loss on the demo's frames falls well below ln K, the
    uniform fixed point, and its teacher's targets tell frames apart."""
    flags = ["--device", "cpu", "--depth", "2", "--embed-dim", "64", "--out-dim", "256",
             "--head-hidden", "128", "--bottleneck", "32", "--global-size", "56",
             "--local-size", "28", "--local-crops", "2", "--batch-size", "16", "--steps", "30",
             "--log-every", "10", "--lr", "0.05", "--bn-head", "--jitter-p", "0", "--grey-p", "0",
             "--solarize-p", "0", "--blur-p", "0", "0", "0", "--teacher-temp", "0.02",
             "--warmup-teacher-temp", "0.02", "--data", str(demo_data), "--out", str(tmp_path)]  # fmt: skip
    train_dino.train_dino(train_dino.parse_args(flags))
    lines = metrics(tmp_path)
    assert min(r["loss"] for r in lines) < 0.7 * math.log(256), lines
    assert max(r["teacher_mi"] for r in lines) > 0.5
