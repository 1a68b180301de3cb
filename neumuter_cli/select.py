"""Selection (paper sec. 3.1): turn a trained mask into per-neuron scale factors (eq. 14).

Every rule works on the deterministic gate values ``m = clamp(sigmoid(log_alpha)·(ζ-γ)+γ, 0, 1)``
of all masked neurons together (every masked block pooled), and never selects a neuron whose
gate is exactly 1.0: such a neuron is untouched by the mask, and scaling it by 1 is a no-op.

Rules (``rule``, ``value``):

- ``"energy", F`` (the paper's rule, default F = 0.05): sort all gate values ascending,
  ``v_1 ≤ … ≤ v_N``, accumulate the energy ``C_k = |v_1| + … + |v_k|``, and let ``k*`` be the
  first position with ``C_k ≥ F · C_N``. The threshold is ``ε = v_{k*}`` and the selected
  neurons are those with ``m < ε`` (strictly). Ties are therefore decided by value, not by
  position: a group of equal values that straddles the cut is left out entirely, so the
  selected neurons always carry less than F of the total energy, and the result does not
  depend on the order of the blocks. Since ``ε ≤ max m ≤ 1``, gates at 1.0 are never selected;
  when the F point falls among them (few gates moved), every gate below 1.0 is selected.
  When every gate is 0 the total energy is 0 and every gate is selected (``ε = 0``): each is
  fully closed (a rollback of every changed neuron, `localize --base`'s last resort).
- ``"threshold", X`` (X > 0): the neurons with ``m < X`` and ``m < 1``
  (the public code's fixed cut is X = 0.15).
- ``"top-fraction", F`` (0 < F ≤ 1): the ``n = floor(F · N)`` lowest gate values, N the number
  of masked neurons; ties at the cut are broken by position (lower block, then lower neuron
  index first), and gates at 1.0 are skipped, so fewer than n may be selected.

A selected neuron's scale is its gate value, every other neuron's is 1.0.
"""
from __future__ import annotations

import math
import re

import torch

from . import NeumuterError, __version__
from .artifacts import FORMAT_VERSION, MASK_KIND, SCALES_KIND, check_kind
from .errors import SettingError, escape
from .gates import deterministic_gate

RULES = ("energy", "threshold", "top-fraction")
DEFAULT_RULE = ("energy", 0.05)

_PROVENANCE = ("model", "architecture", "fingerprint", "modules", "neurons", "layers",
               "hyperparameters", "forget_sha256", "losses", "base")


# ---------------------------------------------------------------- the tensors of a mask or scales file

