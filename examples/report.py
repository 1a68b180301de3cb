"""Print the demo's before/after table from two `neumuter measure --format json` outputs.

The records carry a "set" key (written by make_data.py into eval.jsonl); the table gives, per
set, the mean MA and EL_10 before and after, and how many texts count as forgotten under eq. 17
(MA and EL_10 at or below the reference set's means, measured on the original model). Below
it: the thresholds, the held-out perplexity, the muted neurons (from the scales file) and one
line per canary. Exit status 1 unless every canary is forgotten and the people keep at least
--keep of their MA (so `make` fails when the demo does not show what it claims).
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


def ppl_value(summary):
    ppl = summary.get("perplexity")
    if isinstance(ppl, dict):
        for key in ("perplexity", "ppl", "value"):
            if isinstance(ppl.get(key), (int, float)):
                return float(ppl[key])
        return None
    return float(ppl) if isinstance(ppl, (int, float)) else None


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", help="measure output (json) on the original model")
    parser.add_argument("after", help="measure output (json) on the muted model")
    parser.add_argument("--scales", help="the scales file that was applied")
    parser.add_argument("--keep", type=float, default=0.9,
                        help="share of the people's MA that must be kept for a pass")
    args = parser.parse_args()

    before, after = load(args.before), load(args.after)
    rows_before = {r["id"]: r for r in before["records"]}
    limits = before["summary"].get("thresholds") or after["summary"].get("thresholds")
    table = []
    stats = {}
    for key, label in SETS:
        b = [r for r in before["records"] if r.get("set") == key]
        a = [r for r in after["records"] if r.get("set") == key]
        if not b:
            continue
        stats[key] = (mean(r["ma"] for r in b), mean(r["ma"] for r in a))
        table.append([label, len(b),
                      fmt(mean(r["ma"] for r in b)), fmt(mean(r["ma"] for r in a)),
                      fmt(mean(r.get("el_10") for r in b)), fmt(mean(r.get("el_10") for r in a)),
                      f"{sum(bool(r.get('forgotten')) for r in b)} / {len(b)}",
                      f"{sum(bool(r.get('forgotten')) for r in a)} / {len(a)}"])
    print(tabulate(table, headers=["set", "texts", "MA before", "MA after", "EL_10 before", "EL_10 after",
                                   "forgotten before", "forgotten after"], tablefmt="github"))
    print()
    if limits:
        print(f"forgotten (eq. 17): MA <= {limits['ma']:.3f} and EL_10 <= {limits.get('el_10', 0):.3f}, the means "
              f"of {limits.get('records', '?')} unseen texts on the original model")
    ppl_b, ppl_a = ppl_value(before["summary"]), ppl_value(after["summary"])
    if ppl_b and ppl_a:
        print(f"held-out perplexity: {ppl_b:.2f} -> {ppl_a:.2f} ({100 * (ppl_a / ppl_b - 1):+.1f} %)")
    if args.scales:
        muted, total = scales_summary(args.scales)
        print(f"muted FFN neurons: {muted} of {total} ({100 * muted / total:.1f} %)")
    print()
    canaries = [r for r in after["records"] if r.get("set") == "forget"]
    for r in canaries:
        b = rows_before[r["id"]]
        state = "forgotten" if r.get("forgotten") else "NOT forgotten"
        print(f"  {state:13s}  MA {b['ma']:.2f} -> {r['ma']:.2f}  EL_10 {fmt(b.get('el_10'), 2)} -> "
              f"{fmt(r.get('el_10'), 2)}  {r['text']}")
    forgotten = sum(bool(r.get("forgotten")) for r in canaries)
    kept = stats["people"][1] / stats["people"][0] if "people" in stats and stats["people"][0] else None
    ok = canaries and forgotten == len(canaries) and kept is not None and kept >= args.keep
    print()
    print(f"{'PASS' if ok else 'FAIL'}: {forgotten} of {len(canaries)} canaries forgotten; the people keep "
          f"{100 * kept:.0f} % of their MA (at least {100 * args.keep:.0f} % wanted)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
