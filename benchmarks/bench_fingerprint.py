"""Speed of the model fingerprint (models.fingerprint: SHA-256 over the whole state dict), and of
the rounded fingerprints measure and localize compute when a reference model is given
(models.fingerprints(rounded=True): bfloat16 and float16 roundings in the same pass).

It prints, for a stack of square Linear layers of each dtype, the seconds per call (best of
--repeat) and the throughput in MB of float32 values per second. Nothing is asserted: speed
depends on the machine (the SHA instructions, the other load); the numbers are what the
README's "Speed and memory" cites.

usage: python benchmarks/bench_fingerprint.py [--size 2048] [--layers 8] [--repeat 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from neumuter_cli.models import fingerprint, fingerprints  # noqa: E402


def best_of(repeat: int, call) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="width of each square Linear layer")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    print(f"{'dtype':>9} | {'what':>22} | {'MB (float32)':>12} | {'seconds':>8} | {'MB/s':>7}")
    for dtype in (torch.float32, torch.bfloat16):
        model = torch.nn.Sequential(*[torch.nn.Linear(args.size, args.size, bias=False) for _ in range(args.layers)])
        model.to(dtype)
        megabytes = sum(p.numel() for p in model.parameters()) * 4 / 1e6
        for what, call in (("fingerprint", lambda: fingerprint(model)),
                           ("fingerprints(rounded)", lambda: fingerprints(model, rounded=True))):
            seconds = best_of(args.repeat, call)
            row = {"dtype": str(dtype).replace("torch.", ""), "what": what, "megabytes": round(megabytes, 1),
                   "seconds": round(seconds, 4), "mb_per_s": round(megabytes / seconds, 1)}
            rows.append(row)
            print(f"{row['dtype']:>9} | {what:>22} | {row['megabytes']:12.1f} | {row['seconds']:8.4f} | "
                  f"{row['mb_per_s']:7.1f}")
    return rows


if __name__ == "__main__":
    main()
