"""Speed on a CPU of the NLL through L's frozen head (utils.FrozenHeadCrossEntropy, forward and
the gradient w.r.t. h) in its two ways, on L's head shape with random weights:

  attention  utils.vocab_attention: softmax(h Wᵀ) W and logsumexp in one fused kernel (the way
             training takes on a CPU when the head has no soft-capping: the embedded Gemma 3)
  chunked    logits for chunks of rows, softmax, two matmuls per chunk: the way GPUs, Gemma 2's
             soft-capped head and the NLL without a gradient take (FrozenHeadCrossEntropy's loop)

The NLL of each way is compared with a float64 cross-entropy (largest absolute error).

  python bench/bench_head.py            # float32, Gemma 3 270M's head, 64, 230, 1024 rows
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("bench_head.py", description=__doc__)
    p.add_argument("--vocab", type=int, default=262144, help="rows of the head (Gemma 3: 262144)")
    p.add_argument("--width", type=int, default=640, help="L's hidden size (Gemma 3 270M: 640)")
    p.add_argument("--rows", default="64,230,1024", help="scored positions per call")
    p.add_argument("--dtype", default="float32", help="of h and the head")
    p.add_argument("--repeats", type=int, default=3, help="timed calls (mean reported)")
    return p


def nll_and_grad(h, W, y, way):
    """The NLL of each row and its gradient w.r.t. h, the `way` named; chunks of rows as
    common.token_nll sizes them (at most 2^28 logits)."""
    chunk = max(1, 2**28 // W.shape[0])
    if way == "attention":  # what FrozenHeadCrossEntropy does on a CPU without a soft cap
        nll = utils.FrozenHeadCrossEntropy.apply(h, W, None, y, None, chunk, False)
        return nll, torch.autograd.grad(nll.sum(), h)[0]
    nll, grad = torch.empty(len(h)), torch.empty_like(h)
    for s in range(0, len(h), chunk):
        logits = torch.nn.functional.linear(h[s : s + chunk].detach(), W)
        nll[s : s + chunk], dlogits = utils._softmax_xent(logits, y[s : s + chunk], None, True)
        grad[s : s + chunk] = dlogits @ W
    return nll, grad


def timed(repeats: int, *args) -> float:
    """Mean seconds of nll_and_grad(*args) over `repeats` calls, after one untimed."""
    nll_and_grad(*args)
    t0 = time.perf_counter()
    for _ in range(repeats):
        nll_and_grad(*args)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    args = get_args_parser().parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    W = (torch.randn(args.vocab, args.width) * 0.03).to(dtype)
    print(f"{torch.__version__}, {torch.get_num_threads()} CPU threads, {args.dtype}, "
          f"head {args.vocab} x {args.width}\n")  # fmt: skip
    print(
        "| rows | attention s | chunked s | attention / chunked | NLL error (attention, chunked) |"
    )
    print("|---:|---:|---:|---:|---|")
    for n in map(int, args.rows.split(",")):
        h = torch.randn(n, args.width).to(dtype).requires_grad_(True)
        y = torch.randint(0, args.vocab, (n,))
        ref = torch.nn.functional.cross_entropy(h.double() @ W.double().T, y, reduction="none")
        ways = ("attention", "chunked")
        err = [(nll_and_grad(h, W, y, w)[0].double() - ref).abs().max().item() for w in ways]
        t_a, t_c = (timed(args.repeats, h, W, y, w) for w in ways)
        print(f"| {n} | {t_a:.3f} | {t_c:.3f} | {t_a / t_c:.2f} | {err[0]:.1e}, {err[1]:.1e} |")


if __name__ == "__main__":
    main()
