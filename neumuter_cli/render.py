"""How `measure` results are written: the per-record table, the summary table, the extraction
examples (Table 14), and the three output formats (table, JSONL, JSON)."""
from __future__ import annotations

from typing import IO, Callable, Sequence

from .mia import MIA_RADIUS, MIA_SCORES, PRIVLEAK_SCORE
from .errors import escape
from .results import MeasureResult, el_key, record_label

SCORE_NAMES = {"loss": "loss", "zlib": "zlib", "mink_20": "Min-20%", "mink_40": "Min-40%",
               "minkpp_20": "Min-20%++", "minkpp_40": "Min-40%++"}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def results_table(records: Sequence[dict], el_ns: Sequence[int] = (10,)) -> str:
    """One row per measured record: id, tokens, MA, EL_n, loss; with eq. 17 thresholds the MIA
    distance and the forgotten mark; with a reference model its MA, EL_n and loss on the record
    and the forgotten / over-forgotten marks."""
    from tabulate import tabulate

    first = records[0] if records else {}
    eq17 = "mia_distance" in first
    against_model = "ref_ma" in first
    headers = ["id", "tokens", "MA"] + [f"EL_{n}" for n in el_ns] + ["loss"]
    if against_model:
        headers += ["ref MA"] + [f"ref EL_{n}" for n in el_ns] + ["ref loss"]
    if eq17:
        headers += ["MIA dist"]
    if "forgotten" in first:
        headers += ["forgotten"]
    if against_model:
        headers += ["over-forgotten"]
    rows = []
    for k, r in enumerate(records):
        row = [record_label(r, k), r["tokens"], _fmt(r["ma"])] + [_fmt(r.get(el_key(n))) for n in el_ns]
        row.append(_fmt(r["loss"]))
        if against_model:
            row += [_fmt(r["ref_ma"])] + [_fmt(r.get(f"ref_{el_key(n)}")) for n in el_ns] + [_fmt(r["ref_loss"])]
        if eq17:
            row.append(_fmt(r["mia_distance"]))
        if "forgotten" in first:
            row.append(_fmt(r["forgotten"]))
        if against_model:
            row.append(_fmt(r["over_forgotten"]))
        rows.append(row)
    return tabulate(rows, headers=headers, disable_numparse=True)


def _percent(value) -> str:
    return "-" if value is None else f"{value:+.1f} %"


