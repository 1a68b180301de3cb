"""Does the forgetting hold? Quantisation, relearning and a second request, in one table.

For each model given (the memorizer, the reference model that never saw the forget texts, the
muted model, optionally a gradient-ascent result) it measures, in-process:

* the forget texts' MA (teacher-forced, first --max-length tokens) at full precision and after
  a round trip of every linear weight of the transformer blocks through each --quantize type
  (neumuter_cli.quantize);
* the forget texts' MA after N = --steps relearning steps on their first halves (by tokens;
  `neumuter relearn` with the same settings: Adam, --relearn-lr, --relearn-batch-size, seeded
  data order). One run of max(N) steps is measured along the way: with a constant learning
  rate and a fixed data order, the state after step N does not depend on the total. The JSON
  also holds the MA of the second halves alone (the part that was not trained on);
* the retained texts' MA and the held-out perplexity (256-token windows) at full precision.

Per-text verdicts compare each model with the reference model under the same condition: a
forget text is "at ref" when its MA is at or below the reference's MA on that text (also
quantised, or also relearnt for the same steps) + --tolerance. "robust" holds when (a) the
mean forget MA after --verdict-steps relearning steps is at most the reference's after the same
steps + --tolerance (it relearns no faster than a model that never saw the texts) and (b) after
--verdict-quant every forget text is at ref (it stays forgotten).

--second-muted DIR (the muted model after a second request: set B forgotten too) adds a
section: the first set's (--forget) MA, at-ref count and the perplexity after both requests,
beside the muted model's after the first (and, with --second-forget B.jsonl, set B's MA).

Tables go to stdout, progress to stderr, everything to --out (JSON), and the figure (forget MA
along the relearning steps, and under each quantisation) beside it as results.png
(--plot FILE.png elsewhere, --no-plot none; needs matplotlib).

usage: python benchmarks/robustness.py --memorizer MEM --reference REF --muted MUTED [--ga GA]
         --forget forget.jsonl --retain retain.jsonl --heldout heldout.jsonl
         [--steps 5,20,50] [--relearn-lr 3e-5] [--quantize q8_0,q4_0] [--tolerance 0.05]
         [--second-muted DIR [--second-forget B.jsonl]] [--out results.json]
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from neumuter_cli import NeumuterError  # noqa: E402
from neumuter_cli.measure import memorization_accuracy, perplexity, teacher_forced  # noqa: E402
from neumuter_cli.config import TOLERANCE  # noqa: E402
from neumuter_cli.models import load_model  # noqa: E402
from neumuter_cli.plots import benchmark_figure, check_figure_path, figure_path, plot_robustness  # noqa: E402
from neumuter_cli.records import atomic_output, read_records  # noqa: E402
from neumuter_cli.relearn import RelearnConfig, check_config, first_halves, relearn  # noqa: E402
from neumuter_cli.text import encode  # noqa: E402

QUANT_TYPES = ("q8_0", "q5_0", "q4_0", "q4_1")
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers like 5,20,50") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give step counts >= 1, like 5,20,50")
    return sorted(set(values))


def quant_list(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    bad = [v for v in values if v not in QUANT_TYPES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown quantisation type {bad[0]!r} (choose from {', '.join(QUANT_TYPES)})")
    return list(dict.fromkeys(values))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--memorizer", required=True, help="the model before unlearning")
    ap.add_argument("--reference", required=True, help="the model that never saw the forget texts")
    ap.add_argument("--muted", required=True, help="neumuter's result (apply's checkpoint)")
    ap.add_argument("--ga", help="a gradient-ascent result, as a comparison row")
    ap.add_argument("--forget", required=True, help="forget texts (JSONL)")
    ap.add_argument("--retain", required=True, help="retained memorised texts (JSONL)")
    ap.add_argument("--heldout", required=True, help="held-out long texts for the perplexity (JSONL)")
    ap.add_argument("--steps", type=int_list, default=[5, 20, 50], help="relearning steps to measure after")
    ap.add_argument("--relearn-lr", type=float, default=RelearnConfig.lr)
    ap.add_argument("--relearn-batch-size", type=int, default=RelearnConfig.batch_size)
    ap.add_argument("--relearn-layers", default=None, help="blocks to relearn (default: every weight)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the relearning data order")
    ap.add_argument("--quantize", type=quant_list, default=["q8_0", "q4_0"],
                    help="quantisation types, comma-separated ('' skips the quantisation columns)")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE)
    ap.add_argument("--verdict-steps", type=int, default=20, help="the relearning step count of the verdict")
    ap.add_argument("--verdict-quant", default="q4_0", help="the quantisation type of the verdict")
    ap.add_argument("--second-muted", help="the muted model after a second request (set B forgotten too)")
    ap.add_argument("--second-forget", help="set B (JSONL), to report its MA too")
    ap.add_argument("--max-length", type=int, default=200)
    ap.add_argument("--ppl-window", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32, help="texts per forward pass when measuring")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    ap.add_argument("--out", help="write every number to this JSON file")
    ap.add_argument("--plot", metavar="FILE.png", help="the figure (default: --out with .png)")
    ap.add_argument("--no-plot", action="store_true", help="no figure")
    args = ap.parse_args(argv)
    if args.verdict_steps not in args.steps:
        ap.error(f"--verdict-steps {args.verdict_steps} is not one of --steps {args.steps}")
    if args.quantize and args.verdict_quant not in args.quantize:
        ap.error(f"--verdict-quant {args.verdict_quant} is not one of --quantize {args.quantize}")
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        ap.error("--tolerance must be a finite number >= 0")
    if args.second_forget and not args.second_muted:
        ap.error("--second-forget needs --second-muted")
    return args


def quantizer(types):
    """neumuter_cli.quantize.quantize_model, or a clear stop when this checkout has no such module."""
    if not types:
        return None
    try:
        from neumuter_cli.quantize import quantize_model
    except ImportError as exc:
        raise SystemExit(f"robustness.py: --quantize {','.join(types)} needs neumuter_cli.quantize, which this "
                         f"checkout lacks ({exc}); pass --quantize '' to leave the quantisation columns out")
    return quantize_model


# ---------------------------------------------------------------- measuring

def mean(values):
    values = [v for v in values if v is not None]
    return math.fsum(values) / len(values) if values else None


def forget_scores(model, ids_list, batch_size):
    """Per text: MA over all its tokens, and MA over its second half alone (the tokens after the
    first half that relearning trains on)."""
    tfs = teacher_forced(model, ids_list, batch_size)
    full, second = [], []
    for ids, tf in zip(ids_list, tfs):
        full.append(tf.ma(ids))
        start = len(ids) // 2
        hits = [tf.preds[j - 1] == ids[j] for j in range(max(start, 1), len(ids))]
        second.append(sum(hits) / len(hits) if hits else None)
    return {"ma": full, "second_half_ma": second}


def measure_model(name, path, data, args, quantize_model):
    """Every condition of one model: full precision, each quantisation, relearning."""
    row = {"path": path}
    started = time.perf_counter()
    log(f"{name}: loading {path}")
    model, tokenizer = load_model(path, device=args.device)
    ids = {key: encode(tokenizer, texts, args.max_length) for key, texts in data["texts"].items()}
    if data["forget_ids"] is not None and ids["forget"] != data["forget_ids"]:
        log(f"warning: {name} tokenises the forget texts differently from the first model; per-text "
            "comparisons assume the same tokenizer")
    conditions = {"fp32": forget_scores(model, ids["forget"], args.batch_size)}
    row["retained_ma"] = mean(memorization_accuracy(model, ids["retain"], args.batch_size))
    if "second" in ids:
        row["second_forget_ma"] = memorization_accuracy(model, ids["second"], args.batch_size)
    log(f"{name}: forget MA {mean(conditions['fp32']['ma']):.4f}, retained MA {row['retained_ma']:.4f}")
    row["perplexity"] = perplexity(model, tokenizer, data["texts_heldout"], window=args.ppl_window,
                                   batch_size=args.batch_size)
    log(f"{name}: held-out perplexity {row['perplexity']['perplexity']:.2f}")
    row["quantize"] = {}
    for qtype in args.quantize:
        quantised = copy.deepcopy(model)
        row["quantize"][qtype] = quantize_model(quantised, qtype)
        conditions[qtype] = forget_scores(quantised, ids["forget"], args.batch_size)
        log(f"{name}: forget MA after {qtype} {mean(conditions[qtype]['ma']):.4f}")
        del quantised
        gc.collect()
    halves = first_halves(data["records"], tokenizer, args.max_length)
    config = RelearnConfig(steps=max(args.steps), lr=args.relearn_lr, batch_size=args.relearn_batch_size,
                           layers=args.relearn_layers, max_length=args.max_length, seed=args.seed)

    def after_step(step, loss):
        if step in args.steps:
            conditions[f"relearn_{step}"] = scores = forget_scores(model, ids["forget"], args.batch_size)
            log(f"{name}: forget MA after {step} relearning steps {mean(scores['ma']):.4f} "
                f"(second halves {mean(scores['second_half_ma']):.4f}; batch loss {loss:.4f})")

    # the model itself is relearnt last: no copy needed
    result = relearn(model, tokenizer, halves, config, on_step=after_step)
    row["relearn_losses"] = result.losses
    row["conditions"] = conditions
    row["forget_ma"] = {key: mean(value["ma"]) for key, value in conditions.items()}
    row["second_half_ma"] = {key: mean(value["second_half_ma"]) for key, value in conditions.items()}
    row["seconds"] = round(time.perf_counter() - started, 1)
    del model
    gc.collect()
    return row, ids["forget"]


def at_reference(values, reference, tolerance):
    """How many texts are at or below the reference model's MA on that text + tolerance."""
    return sum(v <= r + tolerance for v, r in zip(values, reference))


