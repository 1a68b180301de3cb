"""The trade-off curve of one trained mask: keep only the k most-closed gates (lowest log_alpha,
the order `localize --prune` bisects over), reopen the rest, and measure at each k the forget
level, the neurons, the retained MA and the held-out perplexity.

For each k in --ks the scales are the kept gates' deterministic values (as `select` writes
them), applied as gates on the FFN down-projections (the same numbers as folding them in).

The figure (forget and retained MA, and the perplexity change, by neurons kept, with the
targets as dotted lines) goes beside the JSON as tradeoff.png (--plot FILE.png elsewhere,
--no-plot none; needs matplotlib). --from-json JSON --plot FILE.png redraws it from an earlier
run's JSON without loading a model.

usage (the SmolLM2 fixture, docs/results.md says how to build it):
  python benchmarks/tradeoff.py MASK --model MEM --reference-model REF --fixtures FIXTURES \\
      --ks 115,230,460,920,1840,3680 --description "SmolLM2 fixture, 32 forget texts" --out tradeoff.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from scipy.stats import ks_2samp
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from neumuter_cli.artifacts import MASK_KIND, read_artifact  # noqa: E402
from neumuter_cli.config import TOLERANCE  # noqa: E402
from neumuter_cli.gates import deterministic_gate  # noqa: E402
from neumuter_cli.localize import keep_most_closed  # noqa: E402
from neumuter_cli.measure import memorization_accuracy, perplexity, teacher_forced  # noqa: E402
from neumuter_cli.models import find_ffn_layers, load_model, scaled  # noqa: E402
from neumuter_cli.plots import benchmark_figure, check_figure_path, figure_path, plot_tradeoff  # noqa: E402
from neumuter_cli.records import read_records  # noqa: E402
from neumuter_cli.select import mask_log_alpha  # noqa: E402
from neumuter_cli.text import encode  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def kept_gates(log_alpha: dict[int, torch.Tensor], k: int) -> dict[int, torch.Tensor]:
    """Deterministic gate values with only the k most-closed moved gates kept (as --prune keeps them)."""
    return {b: deterministic_gate(v) for b, v in keep_most_closed(log_alpha, k).items()}


def title(data: dict) -> str:
    """The figure's title: the model and data set (``description``) and what the curve is."""
    what = data.get("description") or data.get("model", "the model")
    return f"{what}\nthe mask of {data['moved']:,} neurons cut to its k most-closed gates"


def redraw(json_path: str, plot: str | None) -> None:
    if not plot:
        raise SystemExit("tradeoff.py: --from-json needs --plot FILE.png")
    with open(json_path, encoding="utf-8") as handle:
        data = json.load(handle)
    benchmark_figure(plot_tradeoff, data, plot, title(data), "tradeoff.py")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mask", nargs="?")
    ap.add_argument("--model")
    ap.add_argument("--reference-model")
    ap.add_argument("--description", help="the model and data set, for the figure's title (default: the model's "
                                          "folder name)")
    ap.add_argument("--target-neurons", type=int, default=460, help="the most neurons wanted (drawn; default 460, "
                                                                    "1 %% of SmolLM2-135M's)")
    ap.add_argument("--target-retained-ma", type=float, default=0.85, help="drawn; default 0.85")
    ap.add_argument("--target-perplexity", type=float, default=3.0, help="the largest perplexity change wanted, "
                                                                         "in %% (drawn; default 3)")
    ap.add_argument("--from-json", metavar="JSON", help="measure nothing: redraw --plot from this JSON")
    ap.add_argument("--fixtures", default=os.path.join(HERE, "..", "..", "shared", "fixtures"))
    ap.add_argument("--ks", default="115,230,460,920,1840,3680")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE)
    ap.add_argument("--retain-limit", type=int, default=128)
    ap.add_argument("--heldout-limit", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, metavar="FILE.png", help="the figure (default: --out with .png)")
    ap.add_argument("--no-plot", action="store_true", help="no figure")
    a = ap.parse_args(argv)
    plot = figure_path(a.out, a.plot, a.no_plot)
    check_figure_path(plot)
    if a.from_json:
        return redraw(a.from_json, plot)
    if not (a.mask and a.model and a.reference_model):
        ap.error("give MASK, --model and --reference-model (or --from-json)")
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    texts = lambda name: [r["text"] for r in read_records(os.path.join(a.fixtures, name))]  # noqa: E731

    artifact = read_artifact(a.mask, MASK_KIND)
    log_alpha = mask_log_alpha(artifact.tensors, artifact.metadata, a.mask)
    moved = sum(int((deterministic_gate(v) < 1).sum()) for v in log_alpha.values())

    ref, tok = load_model(a.reference_model, device="cpu")
    forget = encode(tok, texts("forget.jsonl"), 200)
    ref_tf = teacher_forced(ref, forget)
    ref_ma = [tf.ma(x) for tf, x in zip(ref_tf, forget)]
    ref_loss = [tf.loss for tf in ref_tf]
    del ref
    model, tok = load_model(a.model, device="cpu")
    layers = find_ffn_layers(model)
    retain = encode(tok, texts("retain.jsonl")[: a.retain_limit], 200)
    heldout = texts("heldout.jsonl")[: a.heldout_limit]

    def measure(gates: dict[int, torch.Tensor] | None) -> dict:
        with scaled(model, gates or {}, layers):
            tfs = teacher_forced(model, forget)
            ma = [tf.ma(x) for tf, x in zip(tfs, forget)]
            return {
                "forget_ma": sum(ma) / len(ma),
                "at_reference": sum(m <= r + a.tolerance for m, r in zip(ma, ref_ma)),
                "ks_p": float(ks_2samp([tf.loss for tf in tfs], ref_loss).pvalue),
                "retained_ma": sum(memorization_accuracy(model, retain)) / len(retain),
                "perplexity": perplexity(model, tok, heldout, window=256)["perplexity"],
            }

    rows = []
    started = time.perf_counter()
    before = measure(None)
    rows.append({"k": 0, **before})
    say(f"before: {before}")
    for k in [int(x) for x in a.ks.split(",")] + [moved]:
        if k > moved:
            continue
        gates = kept_gates(log_alpha, k)
        rows.append({"k": k, **measure(gates)})
        say(f"k {k}: {rows[-1]} ({time.perf_counter() - started:.0f}s)")
    table = [[r["k"], f"{r['forget_ma']:.3f}", f"{r['at_reference']}/{len(forget)}", f"{r['ks_p']:.3g}",
              f"{r['retained_ma']:.3f}", f"{r['perplexity']:.2f} ({100 * (r['perplexity'] / before['perplexity'] - 1):+.1f} %)"]
             for r in rows]
    print(f"reference model: forget MA {sum(ref_ma) / len(ref_ma):.3f}; mask: {moved} gates moved")
    print(tabulate(table, headers=["neurons kept", "forget MA", "at ref + tol", "KS p", "retained MA", "perplexity"]))
    data = {"mask": os.path.basename(a.mask), "moved": moved, "reference_ma": ref_ma, "rows": rows,
            "description": a.description or f"{os.path.basename(os.path.normpath(a.model))}, {len(forget)} forget texts",
            "total_neurons": sum(layer.neurons for layer in layers),
            "targets": {"neurons": a.target_neurons, "retained_ma": a.target_retained_ma,
                        "perplexity_change": a.target_perplexity}}
    if a.out:
        with open(a.out, "w") as handle:
            json.dump(data, handle, indent=2)
    benchmark_figure(plot_tradeoff, data, plot, title(data), "tradeoff.py")


if __name__ == "__main__":
    main()