def summary_table(summary: dict, el_ns: Sequence[int] = (10,)) -> str:
    """The summary as a two-column table: means, thresholds or the reference model's verdicts,
    forget quality, MIA AUCs and PrivLeak, quantisation, perplexity."""
    from tabulate import tabulate

    rows = []
    if summary.get("records"):
        rows.append(["records (tokens)", f"{summary['records']} ({summary['tokens']})"])
        rows.append(["mean MA", _fmt(summary["ma"], 4)])
        rows += [[f"mean EL_{n}", _fmt(summary.get(el_key(n)), 4)] for n in el_ns]
        rows.append(["mean loss (nats/token)", _fmt(summary["loss"], 4)])
    limits = summary.get("thresholds")
    if limits:
        rows.append(["threshold MA (eq. 17)", _fmt(limits["ma"], 4)])
        rows += [[f"threshold EL_{n} (eq. 17)", _fmt(limits.get(el_key(n)), 4)] for n in el_ns]
        rows.append(["reference loss (mean)", _fmt(limits["loss"], 4)])
        rows.append(["reference records", _fmt(limits.get("records"))])
        rows.append(["forgotten", f"{summary['forgotten']} / {summary['records']}"])
        rows.append(["mean MIA loss distance", _fmt(summary["mia_distance"], 4)])
        rows.append([f"MIA distance <= {MIA_RADIUS}", f"{100 * summary['mia_within_0.5']:.1f} %"])
    reference = summary.get("reference")
    if reference:
        source = reference.get("model") or reference.get("scores")
        rows.append(["reference model" if "model" in reference else "reference scores", escape(source)])
        if reference.get("quantized"):
            rows.append(["  quantized", reference["quantized"]["type"]])
        rows.append(["reference mean MA", _fmt(summary["ref_ma"], 4)])
        rows += [[f"reference mean EL_{n}", _fmt(summary.get(f"ref_{el_key(n)}"), 4)] for n in el_ns]
        rows.append(["reference mean loss", _fmt(summary["ref_loss"], 4)])
        tolerance = reference["tolerance"]
        rows.append([f"forgotten (<= reference + {tolerance:g})", f"{summary['forgotten']} / {summary['records']}"])
        rows.append([f"over-forgotten (MA < reference - {tolerance:g})",
                     f"{summary['over_forgotten']} / {summary['records']}"])
        rows.append(["forget quality (KS p, losses)", _fmt(summary["forget_quality"], 4)])
    holdout = summary.get("holdout")
    if holdout:
        rows.append(["holdout texts (tokens)", f"{holdout['records']} ({holdout['tokens']})"])
        with_ref = f"ref_auc_{PRIVLEAK_SCORE}" in summary
        for name in MIA_SCORES:
            label = f"MIA AUC {SCORE_NAMES[name]}"
            value = _fmt(summary[f"auc_{name}"], 4)
            if with_ref:
                value += (f"  (reference {_fmt(summary[f'ref_auc_{name}'], 4)}, "
                          f"PrivLeak {_percent(summary[f'privleak_{name}'])})")
            rows.append([label, value])
        if with_ref:
            rows.append([f"PrivLeak (MUSE, {SCORE_NAMES[PRIVLEAK_SCORE]})", _percent(summary["privleak"])])
    quantized = summary.get("quantized")
    if quantized:
        rows.append(["quantized", f"{quantized['type']}: {quantized['weights']} block weights "
                                  f"({quantized['elements']:,} elements)"])
        rows += [["", pattern] for pattern in quantized["patterns"]]
        if quantized["skipped"]:
            rows.append(["  left as they are", ", ".join(quantized["skipped"])])
    ppl = summary.get("perplexity")
    if ppl:
        rows.append(["perplexity", f"{ppl['perplexity']:.2f}"])
        rows.append(["  scored tokens / window / stride", f"{ppl['tokens']} / {ppl['window']} / {ppl['stride']}"])
    return tabulate(rows, tablefmt="simple", disable_numparse=True)


def generation_lines(records: Sequence[dict], style: Callable[..., str] | None = None) -> list[str]:
    """Table 14: prefix, the true suffix, and the greedy continuation with the point where it
    leaves the true text marked (``style(text, fg=...)`` colours it, e.g. click.style)."""
    style = style or (lambda text, **_: text)
    lines = []
    for k, r in enumerate(records):
        gen = r.get("generation")
        if not gen:
            continue
        where = ("identical to the true suffix" if gen["diverges_at"] is None
                 else f"diverges at token {gen['diverges_at']}")
        if lines:
            lines.append("")
        lines.append(f"== {record_label(r, k)}: {gen['matching']} leading tokens match, {where}")
        lines.append(f"prefix:    {gen['prefix']!r}")
        lines.append(f"true:      {gen['true']!r}")
        marker = "" if gen["diverges_at"] is None else style(" >>> ", bold=True)
        lines.append("generated: " + style(repr(gen["same"]), fg="green") + marker
                     + (style(repr(gen["different"]), fg="red") if gen["diverges_at"] is not None else ""))
    return lines


def write_result(result: MeasureResult, fmt: str, out: IO[str], style: Callable[..., str] | None = None) -> None:
    """Write ``result`` as ``table`` (records, summary, generations), ``jsonl`` (one line per
    record; with no records one ``{"summary": ...}`` line) or ``json`` (``{"records",
    "summary"}``)."""
    import jsonlines

    from .records import dumps_json, record_writer

    if fmt == "jsonl":
        with record_writer(out) as lines:
            lines.write_all(result.records)
        if not result.records:                 # perplexity alone: the summary is the data
            with jsonlines.Writer(out, dumps=dumps_json) as lines:
                lines.write({"summary": result.summary})
    elif fmt == "json":
        out.write(dumps_json({"records": result.records, "summary": result.summary},
                             ensure_ascii=False, indent=2) + "\n")
    elif fmt == "table":
        parts = [results_table(result.records, result.el_ns)] if result.records else []
        parts.append(summary_table(result.summary, result.el_ns))
        lines = generation_lines(result.records, style)
        if lines:
            parts.append("\n".join(lines))
        out.write("\n\n".join(parts) + "\n")
    else:
        raise ValueError(f"unknown format {fmt!r}")


__all__ = ["results_table", "summary_table", "generation_lines", "write_result"]