def verdicts(rows, args):
    reference = rows["reference"]["conditions"]
    relearnt = f"relearn_{args.verdict_steps}"
    for row in rows.values():
        row["at_ref"] = {key: at_reference(value["ma"], reference[key]["ma"], args.tolerance)
                         for key, value in row["conditions"].items()}
        count = len(row["conditions"]["fp32"]["ma"])
        relearns_slowly = row["forget_ma"][relearnt] <= rows["reference"]["forget_ma"][relearnt] + args.tolerance
        stays = row["at_ref"][args.verdict_quant] == count if args.quantize else None
        row["verdict"] = {"relearn_no_faster_than_reference": relearns_slowly,
                          "stays_forgotten_after_quantisation": stays,
                          "robust": None if stays is None else (relearns_slowly and stays)}


def second_request(args, data, rows):
    """Set A (and B) after the second request, beside the muted model after the first."""
    row = measure_second(args, data)
    reference = rows["reference"]
    out = {"path": args.second_muted, "forget_ma": mean(row["ma"]), "perplexity": row["perplexity"],
           "at_ref": at_reference(row["ma"], reference["conditions"]["fp32"]["ma"], args.tolerance),
           "ma": row["ma"]}
    if "second" in row:
        out["second_forget"] = {
            "ma": row["second"], "mean_ma": mean(row["second"]),
            "at_ref": at_reference(row["second"], reference["second_forget_ma"], args.tolerance),
            **{f"{name}_mean_ma": mean(rows[name]["second_forget_ma"]) for name in rows},
        }
    return out


