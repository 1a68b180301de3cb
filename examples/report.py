"""Print the demo's before/after table from the `neumuter measure --format json` outputs.

Every measurement is against the base model (the LM before the canaries were added): a canary is
forgotten when its MA and EL_10 are at most the base model's on it + the tolerance (0.05), and
over-forgotten when its MA is more than the tolerance below. The table gives, per set of
eval.jsonl (written by make_data.py), the mean MA under the base model, the LM (before) and the
muted LM (after), and EL_10 before and after. Below it: the membership-inference AUC and PrivLeak
(`measure --holdout`), the held-out perplexity, the muted neurons, the relearning check and the
quantisation check, and one line per canary.

Exit status 1 unless every canary is forgotten, none is over-forgotten, and the people keep at
least --keep of their MA (so that `make` fails when the demo does not show what it claims). The
relearning and quantisation checks are reported, not required: they show whether the forgetting
holds up, which is what they are for.
"""
from __future__ import annotations

import argparse
import json
import sys

from tabulate import tabulate

SETS = [("forget", "canaries (forget)"), ("people", "people (retain)"),
        ("unseen", "unseen canaries"), ("unseen_people", "unseen people")]


def load(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def scales_summary(path):
    """(muted neurons, all neurons) from a scales file's tensors."""
    from safetensors import safe_open

    muted = total = 0
    with safe_open(path, "pt") as fh:
        for name in fh.keys():
            tensor = fh.get_tensor(name)
            muted += int((tensor < 1).sum())
            total += tensor.numel()
    return muted, total


def table(before, after):
    """The per-set table, and {set: (MA before, MA after)}."""
    rows, stats = [], {}
    for key, label in SETS:
        b = [r for r in before["records"] if r.get("set") == key]
        a = [r for r in after["records"] if r.get("set") == key]
        if not b:
            continue
        stats[key] = (mean(r["ma"] for r in b), mean(r["ma"] for r in a))
        rows.append([label, len(b), fmt(mean(r.get("ref_ma") for r in b)), fmt(stats[key][0]), fmt(stats[key][1]),
                     fmt(mean(r.get("el_10") for r in b)), fmt(mean(r.get("el_10") for r in a))])
    text = tabulate(rows, headers=["set", "texts", "MA base model", "MA before", "MA after", "EL_10 before",
                                   "EL_10 after"], tablefmt="github")
    return text, stats


def verdicts(records):
    """(forgotten, over-forgotten, count) of a measure output's records."""
    return (sum(bool(r.get("forgotten")) for r in records), sum(bool(r.get("over_forgotten")) for r in records),
            len(records))


def check_line(name, data, what):
    forgotten, _, count = verdicts(data["records"])
    summary = data["summary"]
    return (f"{name} check ({what}): {forgotten} of {count} canaries at or below the base model's MA + "
            f"{summary['reference']['tolerance']:g} under the same treatment (canary MA {summary['ma']:.3f}, "
            f"base model {summary['ref_ma']:.3f}): " + ("holds" if forgotten == count else "does NOT hold"))


def perplexity_line(before, after):
    ppl_b, ppl_a = (s["summary"].get("perplexity", {}).get("perplexity") for s in (before, after))
    if ppl_b and ppl_a:
        return f"held-out perplexity: {ppl_b:.2f} -> {ppl_a:.2f} ({100 * (ppl_a / ppl_b - 1):+.1f} %)"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", help="measure output (json) of eval.jsonl on the LM, against the base model")
    parser.add_argument("after", help="the same on the muted LM")
    parser.add_argument("--gone", help="measure output of the canaries on the muted LM with --holdout")
    parser.add_argument("--relearn", help="measure output of the relearnt muted LM against the relearnt base")
    parser.add_argument("--quantized", help="measure output of the quantised muted LM against the quantised base")
    parser.add_argument("--scales", help="the scales file that was applied")
    parser.add_argument("--keep", type=float, default=0.9,
                        help="share of the people's MA that must be kept for a pass")
    args = parser.parse_args()

    before, after = load(args.before), load(args.after)
    text, stats = table(before, after)
    print(text)
    print()
    tolerance = after["summary"]["reference"]["tolerance"]
    canaries = [r for r in after["records"] if r.get("set") == "forget"]
    forgotten, over, count = verdicts(canaries)
    was = verdicts([r for r in before["records"] if r.get("set") == "forget"])[0]
    print(f"canaries forgotten (MA and EL_10 at most the base model's + {tolerance:g}): {was} of {count} before, "
          f"{forgotten} of {count} after; over-forgotten (MA more than {tolerance:g} below it): {over}")
    kept = stats["people"][1] / stats["people"][0] if stats.get("people") and stats["people"][0] else None
    if kept is not None:
        print(f"the people keep {100 * kept:.0f} % of their MA")
    if args.gone:
        s = load(args.gone)["summary"]
        print(f"membership inference, the canaries against {s['holdout']['records']} unseen canaries (Min-40 %): "
              f"AUC {s['auc_mink_40']:.2f} under the muted LM, {s['ref_auc_mink_40']:.2f} under the base model; "
              f"PrivLeak {s['privleak']:+.0f}")
    if perplexity_line(before, after):
        print(perplexity_line(before, after))
    if args.scales:
        muted, total = scales_summary(args.scales)
        print(f"muted FFN neurons: {muted} of {total} ({100 * muted / total:.1f} %)")
    if args.relearn:
        print(check_line("relearn", load(args.relearn), "a few fine-tuning steps on the canaries' first halves"))
    if args.quantized:
        print(check_line("quantize", load(args.quantized), "every block weight through a llama.cpp format"))
    print()
    before_by_id = {r["id"]: r for r in before["records"]}
    for r in canaries:
        b = before_by_id[r["id"]]
        state = "over-forgotten" if r.get("over_forgotten") else "forgotten" if r.get("forgotten") else "NOT forgotten"
        print(f"  {state:14s} MA {b['ma']:.2f} -> {r['ma']:.2f} (base {r['ref_ma']:.2f})  {r['text']}")
    ok = bool(canaries) and forgotten == count and not over and kept is not None and kept >= args.keep
    print()
    print(f"{'PASS' if ok else 'FAIL'}: {forgotten} of {count} canaries forgotten, {over} over-forgotten; the "
          f"people keep {100 * (kept or 0):.0f} % of their MA (at least {100 * args.keep:.0f} % wanted)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
