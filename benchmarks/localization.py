"""Does `localize` find the neurons that hold the memories? Score a scales (or mask) file
against an INJ model from benchmarks/inject.py, where every text's neurons are known.

    python benchmarks/localization.py --injected OUT --base DIR --scales FILE --json

Rows, each measured the same way on the injected model (neurons scaled by hooks on the FFN
down-projection inputs, as `apply` folds them):

  injected     the injected model as it is
  oracle       exactly the forget texts' injected neurons set to 0 (or, for a file made with
               `localize --base`, reverted to the base model's weights)
  neumuter     the scales file (a mask file goes through `select`'s default rule first)
  random       neumuter's per-block counts and values on random neurons (mean of --random-seeds)
  activation   MemPi-style activation selection (forget minus neighbour mean |activation|), at
               the smallest top-k that forgets every text like the base model (needs --neighbors)

A scales or mask file made with `localize --base BASE` is measured as `apply --base` folds it:
each neuron at W_base + m (W − W_base), m its scale; every other row then reverts instead of
zeroing too. The file must have been made toward the --base given here.

The base model is the exact "never saw it" model here, for every text: a forget text is
forgotten when its MA is at or below the base model's MA on it + --tolerance. Columns: recall
(the mean over forget texts of the share of its injected neurons that are modulated),
precision (the share of the modulated neurons that hold a forget text), forget texts
forgotten, the KS p-value of per-text losses against the base model's, retained injected
texts' MA, held-out perplexity and, with --downstream, zero-shot accuracy. With --json, one
JSON object on stdout: the neumuter row's numbers at the top level and every row under "rows".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from controls import (Fixture, Reference, Target, activation_rows, against_reference,  # noqa: E402
                      measure_model, modified_count, random_rows, read_scales, roll_back_toward, scaled,
                      scales_row)
from neumuter_cli import NeumuterError  # noqa: E402
from neumuter_cli.artifacts import MASK_KIND, SCALES_KIND, read_artifact  # noqa: E402
from neumuter_cli.config import TOLERANCE  # noqa: E402
from neumuter_cli.models import load_model  # noqa: E402
from neumuter_cli.records import read_records  # noqa: E402
from neumuter_cli.select import select_from_mask  # noqa: E402
from neumuter_cli.text import encode  # noqa: E402


def injected_neurons(summary: dict, half: str) -> list[set[tuple[int, int]]]:
    return [{(b, n) for b, n in t["neurons"]} for t in summary["texts"] if t["half"] == half]


def modulated_set(scales: dict[int, torch.Tensor]) -> set[tuple[int, int]]:
    return {(b, int(n)) for b, s in scales.items() for n in torch.nonzero(s != 1).flatten().tolist()}


def overlap(scales: dict[int, torch.Tensor], forget: list[set], retain: list[set]) -> dict:
    """Recall, precision, and how many of the retained texts' injected neurons are touched."""
    chosen = modulated_set(scales)
    forget_all = set().union(*forget)
    per_text = [len(n & chosen) / len(n) for n in forget]
    return {"recall": sum(per_text) / len(per_text), "recall_min": min(per_text),
            "precision": len(chosen & forget_all) / len(chosen) if chosen else None,
            "modulated": len(chosen), "retain_neurons_modulated": len(chosen & set().union(*retain))}


def oracle_scales(fx: Fixture, forget: list[set]) -> dict[int, torch.Tensor]:
    out = {layer.index: torch.ones(layer.neurons) for layer in fx.layers}
    for neurons in forget:
        for block, neuron in neurons:
            out[block][neuron] = 0.0
    return out


def read_scales_or_mask(path: str, fx: Fixture) -> dict[int, torch.Tensor]:
    kind = read_artifact(path).metadata.get("kind")
    if kind == SCALES_KIND:
        return read_scales(path, fx)
    if kind == MASK_KIND:
        artifact = read_artifact(path, MASK_KIND)
        tensors, _ = select_from_mask(artifact.tensors, artifact.metadata)
        return {int(k.split(".")[1]): v for k, v in tensors.items()}
    raise NeumuterError(f"{path}: neither a mask nor a scales file (kind {kind!r})")