def measure_second(args, data):
    log(f"second request: loading {args.second_muted}")
    model, tokenizer = load_model(args.second_muted, device=args.device)
    row = {"ma": memorization_accuracy(model, encode(tokenizer, data["texts"]["forget"], args.max_length),
                                       args.batch_size)}
    if "second" in data["texts"]:
        row["second"] = memorization_accuracy(model, encode(tokenizer, data["texts"]["second"], args.max_length),
                                              args.batch_size)
    row["perplexity"] = perplexity(model, tokenizer, data["texts_heldout"], window=args.ppl_window,
                                   batch_size=args.batch_size)
    del model
    gc.collect()
    return row


# ---------------------------------------------------------------- tables

def fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def tables(results, args) -> str:
    from tabulate import tabulate

    rows = results["models"]
    count = results["forget_records"]
    relearnt = f"relearn_{args.verdict_steps}"
    headers = (["model", "forget MA fp32"] + args.quantize + [f"relearn {n}" for n in args.steps]
               + ["retained MA", "held-out ppl"])
    body = []
    for name, row in rows.items():
        body.append([name, fmt(row["forget_ma"]["fp32"])] + [fmt(row["forget_ma"][q]) for q in args.quantize]
                    + [fmt(row["forget_ma"][f"relearn_{n}"]) for n in args.steps]
                    + [fmt(row["retained_ma"]), fmt(row["perplexity"]["perplexity"], 2)])
    parts = [f"forget MA ({count} texts; relearning on their first halves, lr {args.relearn_lr:g}, "
             f"batch {args.relearn_batch_size})", tabulate(body, headers=headers, disable_numparse=True)]

    def yes(value):
        return "-" if value is None else ("yes" if value else "no")

    headers = ["model", "at ref fp32"] + ([f"at ref {args.verdict_quant}"] if args.quantize else []) \
        + [f"at ref relearn {args.verdict_steps}", f"relearn {args.verdict_steps} <= ref + {args.tolerance:g}",
           f"{args.verdict_quant} holds", "robust"]
    body = []
    for name, row in rows.items():
        body.append([name, f"{row['at_ref']['fp32']}/{count}"]
                    + ([f"{row['at_ref'][args.verdict_quant]}/{count}"] if args.quantize else [])
                    + [f"{row['at_ref'][relearnt]}/{count}", yes(row["verdict"]["relearn_no_faster_than_reference"]),
                       yes(row["verdict"]["stays_forgotten_after_quantisation"]), yes(row["verdict"]["robust"])])
    parts += ["", f"per-text verdicts: forget texts at or below the reference model's MA on that text "
                  f"+ {args.tolerance:g} under the same condition",
              tabulate(body, headers=headers, disable_numparse=True)]
    second = results.get("second_request")
    if second:
        has_b = "second_forget" in second
        headers = ["model", "set A MA", "set A at ref"] + (["set B MA"] if has_b else []) + ["held-out ppl"]
        body = []
        for name in ("memorizer", "reference", "muted"):
            row = rows[name]
            body.append([f"{name}" + (" (after request A)" if name == "muted" else ""),
                         fmt(row["forget_ma"]["fp32"]), f"{row['at_ref']['fp32']}/{count}"]
                        + ([fmt(mean(row["second_forget_ma"]))] if has_b else [])
                        + [fmt(row["perplexity"]["perplexity"], 2)])
        body.append(["second-muted (after A, then B)", fmt(second["forget_ma"]), f"{second['at_ref']}/{count}"]
                    + ([fmt(second["second_forget"]["mean_ma"])] if has_b else [])
                    + [fmt(second["perplexity"]["perplexity"], 2)])
        parts += ["", "second request", tabulate(body, headers=headers, disable_numparse=True)]
    return "\n".join(parts)


