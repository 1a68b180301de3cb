"""Rollback toward a base model: each FFN neuron is moved between the base model's weights and
the model's by one number m,

    W(m) = W_base + m · (W − W_base)

applied to the neuron's rows of the FFN input projections (gate and up, or the first linear,
with their biases) and to its column of the down-projection. m = 1 keeps the neuron, m = 0
reverts it to the base model. A fine-tune adds what it memorised on top of what the base
model knew; reverting a neuron removes only the fine-tune's part, where scaling it to 0 (the
paper) removes both.

While training, the interpolation runs as forward hooks that add (m − 1) times the
fine-tune's change to each projection's output (only the differences are kept in memory);
:func:`fold` writes W(m) into the weights with ``torch.lerp``, exact at m = 0 and m = 1.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import NeumuterError, offload
from .models import FFNLayer, model_type, find_ffn_layers, fingerprint, input_device, linear_dims

#: a model whose weight matrices are further than this from BASE's does not descend from it:
#: its neurons do not correspond. The distance is ‖θ − θ_base‖ / √((‖θ‖² + ‖θ_base‖²) / 2) over
#: every weight matrix: 0 for the same weights, √2 ≈ 1.41 for uncorrelated ones of any size, 1
#: where the weights are as much unlike as alike (cosine 0.5 for equal norms).
#: Measured (docs/method.md, "Rollback"): the SmolLM2 fixture's fine-tune 0.013 from its base,
#: its sibling fine-tune 0.011, the two fine-tunes 0.008 from each other; a tiny model whose FFN
#: block was fine-tuned hard (150 AdamW steps at 1e-2) 0.59; a model against a fresh
#: initialisation of its architecture, or two tiny models trained from different seeds, 1.41.
ANCESTRY_LIMIT = 1.0


class NotAnAncestor(NeumuterError):
    """BASE cannot be rolled back toward: another architecture, other shapes, or weights so far
    from the model's that its neurons do not correspond."""


@dataclass
class InputProjection:
    """One FFN input projection (gate_proj, up_proj, c_fc, fc1 ...): its rows are the neurons."""

    name: str
    module: nn.Module
    conv1d: bool
    parts: int = 1      # a fused projection (phi3's gate_up_proj) holds its neurons' rows in `parts` chunks

    def rows_of(self, neurons: torch.Tensor, width: int) -> torch.Tensor:
        """The rows of the neurons ``neurons`` (indices, of ``width``), in every chunk."""
        return torch.cat([neurons + part * width for part in range(self.parts)])


@dataclass
class NeuronChange:
    """What the fine-tune changed in one block's FFN, per neuron, as (out, in) matrices."""

    layer: FFNLayer
    inputs: list[InputProjection]
    input_deltas: list[tuple[torch.Tensor, torch.Tensor | None]]   # (W − W_base (neurons, hidden), b − b_base)
    down_delta: torch.Tensor                                          # (hidden, neurons)
    changed: torch.Tensor                                             # bool (neurons,)
    size: torch.Tensor                                                # ‖Δ‖ / ‖W_base‖ of each neuron's weights