def add_utility(row: dict, fx: Fixture, scales, downstream) -> dict:
    if downstream is not None:
        if scales is None:
            row["downstream"] = downstream(fx.model, fx.tokenizer)
        else:
            with scaled(fx, scales):
                row["downstream"] = downstream(fx.model, fx.tokenizer)
    return row


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--injected", required=True, help="the folder benchmarks/inject.py wrote")
    ap.add_argument("--base", required=True, help="the base model it was injected into")
    ap.add_argument("--scales", help="a scales file (`neumuter select`) or a mask file (`neumuter localize`)")
    ap.add_argument("--heldout", help="JSONL long texts for perplexity")
    ap.add_argument("--heldout-limit", type=int, default=40, help="the first N texts of --heldout (default: 40)")
    ap.add_argument("--neighbors", help="the forget records with \"neighbors\": enables the activation control")
    ap.add_argument("--controls", default="random,activation", help="comma-separated: random, activation")
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--max-neurons", type=int, default=2000, help="cap on the activation control's k")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE)
    ap.add_argument("--downstream", help="zero-shot tasks, comma-separated (benchmarks/downstream.py)")
    ap.add_argument("--downstream-limit", type=int, default=200)
    ap.add_argument("--downstream-data", help="task data folder for benchmarks/downstream.py")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--out", help="also write the JSON to this file")
    ap.add_argument("--plot", help="write a figure (recall vs neurons, utility) to this PNG")
    ap.add_argument("--label", default="neumuter", help="the scales file's row: the command that made it")
    ap.add_argument("--description", help="the model and data set, for the figure's title")
    ap.add_argument("--from-json", metavar="FILE", help="measure nothing: draw --plot from the JSON of an earlier "
                    "run (--out)")
    return ap


def run(args) -> dict:
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with open(os.path.join(args.injected, "injected.json"), encoding="utf-8") as f:
        summary = json.load(f)
    forget_neurons, retain_neurons = injected_neurons(summary, "forget"), injected_neurons(summary, "retain")
    forget = [t["text"] for t in summary["texts"] if t["half"] == "forget"]
    retain = [t["text"] for t in summary["texts"] if t["half"] == "retain"]
    model, tokenizer = load_model(args.injected, device="cpu")
    heldout = [r["text"] for r in read_records(args.heldout)][: args.heldout_limit] if args.heldout else []
    fx = Fixture(model, tokenizer, encode(tokenizer, forget, None), encode(tokenizer, retain, None), heldout,
                 256, args.tolerance)
    downstream = None
    if args.downstream:
        from downstream import TaskData, downstream_accuracy

        tasks = [t for t in args.downstream.split(",") if t]
        data = TaskData.locate(args.downstream_data, say)     # loaded once, reused by every row
        downstream = lambda m, tok: downstream_accuracy(m, tok, tasks, args.downstream_limit, data)  # noqa: E731

    say(f"base model {args.base}")
    base, _ = load_model(args.base, device="cpu")
    scales_meta = read_artifact(args.scales).metadata if args.scales else {}
    rollback = scales_meta.get("base") is not None
    if rollback:
        roll_back_toward(fx, base, args.base, scales_meta, args.scales, say)
    rows = []
    row = measure_model(base, tokenizer, fx.forget_ids, fx.retain_ids, fx.heldout, fx.ppl_window, say)
    fx.reference = Reference(row["forget_ma"], row["forget_losses"])
    row.update(control="base", method="base model (never saw any injected text)", modified=None)
    if downstream is not None:
        row["downstream"] = downstream(base, tokenizer)
    rows.append(against_reference(row, fx))
    del base
    target = Target.parse("reference", fx)

    say("the injected model")
    row = measure_model(model, tokenizer, fx.forget_ids, fx.retain_ids, fx.heldout, fx.ppl_window, say)
    row.update(control="injected", method="injected model", modified=None, reached=target.met(row["forget_ma"]))
    rows.append(add_utility(against_reference(row, fx), fx, None, downstream))

    def scored(row, scales):
        row.update(overlap(scales, forget_neurons, retain_neurons))
        return add_utility(row, fx, scales, downstream)

    oracle_does = "reverted to the base" if rollback else "at 0"
    say(f"oracle: the {sum(map(len, forget_neurons))} injected forget neurons {oracle_does}")
    oracle = oracle_scales(fx, forget_neurons)
    rows.append(scored(scales_row(fx, target, oracle, f"oracle (injected forget neurons {oracle_does})", "oracle",
                                  say), oracle))
    controls = [c for c in args.controls.split(",") if c]
    scales = read_scales_or_mask(args.scales, fx) if args.scales else None
    if scales is not None:
        say(f"neumuter: {modified_count(scales)} neurons")
        rows.append(scored(scales_row(fx, target, scales, "neumuter", "neumuter", say), scales))
        if "random" in controls:
            row = random_rows(fx, target, scales, list(range(args.random_seeds)), say)
            rows.append(row)
    if "activation" in controls and args.neighbors:
        records = read_records(args.neighbors, ("text", "neighbors"))
        fx.neighbor_ids = encode(tokenizer, [nb for r in records for nb in r["neighbors"]], None)
        blocks = [layer.index for layer in fx.layers]
        for row in activation_rows(fx, target, blocks, args.max_neurons,
                                   modified_count(scales) if scales is not None else None, say):
            rows.append(row)
    result = {"injected": os.path.basename(os.path.normpath(args.injected)), "n_forget": len(forget),
              "mode": "rollback" if rollback else "scaling",
              "n_retain": len(retain), "label": args.label, "description": args.description,
              "total_neurons": sum(layer.neurons for layer in fx.layers),
              "targets": {"recall": 0.9, "perplexity_change": 1.0},
              "injected_forget_neurons": sum(map(len, forget_neurons)), "rows": rows,
              "seconds": round(time.perf_counter() - started, 1)}
    by_control = {r["control"]: r for r in rows}
    injected_row, oracle_row = by_control["injected"], by_control["oracle"]
    result.update(retained_ma_before=injected_row["retained_ma"], ppl_before=injected_row["perplexity"],
                  oracle_retained_ma_after=oracle_row["retained_ma"], oracle_ppl_after=oracle_row["perplexity"],
                  oracle_forgotten=oracle_row["at_reference"])
    if "neumuter" in by_control:
        mine = by_control["neumuter"]
        result.update({k: mine[k] for k in ("recall", "recall_min", "precision", "modulated",
                                            "retain_neurons_modulated", "ks_p")},
                      forgotten=mine["at_reference"], retained_ma_after=mine["retained_ma"],
                      ppl_after=mine["perplexity"], forget_ma_after=mine["forget_ma_mean"])
    if args.plot:
        plot(result, args.plot)
    return result


