"""Toy renderer throughput on one core: `python eval/bench_render.py [--sizes 64 96 128] [--n 300]`.

Renders `n` random (identity, look) pairs per size with `render_sample` and prints images/s.
"""

from __future__ import annotations

import argparse
import time

from hyperlora.toy.render import render_sample


def bench(size: int, n: int, seed: int = 0) -> float:
    """Images per second for `n` renders at `size` (after a short warm-up)."""
    for i in range(10):
        render_sample(i, 0, seed, size)
    start = time.perf_counter()
    for i in range(n):
        render_sample(i % 1000, i // 1000, seed, size)
    return n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--n", type=int, default=300, help="renders per size")
    args = parser.parse_args()
    for size in args.sizes:
        print(f"size {size:4d}: {bench(size, args.n):7.1f} images/s")


if __name__ == "__main__":
    main()
