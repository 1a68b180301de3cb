"""Benchmark data-parallel `localize`: one process against 2 under torchrun (gloo, CPU).

The same command line twice, one thread per process (OMP_NUM_THREADS=1 for both), on random
data and a random-weight GPT-Neo-shaped model (timing does not need trained weights): 16
forget texts of --tokens tokens with one neighbour each, one global batch of --batch-size
texts per optimiser step (2 processes: half each), --epochs epochs, no early stop. Prints the
wall time of each command (process start and model load included, as a user waits for it),
the training time `localize` reports, their ratios (target: 2 processes <= 0.8x one), and how
far apart the two masks are (they should agree to float rounding).

Take the numbers on an idle machine with at least 2 cores: busy cores make both runs wait.

usage: python benchmarks/bench_distributed.py [--work DIR] [--texts 16] [--epochs 20]
       [--tokens 128] [--hidden 256] [--layers 4] [--batch-size 16] [--processes 2] [--quick]
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import synthetic  # noqa: E402


def fixtures(a) -> tuple[str, str]:
    texts = synthetic.random_texts(2 * a.texts, a.tokens, seed=1)
    tokenizer = synthetic.byte_bpe(texts, 2048)
    config = synthetic.gpt_neo_config(hidden_size=a.hidden, num_layers=a.layers, num_heads=max(1, a.hidden // 64),
                                      intermediate_size=4 * a.hidden, vocab_size=len(tokenizer),
                                      attention_types=[[["global", "local"], max(1, a.layers // 2)]],
                                      max_position_embeddings=max(512, 2 * a.tokens))
    model = synthetic.save_model(os.path.join(a.work, f"neo-{a.hidden}x{a.layers}"), config, tokenizer)
    records = [{"id": k, "text": texts[k], "neighbors": [texts[a.texts + k]]} for k in range(a.texts)]
    return model, synthetic.write_jsonl(os.path.join(a.work, "nb.jsonl"), records)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def localize(a, model, records, processes: int) -> tuple[float, float, str]:
    out = os.path.join(a.work, f"mask-{processes}.safetensors")
    launcher = ([sys.executable, "-m", "neumuter_cli"] if processes == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                 "--master-port", str(free_port()), "-m", "neumuter_cli"])
    command = [*launcher, "localize", records, "-m", model, "--device", "cpu", "--epochs", str(a.epochs),
               "--batch-size", str(a.batch_size), "--max-length", str(a.tokens), "-o", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{proc.stderr[-3000:]}")
    found = re.findall(r"done after \d+ epochs, ([0-9.]+)s", proc.stderr)
    return wall, float(found[-1]) if found else float("nan"), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="folder for the model and outputs (default: a temporary one)")
    ap.add_argument("--texts", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 4 texts, 2 epochs, a tiny model")
    a = ap.parse_args()
    if a.quick:
        a.texts, a.epochs, a.tokens, a.hidden, a.layers, a.batch_size = 4, 2, 32, 64, 2, 4
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as scratch:
        a.work = a.work or scratch
        os.makedirs(a.work, exist_ok=True)
        model, records = fixtures(a)
        one_wall, one_train, one_mask = localize(a, model, records, 1)
        many_wall, many_train, many_mask = localize(a, model, records, a.processes)
        from safetensors.torch import load_file

        one, many = load_file(one_mask), load_file(many_mask)
        apart = max(float((one[k] - many[k]).abs().max()) for k in one)
    print(f"localize, {a.texts} texts x {a.tokens} tokens, 1 neighbour each, batch {a.batch_size}, {a.epochs} epochs, "
          f"GPT-Neo shape {a.layers} blocks x {a.hidden} wide, OMP_NUM_THREADS=1, {os.cpu_count()} cores")
    print(f"  1 process:   wall {one_wall:7.1f} s   training {one_train:7.1f} s")
    print(f"  {a.processes} processes: wall {many_wall:7.1f} s   training {many_train:7.1f} s")
    print(f"  ratio ({a.processes} / 1): wall {many_wall / one_wall:.2f}   training {many_train / one_train:.2f}   "
          f"(target: wall <= 0.80)")
    print(f"  masks: largest |log_alpha difference| {apart:.2e}")


if __name__ == "__main__":
    main()