def plot(result: dict, path: str) -> None:
    """The figure of a result: every row that modified neurons, and the rows of
    ``recall_only_rows`` (systems scored on the same instance another way: their recall and
    precision are drawn, their perplexity is not)."""
    from neumuter_cli.plots import plot_localization

    def plotted(row, ppl=True):
        name = result.get("label", "neumuter") if row["method"] == "neumuter" else row["method"]
        return {"system": name, "modulated": row["modified"], "recall": row.get("recall"),
                "precision": row.get("precision"), "forgotten": round(row["at_reference"]),
                "n_forget": result["n_forget"], "retained_ma_before": result["retained_ma_before"],
                "retained_ma_after": row["retained_ma"], "ppl_before": result["ppl_before"],
                "ppl_after": row["perplexity"] if ppl else None}
    rows = [plotted(r) for r in result["rows"] if r.get("modified")]
    rows += [plotted(r, ppl=False) for r in result.get("recall_only_rows", [])]
    what = result.get("description") or f"INJ instance {result['injected']} on SmolLM2-135M"
    plot_localization(rows, path, f"{what}: {result['n_forget']} forget and {result['n_retain']} retained injected "
                      "texts\n(perplexity change against the injected model)", result.get("total_neurons"),
                      result.get("targets"))


def table(result: dict) -> str:
    from tabulate import tabulate

    def fmt(value, digits=3):
        return "–" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))
    body = [[r["method"], fmt(r.get("modified")), fmt(r.get("recall")), fmt(r.get("precision")),
             f"{fmt(r.get('at_reference'))}/{result['n_forget']}", fmt(r.get("ks_p")), fmt(r.get("retained_ma")),
             fmt(r.get("perplexity"), 2)] for r in result["rows"]]
    return tabulate(body, headers=["system", "neurons", "recall", "precision", "forgotten", "KS p", "retained MA",
                                   "perplexity"], tablefmt="github", disable_numparse=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        if not args.plot:
            print("Error: --from-json needs --plot", file=sys.stderr)
            return 2
        with open(args.from_json, encoding="utf-8") as f:
            plot(json.load(f), args.plot)
        return 0
    try:
        result = run(args)
    except NeumuterError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 3
    text = json.dumps(result, indent=1, sort_keys=True, default=lambda v: v.tolist(), allow_nan=False)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
