"""Rollback on a fine-tuned model: the trade-off curve of a `localize --base` mask beside the
control with no training ("revert the k neurons the fine-tune changed most"), and the base
model itself (a full rollback), all measured the same way.

At each k, the k neurons are moved to their base weights (the mask's: its k most-closed gates
at their gate values, as `localize --prune` keeps them; the control's: the k largest relative
changes ‖Δw‖ / ‖w_base‖, reverted fully), by hooks (the numbers `apply --base` writes). Each
row: forget MA, forget texts at the base model's MA + tolerance and at the reference model's,
KS p of the forget losses against each, retained MA, held-out perplexity.

usage (the SmolLM2 fixture, built by its build.py into mem/, ref/ and base/):
  python benchmarks/rollback.py MASK --model mem --base base --reference-model ref \\
      --fixtures FIXTURES --ks 1536,3072,6144,9216 --out docs/figures/rollback.json
MASK may be - for the control alone. The figure goes beside the JSON (needs matplotlib).
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
from neumuter_cli.models import load_model  # noqa: E402
from neumuter_cli.records import read_records  # noqa: E402
from neumuter_cli.rollback import check_ancestor, neuron_changes, rolled_back  # noqa: E402
from neumuter_cli.select import mask_log_alpha  # noqa: E402
from neumuter_cli.text import encode  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def top_changed(changes, k: int) -> dict[int, torch.Tensor]:
    """Scales that revert the k changed neurons with the largest relative change (ties: block,
    neuron; all of them when fewer changed)."""
    blocks = sorted(changes)
    sizes = torch.cat([torch.where(changes[b].changed, changes[b].size, torch.zeros_like(changes[b].size))
                       for b in blocks])
    eligible = torch.cat([changes[b].changed for b in blocks])
    chosen = torch.sort(-sizes, stable=True).indices[:min(k, int(eligible.sum()))]
    flat = torch.ones_like(sizes)
    flat[chosen] = 0.0
    out, start = {}, 0
    for b in blocks:
        out[b] = flat[start:start + changes[b].size.numel()]
        start += changes[b].size.numel()
    return out


def split_means(values: list[float], first: int | None) -> dict:
    """The mean of the first ``first`` values and of the rest (nothing without ``first``)."""
    if not first:
        return {}
    head, rest = values[:first], values[first:]
    return {"retained_first": sum(head) / len(head), "retained_rest": sum(rest) / len(rest)}


def mask_top(log_alpha: dict[int, torch.Tensor], k: int) -> dict[int, torch.Tensor]:
    return {b: deterministic_gate(v) for b, v in keep_most_closed(log_alpha, k).items()}


def yardstick(path: str, forget) -> tuple[list[float], list[float]]:
    model, _ = load_model(path, device="cpu")
    measured = teacher_forced(model, forget)
    return [tf.ma(x) for tf, x in zip(measured, forget)], [tf.loss for tf in measured]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mask", help="a `localize --base` mask, or - for the control alone")
    ap.add_argument("--model", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--reference-model", required=True)
    ap.add_argument("--fixtures", default=os.path.join(HERE, "..", "..", "shared", "fixtures"))
    ap.add_argument("--forget", default="forget.jsonl", help="in --fixtures unless a path")
    ap.add_argument("--retain", default="retain.jsonl", help="in --fixtures unless a path")
    ap.add_argument("--split", type=int, default=None, metavar="N",
                    help="also report retained MA on the first N retained texts and on the rest apart "
                         "(e.g. the texts a bound's KL guarded and the ones it did not)")
    ap.add_argument("--no-control", action="store_true", help="skip the 'top k by change' rows")
    ap.add_argument("--ks", default="1536,3072,6144,9216")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE)
    ap.add_argument("--heldout-limit", type=int, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="SmolLM2-135M fine-tuned until it memorised 160 benchmark texts",
                    help="what the figure names the model")
    ap.add_argument("--plot", default=None, metavar="FILE.png", help="the figure (default: --out with .png)")
    ap.add_argument("--from-json", action="store_true", help="redraw the figure of --out's JSON, measure nothing")
    a = ap.parse_args(argv)
    plot = a.plot or os.path.splitext(a.out)[0] + ".png"
    if a.from_json:
        with open(a.out) as handle:
            draw(json.load(handle), plot, a.title)
        return
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    texts = lambda name: [r["text"] for r in read_records(os.path.join(a.fixtures, name))]  # noqa: E731

    model, tok = load_model(a.model, device="cpu")
    forget = encode(tok, texts(a.forget), 200)
    retain = encode(tok, texts(a.retain), 200)
    if a.split is not None and not 0 < a.split < len(retain):
        ap.error(f"--split {a.split}: must be between 1 and {len(retain) - 1} (the retained texts less one)")
    heldout = texts("heldout.jsonl")[: a.heldout_limit]
    base_ma, base_loss = yardstick(a.base, forget)
    ref_ma, ref_loss = yardstick(a.reference_model, forget)
    base, _ = load_model(a.base, device="cpu")
    distance = check_ancestor(model, base)
    changes = {b: c for b, c in neuron_changes(model, base).items() if c.changed.any()}
    changed = sum(int(c.changed.sum()) for c in changes.values())
    del base
    log_alpha = None
    if a.mask != "-":
        artifact = read_artifact(a.mask, MASK_KIND)
        log_alpha = mask_log_alpha(artifact.tensors, artifact.metadata, a.mask)

    def measure(scales: dict[int, torch.Tensor]) -> dict:
        with rolled_back(model, changes, scales):
            tfs = teacher_forced(model, forget)
            ma = [tf.ma(x) for tf, x in zip(tfs, forget)]
            losses = [tf.loss for tf in tfs]
            return {
                "forget_ma": sum(ma) / len(ma), "forget": ma,
                "at_base": sum(m <= r + a.tolerance for m, r in zip(ma, base_ma)),
                "over_base": sum(m < r - a.tolerance for m, r in zip(ma, base_ma)),
                "at_reference": sum(m <= r + a.tolerance for m, r in zip(ma, ref_ma)),
                "ks_p_base": float(ks_2samp(losses, base_loss).pvalue),
                "ks_p_reference": float(ks_2samp(losses, ref_loss).pvalue),
                "retained": (retained := memorization_accuracy(model, retain)),
                "retained_ma": sum(retained) / len(retained),
                **split_means(retained, a.split),
                "perplexity": perplexity(model, tok, heldout, window=256)["perplexity"],
            }

    started = time.perf_counter()
    rows = []

    def row(kind: str, k: int, scales):
        rows.append({"kind": kind, "k": k, **measure(scales)})
        r = rows[-1]
        say(f"{kind} k {k}: forget {r['forget_ma']:.3f} ({r['at_base']}/{len(forget)} at base), retained "
            f"{r['retained_ma']:.3f}, perplexity {r['perplexity']:.2f} ({time.perf_counter() - started:.0f}s)")

    row("model", 0, {})
    row("base model", changed, {b: torch.zeros_like(c.size) for b, c in changes.items()})
    ks = [int(x) for x in a.ks.split(",")]
    if log_alpha is not None:
        moved = sum(int((deterministic_gate(v) < 1).sum()) for v in log_alpha.values())
        for k in sorted({*[k for k in ks if k < moved], moved}):
            row("--base mask", k, mask_top(log_alpha, k))
    for k in [] if a.no_control else ks:
        row("top k by change", k, top_changed(changes, k))
    n = len(forget)
    table = [[r["kind"], r["k"], f"{r['forget_ma']:.3f}", f"{r['at_base']}/{n} ({r['over_base']} over)",
              f"{r['ks_p_base']:.3g}", f"{r['at_reference']}/{n}", f"{r['ks_p_reference']:.3g}",
              f"{r['retained_ma']:.3f}", *([f"{r['retained_first']:.3f}", f"{r['retained_rest']:.3f}"] if a.split else []),
              f"{r['perplexity']:.2f}"] for r in rows]
    split = [f"retained 1-{a.split}", f"retained {a.split + 1}-{len(retain)}"] if a.split else []
    print(f"base model: forget MA {sum(base_ma) / n:.3f}; reference model: {sum(ref_ma) / n:.3f}; "
          f"{changed} FFN neurons changed by the fine-tune (weights {distance:.3f} apart)")
    print(tabulate(table, headers=["rows", "neurons", "forget MA", "at base + tol", "KS p (base)", "at ref + tol",
                                   "KS p (ref)", "retained MA", *split, "perplexity"]))
    data = {"mask": a.mask and os.path.basename(a.mask), "changed": changed, "retained": len(retain), "split": a.split,
            "heldout_limit": a.heldout_limit, "base_ma": base_ma,
            "reference_ma": ref_ma, "tolerance": a.tolerance, "rows": rows}
    with open(a.out, "w") as handle:
        json.dump(data, handle, indent=2)
    draw(data, plot, a.title)


def draw(data: dict, path: str, model: str) -> None:
    """Forget and retained MA, and perplexity, by neurons rolled back, for each ranking."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no figure: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return
    rows = data["rows"]
    first = rows[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    total = 46080
    fig.suptitle(f"Rollback toward the base model: {model}, {len(data['base_ma'])} forget texts "
                 f"(retained MA: all {data.get('retained', 128)} retained texts)", fontsize=10)
    styles = {"--base mask": ("o-", "tab:green"), "top k by change": ("s--", "tab:gray")}
    for kind, (marker, color) in styles.items():
        points = [first] + [r for r in rows if r["kind"] == kind]
        if len(points) < 2:
            continue
        ks = [r["k"] for r in points]
        left.plot(ks, [r["forget_ma"] for r in points], marker, color=color, label=f"forget MA, {kind}")
        left.plot(ks, [r["retained_ma"] for r in points], marker, color=color, alpha=0.45,
                  label=f"retained MA, {kind}")
        right.plot(ks, [r["perplexity"] for r in points], marker, color=color, label=kind)
    full = next(r for r in rows if r["kind"] == "base model")
    left.plot([full["k"]], [full["forget_ma"]], "*", color="tab:blue", markersize=12, label="base model (forget)")
    left.plot([full["k"]], [full["retained_ma"]], "*", color="tab:blue", alpha=0.45, markersize=12,
              label="base model (retained)")
    right.plot([full["k"]], [full["perplexity"]], "*", color="tab:blue", markersize=12, label="base model")
    base_mean = sum(data["base_ma"]) / len(data["base_ma"])
    ref_mean = sum(data["reference_ma"]) / len(data["reference_ma"])
    left.axhline(base_mean + data["tolerance"], color="tab:blue", linestyle=":", linewidth=1,
                 label="base model's forget MA + 0.05 (target)")
    left.axhline(ref_mean, color="tab:red", linestyle=":", linewidth=1, label="reference model's forget MA")
    left.axhline(0.60, color="0.4", linestyle="-.", linewidth=1, label="retained MA target 0.60")
    right.axhline(full["perplexity"] * 1.05, color="tab:blue", linestyle=":", linewidth=1,
                  label="base model + 5 % (target)")
    ticks = []
    for k in sorted({r["k"] for r in rows}):           # no two labels closer than 6 % of the axis
        if not ticks or k - ticks[-1] >= 0.06 * max(r["k"] for r in rows):
            ticks.append(k)
    for ax in (left, right):
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{k:,}\n{100 * k / total:.1f} %" for k in ticks], fontsize=7)
        ax.set_xlabel("FFN neurons rolled back (and share of the 46,080)")
        ax.grid(alpha=0.3)
    left.set_ylabel("mean MA (share of tokens)")
    left.set_ylim(0, 1.05)
    limit = data.get("heldout_limit")
    right.set_ylabel("held-out perplexity" + (f" (the first {limit} held-out texts)" if limit else ""))
    left.legend(fontsize=7, loc="lower left")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
