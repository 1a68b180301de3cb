"""`inspect`: a model's decoder blocks and FFN widths, and with a base model, where the
fine-tune changed its FFN neurons (the space `localize --base` searches)."""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable

from .config import LoadOptions


def run_inspect(model: str, load: LoadOptions | None = None, base: str | None = None,
                progress: Callable[[str], None] | None = None) -> dict:
    """Load ``model`` (and ``base``) and describe each block's FFN: its down-projection, its
    neurons and, with ``base``, how many of them the fine-tune changed and by how much (the
    relative size ‖Δw‖ / ‖w_base‖ of each neuron's weights: its input rows and down column)."""
    from .models import check_same_tokenizer, find_ffn_layers, load_model, model_type

    load = load or LoadOptions()
    say = progress or (lambda message: None)
    say(f"loading {model}")
    lm, tokenizer = load_model(model, **asdict(load))
    layers = find_ffn_layers(lm)
    blocks = [{"block": layer.index, "down_projection": layer.path, "neurons": layer.neurons,
               "weight": layer.orientation} for layer in layers]
    report = {"model": model, "architecture": model_type(lm),
              "dtype": str(next(lm.parameters()).dtype).replace("torch.", ""),
              "blocks": blocks, "total_neurons": sum(layer.neurons for layer in layers)}
    if base is not None:
        from .rollback import check_ancestor, neuron_changes

        say(f"loading {base} (the base model)")
        base_model, base_tokenizer = load_model(base, **asdict(load))
        check_same_tokenizer(tokenizer, base_tokenizer, model, f"base model {base}")
        report["base"] = {"model": base, "distance": round(check_ancestor(lm, base_model, model,
                                                                          f"base model {base}"), 6)}
        changes = neuron_changes(lm, base_model, layers)
        for row, layer in zip(blocks, layers):
            change = changes[layer.index]
            sizes = change.size[change.changed]
            row["changed"] = int(change.changed.sum())
            row["changed_share"] = round(row["changed"] / layer.neurons, 6)
            row["change_median"] = round(float(sizes.median()), 6) if len(sizes) else 0.0
            row["change_max"] = round(float(sizes.max()), 6) if len(sizes) else 0.0
        report["changed_neurons"] = sum(row["changed"] for row in blocks)
    return report


def inspect_rows(report: dict) -> tuple[list[list], list[str]]:
    """The table `inspect` prints: rows and headers."""
    headers = ["block", "down-projection", "neurons", "weight"]
    if "base" in report:
        headers += ["changed", "%", "change (median)", "change (max)"]
    rows = []
    for row in report["blocks"]:
        line = [row["block"], row["down_projection"], row["neurons"], row["weight"]]
        if "base" in report:
            line += [row["changed"], f"{100 * row['changed_share']:.1f}", f"{row['change_median']:.4f}",
                     f"{row['change_max']:.4f}"]
        rows.append(line)
    return rows, headers


__all__ = ["run_inspect", "inspect_rows"]
