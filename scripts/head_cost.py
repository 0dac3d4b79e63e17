"""What large CPU tensors cost beyond their FLOPs under each allocator setting: the LM head and its cross-entropy.

    python scripts/head_cost.py [--rows 2504] [--width 128] [--vocab 32768]

At the proportional preset's shape (8 sequences of 314 tokens, 313 predicting rows each, a 128-wide language model,
a 32,768-token vocabulary) it times, fastest of 7, the forward and backward of the LM head's matmul alone, of the
head followed by the cross-entropy, and of the cross-entropy alone on fixed logits. Run it with and without the
Makefile's ``GLIBC_TUNABLES``: with glibc's default every tensor above its mmap threshold (at most 32 MiB) is a
fresh mmap, page-faulted on first touch and unmapped on free, so each call pays for its pages again; with the heap
keeping them, the same calls run about twice as fast.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vitask_pl.bench import allocator


def fastest(fn, repeats: int = 7) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8 * 313)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32768)
    args = parser.parse_args()
    torch.manual_seed(0)
    hidden = torch.randn(args.rows, args.width, requires_grad=True)
    head = torch.randn(args.vocab, args.width) * 0.02  # frozen, as under LoRA: activation gradients only
    labels = torch.randint(0, args.vocab, (args.rows,))
    fixed = (hidden @ head.T).detach()

    def matmul():
        logits = hidden @ head.T
        logits.backward(torch.ones_like(logits))
        hidden.grad = None

    def matmul_and_ce():
        F.cross_entropy(hidden @ head.T, labels).backward()
        hidden.grad = None

    def ce_alone():
        F.cross_entropy(fixed.requires_grad_(), labels).backward()
        fixed.grad = None

    print(allocator())
    gflop = 4 * args.rows * args.width * args.vocab / 1e9
    print(
        f"{args.rows} rows x {args.width} wide x {args.vocab:,} vocabulary; head forward + backward {gflop:.1f} GFLOP"
    )
    for name, fn in (
        ("head matmul", matmul),
        ("head + cross-entropy", matmul_and_ce),
        ("cross-entropy alone", ce_alone),
    ):
        print(f"  {name:<24}{fastest(fn) * 1e3:>8.1f} ms")


if __name__ == "__main__":
    main()
