"""Figures of measured results: `measure --plot` (is it gone?) and the benchmarks' figures
(trade-off curve, controls, robustness, localisation). Every function takes numbers already
computed and draws them; none measures anything.

matplotlib is optional (``pip install 'neumuter[plot]'``), imported only when a figure is
drawn, always with the non-interactive Agg backend. Files are written like every other output
(the folder must exist; a temporary name beside it, renamed at the end) and are the same
bytes for the same numbers (no software version or date in the PNG).
"""
from __future__ import annotations

import math
import os
import sys
from typing import Callable, Sequence

from . import NeumuterError
from .errors import SettingsMessage

MISSING = "matplotlib is not installed: pip install 'neumuter[plot]'"


class MatplotlibMissing(NeumuterError):
    """matplotlib cannot be imported."""

# one colour per verdict, the same in every figure (colour-blind safe: Okabe-Ito)
FORGOTTEN, OVER_FORGOTTEN, KEPT, NEUTRAL = "#009E73", "#E69F00", "#D55E00", "#0072B2"
REFERENCE_STYLE = dict(color="0.35", linestyle="--", linewidth=1.2)


def require_matplotlib() -> None:
    """Fail now, with what to install, when matplotlib is missing (before any slow work)."""
    _pyplot()


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MatplotlibMissing(MISSING) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str) -> None:
    """Write ``fig`` to ``path`` as a PNG, atomically, and close it."""
    from .records import atomic_output

    plt = _pyplot()
    try:
        with atomic_output(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=120, metadata={"Software": None})
    finally:
        plt.close(fig)


def _figure(panels: int, title: str):
    plt = _pyplot()
    fig, axes = plt.subplots(1, panels, figsize=(5.8 * panels, 5.6), squeeze=False, constrained_layout=True)
    fig.suptitle(title, fontsize=11)
    return fig, list(axes[0])


def _legend_below(ax, columns: int = 2, offset: float = -0.13) -> None:
    """The legend under the panel (``offset``: its top, in axes heights), where it hides no point."""
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, offset), ncol=columns, frameon=False)


# ---------------------------------------------------------------- measure --plot

def plot_measure(result, path: str, title: str) -> None:
    """`measure --plot`: each text's MA under the model against its yardstick, the verdicts in
    their colours, and with a holdout the ROC curves of the membership-inference attacks.

    The yardstick is the reference model's MA on the same text (``ref_ma``, from
    --reference-model or --reference-scores: one point per text, the diagonal is "as
    remembered as by a model that never saw it"), else eq. 17's MA threshold (a line over the
    texts sorted by MA), else none (MA alone)."""
    if not result.records:
        raise SettingsMessage("{plot_path}: no records to draw (perplexity alone has no per-text picture)")
    fig, axes = _figure(2 if result.mia_scores else 1, title)
    _per_text_panel(axes[0], result.records, result.summary)
    if result.mia_scores:
        _roc_panel(axes[1], result.mia_scores, result.summary)
    save(fig, path)


def _verdict(record: dict) -> str:
    if "forgotten" not in record:
        return "measured"
    if record.get("over_forgotten"):
        return "over-forgotten"
    return "forgotten" if record["forgotten"] else "kept"


def _per_text_panel(ax, records: Sequence[dict], summary: dict) -> None:
    groups = {"forgotten": FORGOTTEN, "over-forgotten": OVER_FORGOTTEN, "kept": KEPT, "measured": NEUTRAL}
    tolerance = (summary.get("reference") or {}).get("tolerance")
    meaning = {"forgotten": "forgotten", "over-forgotten": "over-forgotten", "kept": "kept (still remembered)",
               "measured": "measured"}
    if "ref_ma" in records[0]:
        ax.fill_between([0, 1], [-tolerance, 1 - tolerance], [tolerance, 1 + tolerance], color="0.9",
                        label=f"reference ± {tolerance:g}")
        ax.plot([0, 1], [0, 1], **REFERENCE_STYLE, label="as remembered as by the reference")
        for verdict, colour in groups.items():
            chosen = [r for r in records if _verdict(r) == verdict]
            if chosen:
                ax.scatter([r["ref_ma"] for r in chosen], [r["ma"] for r in chosen], s=28, color=colour,
                           edgecolor="black", linewidth=0.4, zorder=3, label=f"{meaning[verdict]} ({len(chosen)})")
        ax.set_xlabel("MA under the reference model (share of tokens)")
        ax.set_xlim(-0.03, 1.05)
        ax.set_title("each text against a model that never saw it", fontsize=10)
    else:
        order = sorted(records, key=lambda r: -r["ma"])
        for verdict, colour in groups.items():
            ranks = [k + 1 for k, r in enumerate(order) if _verdict(r) == verdict]
            if ranks:
                ax.scatter(ranks, [order[k - 1]["ma"] for k in ranks], s=28, color=colour, edgecolor="black",
                           linewidth=0.4, zorder=3, label=f"{meaning[verdict]} ({len(ranks)})")
        limits = summary.get("thresholds")
        if limits:
            ax.axhline(limits["ma"], **REFERENCE_STYLE, label=f"eq. 17 threshold: MA {limits['ma']:.3f}")
        ax.set_xlabel("texts, by decreasing MA (rank)")
        ax.set_xlim(0.5, len(order) + 0.5)
        ax.set_title("each text" + (" against the mean MA of unseen texts" if limits else ""), fontsize=10)
    ax.set_ylabel("MA under the model (share of tokens)")
    ax.set_ylim(-0.03, 1.05)
    ax.grid(alpha=0.3)
    _legend_below(ax)