# ---------------------------------------------------------------- main

def main(argv=None) -> dict:
    args = parse_args(argv)
    plot = figure_path(args.out, args.plot, args.no_plot)
    check_figure_path(plot)
    quantize_model = quantizer(args.quantize)
    check_config(RelearnConfig(steps=max(args.steps), lr=args.relearn_lr, batch_size=args.relearn_batch_size,
                               max_length=args.max_length, seed=args.seed))
    records = read_records(args.forget)
    data = {"records": records, "forget_ids": None,
            "texts": {"forget": [r["text"] for r in records], "retain": [r["text"] for r in read_records(args.retain)]},
            "texts_heldout": [r["text"] for r in read_records(args.heldout)]}
    if args.second_forget:
        data["texts"]["second"] = [r["text"] for r in read_records(args.second_forget)]
    models = {"memorizer": args.memorizer, "reference": args.reference, "muted": args.muted}
    if args.ga:
        models["ga"] = args.ga
    rows = {}
    for name, path in models.items():
        rows[name], forget_ids = measure_model(name, path, data, args, quantize_model)
        data["forget_ids"] = data["forget_ids"] or forget_ids
    verdicts(rows, args)
    results = {"settings": {k: v for k, v in vars(args).items()}, "forget_records": len(records), "models": rows}
    if args.second_muted:
        results["second_request"] = second_request(args, data, rows)
    print(tables(results, args))
    if args.out:
        with atomic_output(args.out) as out:
            json.dump(results, out, indent=1)
            out.write("\n")
        log(f"wrote {args.out}")
    benchmark_figure(plot_robustness, results, plot, f"{os.path.basename(os.path.normpath(args.muted))} against "
                     f"the memorizer and the reference on {len(records)} forget texts", "robustness.py")
    return results


if __name__ == "__main__":
    try:
        main()
    except NeumuterError as exc:
        raise SystemExit(f"robustness.py: {exc}") from None
