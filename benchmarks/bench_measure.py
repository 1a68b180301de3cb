"""Speed and exactness of `measure` (MA + EL_n) against the naive per-prefix loop.

The naive yardstick is baselines/naive_metrics.py (one generate call per prefix), imported and
run in this process on the same model object with the same torch thread count. It is slow
(~T²/2 batch-1 forward calls per text), so by default it runs on the first few texts only and its
time is scaled to the whole set by forward calls (Σ T(T-1)/2; per-text scaling is printed too).
Its per-record MA and EL_n are compared with ours on those texts: EL_n exactly (==), MA after
the float32 rounding the naive script applies (it takes a float32 mean; measure reports the
exact ratio). A mismatch is diagnosed: the first prefix whose greedy continuation differs and
the top-2 logit gap there.

Two cases:
  memorised  the memorizer on its forget set (MA ≈ 0.94: few prefixes need a generation)
  perturbed  the memorizer on texts it never saw (unseen.jsonl: nearly every prefix needs one,
             as after unlearning)

usage: python benchmarks/bench_measure.py [--fixtures /work/shared/fixtures] [--threads 1]
           [--naive-limit 2] [--perturbed 8] [--perturbed-naive-limit 1] [--batch-size 64]
           [--naive-results naive.json]   (keeps the naive numbers; a later run reuses them)
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import time
import warnings
from pathlib import Path

import torch


def load_naive(path: str):
    spec = importlib.util.spec_from_file_location("naive_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def calls(ids) -> int:
    """Forward calls of the naive EL: prefix i generates T-i tokens, one call each."""
    return len(ids) * (len(ids) - 1) // 2


@torch.no_grad()
def diagnose(model, naive, ids, n):
    """The first prefix where the naive greedy continuation and ours differ, and the top-2
    logit gap of the naive computation at the first differing token."""
    from neumuter_cli.measure import suffix_generations

    ours = suffix_generations(model, [ids])[0]
    for i in range(1, len(ids)):
        theirs = naive.greedy(model, ids[:i], len(ids) - i)
        if theirs != ours[i]:
            k = next(k for k, (a, b) in enumerate(zip(theirs, ours[i])) if a != b)
            context = list(ids[:i]) + theirs[:k]
            logits = model(input_ids=torch.tensor([context])).logits[0, -1]
            top = logits.topk(2)
            return (f"prefix {i}, generated token {k}: naive {theirs[k]} vs ours {ours[i][k]}; "
                    f"top-2 logit gap {float(top.values[0] - top.values[1]):.3g}")
    return "no differing continuation found (difference in the arithmetic only)"


def naive_numbers(model, naive, ids, n, cache_path, key):
    """The naive MA, EL_n and seconds of each text, reused from ``cache_path`` when it holds
    them (the naive loop takes minutes per text)."""
    cache = {}
    if cache_path and Path(cache_path).exists():
        cache = json.loads(Path(cache_path).read_text())
    out = []
    for k, x in enumerate(ids):
        entry = f"{key}:n={n}:{k}:" + hashlib.sha1(json.dumps(list(x)).encode()).hexdigest()[:16]
        if entry not in cache:
            t0 = time.perf_counter()
            ma, el = naive.ma(model, x), naive.el(model, x, n)
            cache[entry] = {"ma": ma, "el": el, "seconds": time.perf_counter() - t0}
            if cache_path:
                Path(cache_path).write_text(json.dumps(cache, indent=1) + "\n")
        out.append(cache[entry])
    return out


def run_case(name, model, tok, naive, records, naive_limit, n, max_length, batch_size, cache_path=None):
    from neumuter_cli.measure import measure_ids
    from neumuter_cli.text import encode

    ids = encode(tok, [r["text"] for r in records], max_length)
    t0 = time.perf_counter()
    ours = measure_ids(model, ids, (n,), batch_size)
    fast = time.perf_counter() - t0
    limit = len(ids) if naive_limit <= 0 else min(naive_limit, len(ids))
    theirs = naive_numbers(model, naive, ids[:limit], n, cache_path, name)
    slow = sum(t["seconds"] for t in theirs)
    scaled = slow * sum(map(calls, ids)) / sum(map(calls, ids[:limit]))
    per_text = slow * len(ids) / limit
    el_same = [o[f"el_{n}"] == t["el"] for o, t in zip(ours, theirs)]
    ma_same = [f32(o["ma"]) == t["ma"] for o, t in zip(ours, theirs)]
    print(f"\n== {name}: {len(ids)} texts ({sum(map(len, ids))} tokens, cut to {max_length}), EL_{n}")
    print(f"fast : {fast:8.1f} s  all {len(ids)} texts (MA + EL_{n} + loss, batch {batch_size}); "
          f"mean MA {sum(o['ma'] for o in ours) / len(ours):.4f}, "
          f"mean EL_{n} {sum(o[f'el_{n}'] for o in ours) / len(ours):.4f}")
    print(f"naive: {slow:8.1f} s  on {limit} text(s) ({sum(map(calls, ids[:limit]))} forward calls)"
          + ("" if limit == len(ids) else
             f" -> {scaled:.0f} s for all {len(ids)} scaled by forward calls ({per_text:.0f} s scaled per text)"))
    print(f"speed-up: {scaled / fast:.1f}x")
    print(f"identical on the {limit} naive text(s): EL_{n} {sum(el_same)}/{limit}, "
          f"MA (float32) {sum(ma_same)}/{limit}")
    for k, (o, t, e, m) in enumerate(zip(ours, theirs, el_same, ma_same)):
        if not (e and m):
            rid = records[k].get("id", k)
            print(f"  DIFFERENT {rid}: ours MA {o['ma']!r} EL {o[f'el_{n}']!r}, naive MA {t['ma']!r} EL {t['el']!r}")
            print(f"    {diagnose(model, naive, ids[k], n)}")
    return {"case": name, "texts": len(ids), "fast_s": fast, "naive_s": slow, "naive_texts": limit,
            "naive_scaled_s": scaled, "speedup": scaled / fast, "el_identical": sum(el_same),
            "ma_identical": sum(ma_same)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default="/work/shared/fixtures")
    ap.add_argument("--naive", default=None, help="naive_metrics.py (default: ../baselines beside the fixtures)")
    ap.add_argument("--model", default=None, help="default: FIXTURES/memorizer")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both (1: immune to other jobs on a shared machine)")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--naive-limit", type=int, default=2, help="naive texts of the forget set (0: all)")
    ap.add_argument("--perturbed", type=int, default=8, help="unseen texts for the perturbed case (0: skip)")
    ap.add_argument("--perturbed-naive-limit", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    ap.add_argument("--naive-results", default=None,
                    help="JSON file to keep the naive per-text numbers and times in, reused by later runs")
    a = ap.parse_args()

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    from neumuter_cli.models import load_model

    torch.set_num_threads(a.threads)
    fixtures = Path(a.fixtures)
    naive = load_naive(a.naive or str(fixtures.parent / "baselines" / "naive_metrics.py"))
    model, tok = load_model(a.model or str(fixtures / "memorizer"), device="cpu", dtype="float32")
    print(f"torch {torch.__version__}, {a.threads} thread(s); model {a.model or fixtures / 'memorizer'}")

    def read(name):
        return [json.loads(line) for line in open(fixtures / name, encoding="utf-8") if line.strip()]

    results = [run_case("memorised: forget.jsonl", model, tok, naive, read("forget.jsonl"), a.naive_limit,
                        a.n, a.max_length, a.batch_size, a.naive_results)]
    if a.perturbed:
        results.append(run_case("perturbed: unseen.jsonl", model, tok, naive, read("unseen.jsonl")[:a.perturbed],
                                a.perturbed_naive_limit, a.n, a.max_length, a.batch_size, a.naive_results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