ROC_SCORES = (("mink_40", "Min-40%"), ("loss", "loss"))


def _roc_panel(ax, scores: dict, summary: dict) -> None:
    from .mia import roc_curve

    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="chance (AUC 0.5)")
    # the first score's lines are wider, so that a second curve on top of one leaves both in sight
    for (name, label), colour, width in zip(ROC_SCORES, (NEUTRAL, "#CC79A7"), (3.2, 1.6)):
        fpr, tpr = roc_curve([s[name] for s in scores["records"]], [s[name] for s in scores["holdout"]])
        ax.plot(fpr, tpr, color=colour, linewidth=width, drawstyle="steps-post",
                label=f"model, {label}: AUC {summary[f'auc_{name}']:.3f}")
        if scores.get("ref_records"):
            fpr, tpr = roc_curve([s[name] for s in scores["ref_records"]], [s[name] for s in scores["ref_holdout"]])
            ax.plot(fpr, tpr, color=colour, linewidth=width * 0.6, linestyle="--", drawstyle="steps-post",
                    label=f"reference, {label}: AUC {summary[f'ref_auc_{name}']:.3f}")
    if summary.get("privleak") is not None:
        ax.text(0.98, 0.03, f"PrivLeak (MUSE, Min-40%) {summary['privleak']:+.1f} %", ha="right", va="bottom",
                transform=ax.transAxes, fontsize=9)
    holdout = summary.get("holdout", {}).get("records")
    ax.set_title(f"membership inference: the texts against {holdout} holdout texts", fontsize=10)
    ax.set_xlabel("false positive rate (holdout texts taken for members)")
    ax.set_ylabel("true positive rate (texts taken for members)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    _legend_below(ax)


# ---------------------------------------------------------------- benchmarks

def plot_tradeoff(data: dict, path: str, title: str) -> None:
    """benchmarks/tradeoff.py: forget and retained MA, and the perplexity change, against the
    number of the mask's most-closed gates kept. ``data``: its JSON (``rows`` of ``k``,
    ``forget_ma``, ``at_reference``, ``retained_ma``, ``perplexity``; ``reference_ma``; and,
    when given, ``total_neurons`` (the ticks then give the share of the model's FFN neurons)
    and ``targets`` (``neurons``, ``retained_ma``, ``perplexity_change``: drawn as dotted lines))."""
    rows = sorted(data["rows"], key=lambda r: r["k"])
    base = next((r for r in rows if r["k"] == 0), rows[0])
    ks = [r["k"] for r in rows]
    total, targets = data.get("total_neurons"), data.get("targets") or {}
    linthresh = min([k for k in ks if k > 0] or [1])   # 0 (the model itself) on a log-like axis
    fig, (left, right) = _figure(2, title)
    left.plot(ks, [r["forget_ma"] for r in rows], "o-", color=KEPT, label="forget texts")
    left.plot(ks, [r["retained_ma"] for r in rows], "s-", color=NEUTRAL, label="retained texts")
    reference = data.get("reference_ma")
    if reference:
        left.axhline(sum(reference) / len(reference), **REFERENCE_STYLE,
                     label="forget texts under the reference model (mean)")
    if targets.get("retained_ma") is not None:
        left.axhline(targets["retained_ma"], color=NEUTRAL, linestyle=":", linewidth=1.4,
                     label=f"target: retained MA >= {targets['retained_ma']:g}")
    count = len(reference) if reference else None
    for r in rows:
        if count:
            left.annotate(f"{r['at_reference']}/{count}", (r["k"], r["forget_ma"]), textcoords="offset points",
                          xytext=(0, -13), ha="center", fontsize=7, color=KEPT)
    change = [100 * (r["perplexity"] / base["perplexity"] - 1) for r in rows]
    right.plot(ks, change, "o-", color=NEUTRAL, label="held-out perplexity")
    right.axhline(0, color="0.6", linewidth=1)
    if targets.get("perplexity_change") is not None:
        right.axhline(targets["perplexity_change"], color=NEUTRAL, linestyle=":", linewidth=1.4,
                      label=f"target: at most {targets['perplexity_change']:+g} %")
    for ax in (left, right):
        if targets.get("neurons"):
            share = f" ({100 * targets['neurons'] / total:.2g} %)" if total else ""
            ax.axvline(targets["neurons"], color="0.3", linestyle=":", linewidth=1.4,
                       label=f"target: at most {targets['neurons']:,} neurons{share}")
        _neurons_axis(ax, ks, linthresh, total)
        ax.grid(alpha=0.3)
    left.set_ylabel("mean MA (share of tokens)")
    left.set_ylim(0, 1.05)
    left.set_title("forgetting and what it costs, by neurons kept\n(n/N: forget texts at most the reference "
                   "model's MA + the tolerance)", fontsize=9)
    right.set_ylabel(f"held-out perplexity change (%; before: {base['perplexity']:.2f})")
    right.set_title("held-out perplexity, by neurons kept", fontsize=10)
    _legend_below(left, columns=2, offset=-0.2)
    _legend_below(right, columns=2, offset=-0.2)
    save(fig, path)


def _neurons_axis(ax, ks: Sequence[int], linthresh: float, total: int | None = None) -> None:
    """Log-like x axis with 0 on it, ticked at the measured counts (and their share of ``total``)."""
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_xlim(-0.3 * linthresh, max(ks) * 1.6)
    labels = [f"{k:,}" + (f"\n{100 * k / total:.2g} %" if total and k else "") for k in ks]
    ax.set_xticks(ks, labels, fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("neurons kept (the mask's most-closed gates)"
                  + (f"\nand their share of the {total:,} FFN neurons" if total else ""))


def plot_controls(data: dict, path: str, title: str) -> None:
    """benchmarks/controls.py: every method's retained MA against its held-out perplexity
    (up and to the left is better), filled when it met the forgetting target. ``data``: its
    JSON (``rows`` of ``method``, ``control``, ``forget_ma_mean``, ``retained_ma``,
    ``perplexity``, ``reached``)."""
    fig, (ax,) = _figure(1, title)
    rows = [r for r in data["rows"] if r.get("retained_ma") is not None and r.get("perplexity") is not None]
    palette = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
    for k, row in enumerate(rows):
        reached = row.get("reached")
        filled = reached is True or (isinstance(reached, float) and reached >= 1)
        marker = {"reference": "*", "before": "D"}.get(row["control"], "o")
        colour = palette[k % len(palette)]
        ax.scatter(row["perplexity"], row["retained_ma"], s=90 if marker == "*" else 50, marker=marker,
                   facecolor=colour if filled or marker != "o" else "white", edgecolor=colour, linewidth=1.5,
                   zorder=3, label=f"{row['method']} (forget MA {row['forget_ma_mean']:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("held-out perplexity (log scale)")
    ax.set_ylabel("retained MA (share of tokens)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"at matched forgetting ({data.get('target', {}).get('description', 'the target')});\n"
                 "circles: filled when the method met it, hollow when not", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    _legend_below(ax, columns=1)
    save(fig, path)


def plot_robustness(data: dict, path: str, title: str) -> None:
    """benchmarks/robustness.py: each model's forget MA along the relearning steps, and at full
    precision against each quantisation. ``data``: its JSON (``models`` of ``forget_ma`` per
    condition: ``fp32``, a quantisation type, ``relearn_N``)."""
    models = data["models"]
    fig, (left, right) = _figure(2, title)
    palette = {"memorizer": KEPT, "reference": "0.35", "muted": FORGOTTEN, "ga": "#CC79A7"}
    for name, row in models.items():
        steps = sorted(int(key.split("_")[1]) for key in row["forget_ma"] if key.startswith("relearn_"))
        xs = [0] + steps
        ys = [row["forget_ma"]["fp32"]] + [row["forget_ma"][f"relearn_{n}"] for n in steps]
        left.plot(xs, ys, marker="o", color=palette.get(name, NEUTRAL), label=name,
                  linestyle="--" if name == "reference" else "-")
    measured = sorted({0} | {int(key.split("_")[1]) for row in models.values() for key in row["forget_ma"]
                              if key.startswith("relearn_")})
    left.set_xticks(measured)
    left.set_xlabel("relearning steps on the forget texts' first halves")
    left.set_ylabel("forget MA (share of tokens)")
    left.set_ylim(0, 1.05)
    left.set_title("does it come back with fine-tuning?", fontsize=10)
    left.grid(alpha=0.3)
    _legend_below(left, columns=len(models))
    conditions = ["fp32"] + [c for c in next(iter(models.values()))["forget_ma"]
                             if c != "fp32" and not c.startswith("relearn_")]
    width = 0.8 / max(1, len(models))
    for k, (name, row) in enumerate(models.items()):
        xs = [j + (k - (len(models) - 1) / 2) * width for j in range(len(conditions))]
        right.bar(xs, [row["forget_ma"][c] for c in conditions], width=width, color=palette.get(name, NEUTRAL),
                  label=name, edgecolor="black", linewidth=0.4)
    right.set_xticks(range(len(conditions)), conditions)
    right.set_xlabel("weights (full precision, or through a llama.cpp format and back)")
    right.set_ylabel("forget MA (share of tokens)")
    right.set_ylim(0, 1.05)
    right.set_title("does it come back when quantised?", fontsize=10)
    right.grid(alpha=0.3, axis="y")
    _legend_below(right, columns=len(models))
    save(fig, path)


LOCALIZATION_KEYS = ("system", "modulated", "recall", "precision", "forgotten", "n_forget", "retained_ma_before",
                     "retained_ma_after", "ppl_before", "ppl_after")


def plot_localization(rows: Sequence[dict], path: str, title: str, total_neurons: int | None = None,
                      targets: dict | None = None) -> None:
    """Localisation across systems: recall against neurons modulated (log scale), and retained
    MA against the perplexity change (an arrow from before to after each system's edit).
    ``rows``: one dict per system with every key of :data:`LOCALIZATION_KEYS`; ``recall`` and
    ``precision`` may be None for a system whose neurons were not scored against the injected
    ones (it is then drawn in the second panel only), ``ppl_after`` None for one whose
    perplexity was measured another way (first panel only). ``total_neurons``: the model's FFN
    neurons (the ticks then give the share); ``targets``: ``recall`` and ``perplexity_change``
    (percent), drawn as dotted lines."""
    if not rows:
        raise NeumuterError("plot_localization: no rows to draw")
    for row in rows:
        missing = [key for key in LOCALIZATION_KEYS if key not in row]
        if missing:
            raise NeumuterError(f"plot_localization: row {row.get('system', '?')!r} has no {', '.join(missing)}")
        numbers = [row[key] for key in ("modulated", "ppl_before", "ppl_after", "retained_ma_before",
                                        "retained_ma_after", "recall", "precision") if row[key] is not None]
        if not all(math.isfinite(value) for value in numbers):
            raise NeumuterError(f"plot_localization: {row['system']} has a number that is not finite")
    targets = targets or {}
    fig, (left, right) = _figure(2, title)
    palette = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
    colours = {row["system"]: palette[k % len(palette)] for k, row in enumerate(rows)}
    _recall_panel(left, [row for row in rows if row["recall"] is not None], colours, total_neurons, targets)
    _cost_panel(right, [row for row in rows if row["ppl_after"] is not None], colours, targets)
    save(fig, path)


def _recall_panel(ax, rows: Sequence[dict], colours: dict, total: int | None, targets: dict) -> None:
    for row in rows:
        precision = "-" if row["precision"] is None else f"{row['precision']:.3f}"
        ax.scatter(row["modulated"], row["recall"], s=60, color=colours[row["system"]], edgecolor="black",
                   linewidth=0.5, zorder=3, label=f"{row['system']}: {row['modulated']:,} neurons, recall "
                                                  f"{row['recall']:.2f}, precision {precision}, forgot "
                                                  f"{row['forgotten']}/{row['n_forget']}")
    if targets.get("recall") is not None:
        ax.axhline(targets["recall"], color="0.3", linestyle=":", linewidth=1.4,
                   label=f"target: recall >= {targets['recall']:g}")
    ax.set_xscale("log")
    counts = [row["modulated"] for row in rows] or [1]
    low, high = min(counts) / 1.6, max(counts) * 1.6
    ax.set_xlim(low, high)
    ticks = [t for t in (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000) if low <= t <= high]
    ax.set_xticks(ticks, [f"{t:,}" + (f"\n{100 * t / total:.2g} %" if total else "") for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("neurons modulated (log scale)" + (f"\nand their share of the {total:,} FFN neurons" if total else ""))
    ax.set_ylabel("recall (per forget text, share of its neurons modulated)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("does it find the neurons that hold the memory?", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_below(ax, columns=1, offset=-0.2 if total else -0.13)


def _cost_panel(ax, rows: Sequence[dict], colours: dict, targets: dict) -> None:
    changes = {row["system"]: 100 * (row["ppl_after"] / row["ppl_before"] - 1) for row in rows}
    for row in rows:
        colour, change = colours[row["system"]], changes[row["system"]]
        ax.annotate("", xy=(change, row["retained_ma_after"]), xytext=(0, row["retained_ma_before"]),
                    arrowprops=dict(arrowstyle="->", color=colour, linewidth=1.4))
        ax.scatter([change], [row["retained_ma_after"]], s=50, color=colour, edgecolor="black", linewidth=0.5,
                   zorder=3, label=f"{row['system']} ({change:+.0f} %, forgot {row['forgotten']}/{row['n_forget']})")
    befores = {row["retained_ma_before"] for row in rows}
    ax.scatter([0] * len(befores), sorted(befores), s=40, marker="D", facecolor="white", edgecolor="black",
               zorder=3, label="before")
    if targets.get("perplexity_change") is not None:
        ax.axvline(targets["perplexity_change"], color="0.3", linestyle=":", linewidth=1.4,
                   label=f"target: perplexity at most {targets['perplexity_change']:+g} %")
    ax.axvline(0, color="0.6", linewidth=1)
    spread = max([abs(c) for c in changes.values()] + [1.0])
    if spread > 100:                   # a change of a few % beside one of hundreds: both in sight
        ax.set_xscale("symlog", linthresh=10)
        ticks = [t for t in (-100, -10, 0, 10, 100, 1000, 10000) if -spread * 2 <= t <= spread * 2]
        ax.set_xticks(ticks, [f"{t:+,}" if t else "0" for t in ticks])
        ax.minorticks_off()
    lowest, highest = min(0.0, *changes.values()), max(1.0, *changes.values())
    right_end = 10 ** math.ceil(math.log10(highest)) * 1.2 if spread > 100 else highest * 1.1 + 2
    ax.set_xlim(lowest - 0.08 * abs(lowest) - 2, right_end)
    ax.set_xlabel("held-out perplexity change (%" + (", symmetric log scale)" if spread > 100 else ")"))
    ax.set_ylabel("retained MA (share of tokens)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("and at what cost to the rest?", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_below(ax, columns=1)


# ---------------------------------------------------------------- the benchmarks' figure files

def figure_path(json_path: str | None, plot_path: str | None, no_plot: bool = False) -> str | None:
    """A benchmark's figure: ``plot_path`` if given, else beside its JSON output with .png."""
    if no_plot:
        return None
    if plot_path:
        return plot_path
    return os.path.splitext(json_path)[0] + ".png" if json_path else None


def check_figure_path(path: str | None) -> None:
    """Refuse, before a benchmark runs, a figure it could not write at the end."""
    from .records import check_output

    if path is None:
        return
    if not path.lower().endswith(".png"):
        raise NeumuterError(f"cannot write the figure {path}: give a file name ending in .png")
    check_output(path)


def benchmark_figure(draw: Callable[[dict, str, str], None], data: dict, path: str | None, title: str,
                     name: str) -> str | None:
    """Draw a benchmark's ``data`` to ``path`` (None: no figure). Without matplotlib the run is
    not lost: a note on stderr instead of the figure. Returns the path written, or None."""
    if path is None:
        return None
    try:
        draw(data, path, title)
    except MatplotlibMissing:
        print(f"{name}: {MISSING}; no figure written", file=sys.stderr)
        return None
    print(f"{name}: figure written to {path}", file=sys.stderr)
    return path


__all__ = ["MISSING", "MatplotlibMissing", "require_matplotlib", "save", "figure_path", "check_figure_path",
           "benchmark_figure", "plot_measure", "plot_tradeoff",
           "plot_controls", "plot_robustness", "plot_localization", "LOCALIZATION_KEYS"]