def input_projections(model: nn.Module, layer: FFNLayer) -> list[InputProjection]:
    """The linear maps of ``layer``'s FFN whose outputs are its neurons: the modules beside the
    down-projection (in its parent module) mapping to its width, or to a multiple of it (a fused
    projection whose output is chunked: rows i, i + width, ... belong to neuron i)."""
    parent_path = layer.path.rsplit(".", 1)[0]
    parent = model.get_submodule(parent_path)
    found = []
    for name, module in parent.named_modules():
        dims = linear_dims(module)
        if module is not layer.module and dims and dims[1] % layer.neurons == 0 and dims[0] != layer.neurons:
            found.append(InputProjection(f"{parent_path}.{name}", module, dims[2], dims[1] // layer.neurons))
    if not found:
        raise NeumuterError(f"block {layer.index}: no FFN input projection with {layer.neurons} outputs beside "
                            f"{layer.path}; --base needs the FFN's input linear maps")
    return found


def _rows(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """The weight as (out, in): one row per output (a neuron, for an input projection)."""
    weight = offload.read(module, "weight")
    return weight.t() if conv1d else weight


def _columns(layer: FFNLayer) -> torch.Tensor:
    """The down-projection weight as (out, neurons)."""
    weight = offload.read(layer.module, "weight")
    return weight.t() if layer.conv1d else weight


@torch.no_grad()
def check_ancestor(model: nn.Module, base: nn.Module, name: str = "the model", base_name: str = "BASE") -> float:
    """Refuse a base model whose neurons do not correspond to the model's: another architecture,
    another set of weights or shapes, or weights further apart than :data:`ANCESTRY_LIMIT`.
    Returns their distance."""
    if model_type(model) != model_type(base):
        raise NotAnAncestor(f"{base_name} is a {model_type(base)!r} model and {name} a {model_type(model)!r} "
                            "one: --base needs the checkpoint the model was fine-tuned from")
    own, theirs = model.state_dict(), base.state_dict()
    if set(own) != set(theirs):
        extra = sorted(set(own) ^ set(theirs))[0]
        raise NotAnAncestor(f"{base_name} and {name} do not have the same weights ({extra} is in one only): "
                            "--base needs the checkpoint the model was fine-tuned from")
    difference = norm = base_norm = 0.0
    for key, tensor in own.items():
        other = theirs[key]
        if tuple(tensor.shape) != tuple(other.shape):
            raise NotAnAncestor(f"{base_name} has {key} of shape {list(other.shape)}, {name} {list(tensor.shape)}: "
                                "--base needs the checkpoint the model was fine-tuned from")
        if not tensor.is_floating_point() or tensor.dim() < 2:
            continue
        a, b = _dense(model, key, tensor), _dense(base, key, other)
        difference += float((a.float() - b.to(a.device).float()).pow(2).sum())
        norm += float(a.float().pow(2).sum())
        base_norm += float(b.float().pow(2).sum())
    if not all(map(math.isfinite, (difference, norm, base_norm))):
        raise NotAnAncestor(f"{base_name} or {name} holds non-finite weights")
    scale = math.sqrt((norm + base_norm) / 2)
    distance = math.sqrt(difference) / scale if scale > 0 else 0.0
    if distance > ANCESTRY_LIMIT:
        raise NotAnAncestor(
            f"{base_name} is not an ancestor of {name}: their weights are {distance:.2f} apart (fine-tunes stay below "
            f"{ANCESTRY_LIMIT}, unrelated weights are 1.41 apart), so its neurons do not correspond to the model's (a model "
            "trained from another initialisation?); --base needs the checkpoint the model was fine-tuned from")
    return distance


def _dense(model: nn.Module, key: str, tensor: torch.Tensor) -> torch.Tensor:
    if offload.is_offloaded(tensor):
        return offload.stored(model, key)[0]
    return tensor


@torch.no_grad()
def neuron_changes(model: nn.Module, base: nn.Module, layers: Sequence[FFNLayer] | None = None
                   ) -> dict[int, NeuronChange]:
    """Per block of ``layers`` (default: all), what the fine-tune changed in its FFN neurons:
    the differences W − W_base (on the model's devices, in its dtype), which neurons changed at
    all, and the relative size of each neuron's change. ``base`` is checked with
    :func:`check_ancestor` first."""
    layers = find_ffn_layers(model) if layers is None else layers
    base_layers = {layer.index: layer for layer in find_ffn_layers(base)}
    changes = {}
    for layer in layers:
        base_layer = base_layers[layer.index]
        inputs, base_inputs = input_projections(model, layer), input_projections(base, base_layer)
        if [p.name for p in inputs] != [p.name for p in base_inputs]:
            raise NotAnAncestor(f"block {layer.index}: BASE's FFN input projections differ from the model's")
        deltas = []
        changed = torch.zeros(layer.neurons, dtype=torch.bool)
        size_sq = torch.zeros(layer.neurons, dtype=torch.float64)
        base_sq = torch.zeros(layer.neurons, dtype=torch.float64)
        for own, theirs in zip(inputs, base_inputs):
            w = _rows(own.module, own.conv1d)
            w_base = _rows(theirs.module, theirs.conv1d).to(w.device)
            delta = w.float() - w_base.float()
            bias = getattr(own.module, "bias", None)
            bias_delta = None
            if bias is not None:
                own_bias = offload.read(own.module, "bias")
                bias_delta = own_bias.float() - offload.read(theirs.module, "bias").float().to(own_bias.device)
            def per_neuron(values: torch.Tensor, parts=own.parts) -> torch.Tensor:   # sum over the chunks
                return values.reshape(parts, -1).sum(0).cpu()
            changed |= per_neuron((w != w_base).any(1).double()) > 0
            size_sq += per_neuron(delta.double().pow(2).sum(1))
            if bias_delta is not None:
                changed |= per_neuron((bias_delta != 0).double()) > 0
                size_sq += per_neuron(bias_delta.double().pow(2))
            base_sq += per_neuron(w_base.double().pow(2).sum(1))
            deltas.append((delta.to(w.dtype), None if bias_delta is None else bias_delta.to(w.dtype)))
        down, down_base = _columns(layer), _columns(base_layer)
        down_base = down_base.to(down.device)
        down_delta = down.float() - down_base.float()
        changed |= (down != down_base).any(0).cpu()
        size_sq += down_delta.double().pow(2).sum(0).cpu()
        base_sq += down_base.double().pow(2).sum(0).cpu()
        size = (size_sq / base_sq.clamp(min=1e-30)).sqrt().float()
        changes[layer.index] = NeuronChange(layer, inputs, deltas, down_delta.to(down.dtype), changed, size)
    return changes


@contextlib.contextmanager
def interpolated(changes: Sequence[NeuronChange], gate_fn: Callable[[int], torch.Tensor]) -> Iterator[None]:
    """Each block's FFN neurons at W(m), m = ``gate_fn(i)`` (i = position in ``changes``), by
    forward hooks that add (m − 1) · ΔW x to each projection; removed afterwards, whatever happens.
    The input projections and the down-projection of a block see the same m in one forward pass."""
    handles = []
    try:
        for position, change in enumerate(changes):
            for projection, (delta, bias_delta) in zip(change.inputs, change.input_deltas):
                def input_hook(module, args, output, position=position, delta=delta, bias_delta=bias_delta,
                               parts=projection.parts):
                    m = gate_fn(position).to(dtype=output.dtype, device=output.device).repeat(parts)
                    return output + (m - 1) * F.linear(args[0], delta.to(output.dtype), None if bias_delta is None
                                                       else bias_delta.to(output.dtype))
                handles.append(projection.module.register_forward_hook(input_hook))

            def down_hook(module, args, output, position=position, delta=change.down_delta):
                m = gate_fn(position).to(dtype=output.dtype, device=output.device)
                return output + F.linear(args[0] * (m - 1), delta.to(output.dtype))
            handles.append(change.layer.module.register_forward_hook(down_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def rolled_back(model: nn.Module, changes: dict[int, NeuronChange], scales: dict[int, torch.Tensor]
                ) -> Iterator[None]:
    """The model with each named block's FFN neurons at W(m), m their scales (as a scales file
    holds them), by hooks while inside: the numbers :func:`fold` gives, without touching a weight."""
    blocks = [b for b in sorted(scales) if b in changes]
    device = input_device(model)
    factors = [scales[b].to(device) for b in blocks]
    with interpolated([changes[b] for b in blocks], lambda i: factors[i]):
        yield


@torch.no_grad()
def fold(model: nn.Module, base: nn.Module, scales: dict[int, torch.Tensor]) -> dict[int, int]:
    """Write W(m) = lerp(W_base, W, m) into the model's weights for every neuron whose scale m is
    not 1 (exact at m = 0: the base model's weights, bit for bit). Returns, per block, the number
    of neurons changed."""
    layers = {layer.index: layer for layer in find_ffn_layers(model)}
    base_layers = {layer.index: layer for layer in find_ffn_layers(base)}
    counts = {}
    for block, scale in sorted(scales.items()):
        layer, base_layer = layers[block], base_layers[block]
        chosen = (scale != 1.0).nonzero().flatten()
        counts[block] = int(chosen.numel())
        if not counts[block]:
            continue
        m = scale[chosen].double()
        for own, theirs in zip(input_projections(model, layer), input_projections(base, base_layer)):
            rows, factors = own.rows_of(chosen, layer.neurons), m.repeat(own.parts)
            _lerp_rows(own.module, theirs.module, "weight", rows, factors, transposed=own.conv1d)
            if getattr(own.module, "bias", None) is not None:
                _lerp_rows(own.module, theirs.module, "bias", rows, factors, transposed=False)
        _lerp_rows(layer.module, base_layer.module, "weight", chosen, m, transposed=not layer.conv1d)
    return counts


def _lerp_rows(module: nn.Module, base_module: nn.Module, name: str, index: torch.Tensor, m: torch.Tensor,
               transposed: bool) -> None:
    """Set entries ``index`` along the neuron axis (dim 0, or dim 1 when ``transposed``) of
    ``module.name`` to lerp(base, own, m), computed in float64 and rounded once."""
    weight = offload.read(module, name)
    base_weight = offload.read(base_module, name).to(weight.device)
    own = weight.t() if transposed else weight
    theirs = base_weight.t() if transposed else base_weight
    index = index.to(weight.device)
    start, end = theirs.index_select(0, index).double(), own.index_select(0, index).double()
    factor = m.to(weight.device).reshape(-1, *([1] * (own.dim() - 1)))
    mixed = torch.lerp(start, end, factor).to(weight.dtype)
    updated = own.clone()
    updated.index_copy_(0, index, mixed)
    updated = updated.t() if transposed else updated
    if offload.is_offloaded(getattr(module, name)):
        offload.write(module, name, updated.contiguous())
    else:
        getattr(module, name).copy_(updated)


def base_record(base: nn.Module, name: str) -> dict:
    """What mask and scales files and the checkpoint record of the base model."""
    return {"model": name, "fingerprint": fingerprint(base)}


__all__ = ["ANCESTRY_LIMIT", "NotAnAncestor", "InputProjection", "NeuronChange", "input_projections",
           "check_ancestor", "neuron_changes", "interpolated", "rolled_back", "fold", "base_record"]
