"""Benchmark `neumuter localize` against the naive trainer (`baselines/naive_localize.py`).

Three numbers, as issue #4 asks:
1. time to forget: `neumuter localize` with its defaults and `--reference` (early stop), then
   select + apply + measure with eq. 17's thresholds: localize wall time and forgotten count;
2. seconds per epoch at the naive trainer's own hyper-parameters (bounded ascent, 5 on KL,
   500 on L0, lr 0.1, batch 1): ours vs naive, and the ratio;
3. peak resident memory on a GPT-Neo-125M-shaped model (GPTNeoConfig() defaults, random
   weights, the fixture's tokenizer): ours vs naive, and the ratio.

usage: python benchmarks/bench_localize.py [--fixtures DIR] [--baselines DIR] [--work DIR]
       [--skip time|epoch|memory ...] [--el]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def sh(cmd, **kwargs):
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode not in (0, 1):
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc, time.perf_counter() - start


def peak_rss_mb(cmd) -> tuple[float, float]:
    """Run ``cmd`` under GNU time-like accounting: (peak RSS in MB, seconds)."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.execvp(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def time_to_forget(a):
    mask, scales, muted = (os.path.join(a.work, x) for x in ("mask.safetensors", "scales.safetensors", "muted"))
    neighbours = os.path.join(a.fixtures, "forget.neighbors.jsonl")
    model = os.path.join(a.fixtures, "memorizer")
    proc, wall = sh(["neumuter", "localize", neighbours, "-m", model, "--device", "cpu",
                     "--reference", os.path.join(a.fixtures, "unseen.jsonl"), "-o", mask])
    print(proc.stderr.strip().splitlines()[-1])
    sh(["neumuter", "select", mask, "-o", scales])
    sh(["neumuter", "apply", scales, "-m", model, "-o", muted, "--force", "--device", "cpu"])
    # EL_10 on 200 unseen texts takes about an hour on 2 cores (nearly every prefix needs its own
    # generation), so by default the forgotten count uses eq. 17's MA threshold only; --el adds
    # EL_10 (thresholds measured once and kept in the work folder)
    el = "10" if a.el else "0"
    limits = os.path.join(a.work, f"thresholds-el{el}.json")
    if not os.path.exists(limits):
        proc, _ = sh(["neumuter", "measure", os.path.join(a.fixtures, "unseen.jsonl"), "-m", model, "--device", "cpu",
                      "--el-n", el, "--format", "json"])
        with open(limits, "w") as out:
            out.write(proc.stdout)
    proc, _ = sh(["neumuter", "measure", os.path.join(a.fixtures, "forget.jsonl"), "-m", muted,
                  "--device", "cpu", "--thresholds", limits, "--el-n", el, "--format", "json"])
    summary = json.loads(proc.stdout)["summary"]
    meta = json.load(open(os.path.join(muted, "neumuter.json")))
    print(f"time to forget: localize wall {wall:.1f} s (process incl. loading), "
          f"{summary['forgotten']}/{summary['records']} forget texts below "
          f"{'both thresholds' if a.el else 'the MA threshold (EL_10 not measured: --el)'}, "
          f"{meta['neurons_scaled']} neurons scaled ({100 * meta['neurons_scaled'] / meta['total_neurons']:.2f} %)")


def per_epoch(a):
    model = os.path.join(a.fixtures, "memorizer")
    neighbours = os.path.join(a.fixtures, "forget.neighbors.jsonl")
    epochs = str(a.epochs)
    proc, _ = sh([sys.executable, os.path.join(a.baselines, "naive_localize.py"), model, neighbours,
                  "--epochs", epochs])
    naive = [float(x) for x in re.findall(r"seconds ([0-9.]+)", proc.stdout)]
    proc, _ = sh(["neumuter", "localize", neighbours, "-m", model, "--device", "cpu", "--epochs", epochs,
                  "--forget-term", "bounded", "--lambda", "5", "--eta", "500", "--lr", "0.1", "--beta", str(1 / 3),
                  "--batch-size", "1", "--kl-top-k", "0", "-o", os.path.join(a.work, "epoch.safetensors")])
    stamps = [float(x) for x in re.findall(r"\(([0-9.]+)s\)", proc.stderr)]
    ours = [b - a_ for a_, b in zip([0.0] + stamps, stamps)]
    n, o = sum(naive) / len(naive), sum(ours) / len(ours)
    print(f"per epoch (naive hyper-parameters, {epochs} epochs, batch 1): naive {n:.2f} s, ours {o:.2f} s "
          f"(first epoch includes the one-time original distributions), ratio {n / o:.2f}x")


def memory(a):
    import torch
    from transformers import AutoTokenizer, GPTNeoConfig, GPTNeoForCausalLM

    path = os.path.join(a.work, "neo125m")
    if not os.path.isdir(path):
        torch.manual_seed(0)
        GPTNeoForCausalLM(GPTNeoConfig()).save_pretrained(path)
        AutoTokenizer.from_pretrained(os.path.join(a.fixtures, "memorizer")).save_pretrained(path)
    records = os.path.join(a.work, "nb8.jsonl")
    with open(os.path.join(a.fixtures, "forget.neighbors.jsonl")) as src, open(records, "w") as dst:
        dst.writelines(list(src)[:8])
    naive_mb, naive_s = peak_rss_mb([sys.executable, os.path.join(a.baselines, "naive_localize.py"), path, records,
                                     "--epochs", "1"])
    ours_mb, ours_s = peak_rss_mb(["neumuter", "localize", records, "-m", path, "--device", "cpu", "--epochs", "1",
                                   "-o", os.path.join(a.work, "mem.safetensors")])
    print(f"peak RSS, GPT-Neo-125M shape, 8 records, 1 epoch: naive {naive_mb:.0f} MB ({naive_s:.0f} s), "
          f"ours {ours_mb:.0f} MB ({ours_s:.0f} s), ratio {ours_mb / naive_mb:.2f} (target <= 0.75)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", default=os.path.join(HERE, "..", "..", "shared", "fixtures"))
    ap.add_argument("--baselines", default=os.path.join(HERE, "..", "..", "shared", "baselines"))
    ap.add_argument("--work", default=os.path.join(HERE, "..", "bench-out"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], choices=["time", "epoch", "memory"])
    ap.add_argument("--el", action="store_true", help="time to forget: also check EL_10 (slow: about an hour)")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    if "time" not in a.skip:
        time_to_forget(a)
    if "epoch" not in a.skip:
        per_epoch(a)
    if "memory" not in a.skip:
        memory(a)


if __name__ == "__main__":
    main()