def _block_tensors(tensors: dict[str, torch.Tensor], meta: dict, prefix: str, name: str) -> dict[int, torch.Tensor]:
    """``{prefix}.{block}`` tensors → {block: 1-D float32 tensor}, checked against the metadata
    (whose kind and format version :func:`artifacts.check_kind` has checked)."""
    neurons = meta.get("neurons")
    if not isinstance(neurons, list) or not all(isinstance(n, int) for n in neurons):
        raise NeumuterError(f"{name}: metadata has no valid \"neurons\" list")
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)")
    blocks: dict[int, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = pattern.fullmatch(key)
        if not match:
            raise NeumuterError(f"{name}: unexpected tensor {key!r} (expected {prefix}.BLOCK)")
        block = int(match.group(1))
        if not 0 <= block < len(neurons):
            raise NeumuterError(f"{name}: tensor {key} names block {block}, but the model has {len(neurons)} blocks")
        if tensor.dim() != 1 or tensor.numel() != neurons[block]:
            raise NeumuterError(f"{name}: tensor {key} has shape {tuple(tensor.shape)}, "
                                f"block {block} has {neurons[block]} neurons")
        if not tensor.is_floating_point():
            raise NeumuterError(f"{name}: tensor {key} is not floating point")
        blocks[block] = tensor.float()
    if not blocks:
        raise NeumuterError(f"{name}: no {prefix}.BLOCK tensors")
    layers = meta.get("layers")
    if layers is not None and (not isinstance(layers, list)
                               or not all(isinstance(b, int) and not isinstance(b, bool) for b in layers)):
        raise NeumuterError(f"{name}: metadata \"layers\" is not a list of block numbers")
    if layers is not None and sorted(layers) != sorted(blocks):
        raise NeumuterError(f"{name}: metadata lists blocks {sorted(layers)}, tensors are for {sorted(blocks)}")
    return dict(sorted(blocks.items()))


def mask_log_alpha(tensors: dict[str, torch.Tensor], meta: dict, name: str = "mask") -> dict[int, torch.Tensor]:
    """The ``log_alpha.{block}`` tensors of a loaded mask file, by block."""
    return _block_tensors(tensors, meta, "log_alpha", name)


def mask_gates(tensors: dict[str, torch.Tensor], meta: dict, name: str = "mask") -> dict[int, torch.Tensor]:
    """The deterministic gate value of every masked neuron, by block, from a loaded mask file."""
    return {block: deterministic_gate(alpha) for block, alpha in mask_log_alpha(tensors, meta, name).items()}


def scales_by_block(tensors: dict[str, torch.Tensor], meta: dict, name: str = "scales") -> dict[int, torch.Tensor]:
    """The ``scale.{block}`` tensors of a loaded scales file, by block."""
    return _block_tensors(tensors, meta, "scale", name)


# ---------------------------------------------------------------- the rules

def check_rule(rule: str, value: float) -> None:
    if rule not in RULES:
        raise NeumuterError(f"unknown selection rule {rule!r} (choose {', '.join(RULES)})")
    setting = rule.replace("-", "_")   # the rule's value is the setting of the same name
    if not math.isfinite(value):
        raise SettingError(setting, f"must be a finite number, not {value}")
    if rule in ("energy", "top-fraction") and not 0 < value <= 1:
        raise SettingError(setting, f"is a fraction: it must be in (0, 1], not {value}")
    if rule == "threshold" and value <= 0:
        raise SettingError(setting, f"must be > 0 (no gate value is below {value})")


def energy_threshold(values: torch.Tensor, fraction: float) -> float:
    """ε of the energy rule: sort ascending, accumulate |v|, and return the first value at
    which the cumulative energy reaches ``fraction`` of the total (see the module docstring)."""
    flat = values.detach().reshape(-1).to("cpu", torch.float64)
    if flat.numel() == 0:
        raise NeumuterError("no gate values to select from")
    ordered = flat.sort().values
    cumulative = ordered.abs().cumsum(0)
    target = fraction * cumulative[-1]
    k = int(torch.searchsorted(cumulative, target.reshape(1), side="left")[0])
    return float(ordered[min(k, ordered.numel() - 1)])


def select(gate_values: dict[int, torch.Tensor], rule: str = DEFAULT_RULE[0], value: float = DEFAULT_RULE[1]
           ) -> tuple[dict[int, torch.Tensor], float | None]:
    """Which neurons a rule selects: ({block: bool tensor}, ε).

    ε is the cut (``m < ε``) for the energy and threshold rules, and the largest selected gate
    value for top-fraction (None when nothing is selected)."""
    check_rule(rule, value)
    blocks = sorted(gate_values)
    if not blocks:
        raise NeumuterError("no gate values to select from")
    gates = {b: gate_values[b].detach().reshape(-1).to("cpu", torch.float32) for b in blocks}
    moved = {b: g < 1.0 for b, g in gates.items()}
    if rule in ("energy", "threshold"):
        epsilon = energy_threshold(torch.cat(list(gates.values())), value) if rule == "energy" else float(value)
        if rule == "energy" and all(not g.any() for g in gates.values()):
            return moved, 0.0                  # every gate closed: no energy, and every neuron muted
        chosen = {b: (gates[b].double() < epsilon) & moved[b] for b in blocks}
        return chosen, epsilon
    every = torch.cat([gates[b] for b in blocks])
    count = math.floor(round(value * every.numel(), 6))
    order = torch.sort(every, stable=True).indices[:count]
    flags = torch.zeros(every.numel(), dtype=torch.bool)
    flags[order] = True
    flags &= every < 1.0
    chosen, start = {}, 0
    for b in blocks:
        chosen[b] = flags[start:start + gates[b].numel()].clone()
        start += gates[b].numel()
    epsilon = float(every[flags].max()) if flags.any() else None
    return chosen, epsilon


def select_neurons(gate_values: dict[int, torch.Tensor], rule: str = DEFAULT_RULE[0], value: float = DEFAULT_RULE[1]
                   ) -> dict[int, torch.Tensor]:
    """Scale factors (eq. 14): the gate value for each selected neuron, 1.0 for the others."""
    chosen, _ = select(gate_values, rule, value)
    return {b: _scales(gate_values[b], chosen[b]) for b in chosen}


def _scales(gates: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    gates = gates.detach().reshape(-1).to("cpu", torch.float32)
    return torch.where(chosen, gates, torch.ones_like(gates))


# ---------------------------------------------------------------- the stage

def select_from_mask(tensors: dict[str, torch.Tensor], meta: dict, rule: str = DEFAULT_RULE[0],
                     value: float = DEFAULT_RULE[1],
                     mask_sha256: str | None = None, name: str = "mask"
                     ) -> tuple[dict[str, torch.Tensor], dict]:
    """A loaded mask file → (scales tensors ``scale.{block}``, scales metadata)."""
    check_kind(meta, MASK_KIND, name)
    gate_values = mask_gates(tensors, meta, name)
    chosen, epsilon = select(gate_values, rule, value)
    scales = {b: _scales(gate_values[b], chosen[b]) for b in chosen}
    per_layer = {str(b): int(chosen[b].sum()) for b in chosen}
    metadata = {"kind": SCALES_KIND, "format_version": FORMAT_VERSION}
    metadata.update({key: meta[key] for key in _PROVENANCE if key in meta})
    metadata["layers"] = sorted(gate_values)
    metadata.update({
        "rule": {"name": rule, "value": value},
        "epsilon": epsilon,
        "selected": sum(per_layer.values()),
        "selected_per_layer": per_layer,
        "total_neurons": sum(g.numel() for g in gate_values.values()),
        "mask_sha256": mask_sha256,
        "mask_tool_version": meta.get("tool_version"),
        "tool_version": __version__,
    })
    return {f"scale.{b}": s for b, s in scales.items()}, metadata


def summary_rows(metadata: dict) -> list[list]:
    """Per masked block: block, module, neurons, selected, share (%); then the total."""
    modules = metadata.get("modules") or []
    neurons = metadata.get("neurons") or []
    rows = []
    for block in metadata["layers"]:
        count = metadata["selected_per_layer"][str(block)]
        width = neurons[block]
        module = escape(modules[block]) if block < len(modules) else ""
        rows.append([block, module, width, count, f"{100 * count / width:.2f}"])
    total = metadata["total_neurons"]
    rows.append(["total", "", total, metadata["selected"], f"{100 * metadata['selected'] / total:.2f}"])
    return rows
