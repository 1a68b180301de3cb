"""Localise by per-text attribution instead of gate training (`localize --method attribution`).

MemPi localises one sequence at a time. Here each forget text gets its own ranking of every FFN
neuron by first-order attribution, −∂CE/∂s at s = 1 (s: a scale on the neuron's input to the
down-projection; zeroing the neuron changes the text's loss by about that much). Optionally the
same attribution on the text's neighbours is subtracted, so neurons that every text of this
kind needs rank lower. Then each text keeps the smallest prefix of its own ranking that brings
it to its stopping point (its reference model's MA + tolerance, or eq. 17's threshold), found by
bisection, all texts at once: every probe is one batched teacher-forced pass in which each row
carries its own scales. The mask is the union of those prefixes, closed, every other gate open.

One forward and backward pass per text, then about log2(max_per_text) batched passes: no
epochs. The cost is that nothing is learnt jointly: where the texts share their neurons the
union forgets each of them further than its own prefix did.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import NeumuterError
from .config import ATTRIBUTION_SCORES as SCORES
from .models import FFNLayer, gated, input_device
from .text import pad, padding_id

#: rounds in which the texts that fail beside the others' neurons take longer prefixes
UNION_ROUNDS = 12

#: log_alpha of a closed gate: its deterministic value is exactly 0
CLOSED_LOG_ALPHA = -20.0


@dataclass
class AttributionResult:
    log_alpha: dict[int, torch.Tensor]
    per_text: list[int]            # prefix length each text needed (max_per_text when never reached)
    reached: list[bool]            # whether that prefix brought the text to its stopping point
    probes: int                    # batched passes of the bisection
    seconds: float


def _forward(model, layers, ids, mask, scales: list[torch.Tensor]):
    """Logits with per-row scales ``scales[i]`` (rows, neurons) on layer i's neuron inputs."""
    with gated(layers, lambda i: scales[i][:, None, :]):
        return model(input_ids=ids, attention_mask=mask).logits


def attribution(model, layers: Sequence[FFNLayer], ids_list: Sequence[Sequence[int]], pad_id: int,
                batch_size: int = 8, activations: bool = False):
    """(texts, neurons): −∂(mean token CE of text t)/∂s at s = 1, layers concatenated in order.
    With ``activations``, also (texts, neurons): the mean |input| of each neuron over the text's
    tokens (the same pass)."""
    device = input_device(model)
    widths = [layer.neurons for layer in layers]
    out, mean_abs = [], []
    for start in range(0, len(ids_list), batch_size):
        rows = ids_list[start:start + batch_size]
        ids, mask = (t.to(device) for t in pad(rows, pad_id))
        scales = [torch.ones(len(rows), w, device=device, requires_grad=True) for w in widths]
        seen = []
        hooks = [layer.module.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
                 for layer in layers] if activations else []
        try:
            logits = _forward(model, layers, ids, mask, scales)[:, :-1].float()
        finally:
            for hook in hooks:
                hook.remove()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                             reduction="none").view(len(rows), -1)
        weight = mask[:, 1:].float()
        ((ce * weight).sum(1) / weight.sum(1).clamp(min=1)).sum().backward()
        out.append(-torch.cat([s.grad for s in scales], dim=1).detach().cpu())
        if activations:
            tokens = mask.float()[..., None]
            mean_abs.append(torch.cat([(h.abs().float() * tokens).sum(1) / tokens.sum(1) for h in seen], 1).cpu())
    scores = torch.cat(out)
    return (scores, torch.cat(mean_abs)) if activations else scores


@torch.no_grad()
def row_ma(model, layers, ids, mask, scales) -> list[float]:
    logits = _forward(model, layers, ids, mask, scales)
    weight = mask[:, 1:].double()
    hits = (logits[:, :-1].argmax(-1) == ids[:, 1:]).double() * weight
    return (hits.sum(1) / weight.sum(1).clamp(min=1)).tolist()     # exact ratios, as memorization_accuracy


def localize_by_attribution(model, tokenizer, forget_ids: Sequence[Sequence[int]],
                            neighbour_ids: Sequence[Sequence[Sequence[int]]], layers: Sequence[FFNLayer],
                            limits: Sequence[float], max_per_text: int, contrast: float = 0.0,
                            score: str = "gradient", batch_size: int = 8,
                            progress: Callable[[str], None] | None = None) -> AttributionResult:
    """Per-text attribution rankings and their smallest passing prefixes (module docstring).

    ``limits``: one MA per text, its stopping point. ``contrast``: weight of the neighbours'
    mean attribution subtracted from the text's."""
    say = progress or (lambda message: None)
    if not forget_ids:
        raise NeumuterError("no forget records")
    if len(limits) != len(forget_ids):
        raise NeumuterError(f"{len(limits)} limits for {len(forget_ids)} forget texts")
    if max_per_text < 1:
        raise NeumuterError(f"max_per_text must be >= 1, not {max_per_text}")
    started = time.perf_counter()
    pad_id = padding_id(tokenizer)
    widths = [layer.neurons for layer in layers]
    max_per_text = min(max_per_text, sum(widths))
    scores = _scores(model, layers, forget_ids, neighbour_ids, pad_id, batch_size, contrast, score)
    say(f"attribution: {len(forget_ids)} texts ranked over {sum(widths)} neurons "
        f"({time.perf_counter() - started:.1f}s)")
    # ranking[t] = neuron indices (layers concatenated) of text t, most important first; ties by index
    ranking = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :max_per_text]
    passes = _Passes(model, layers, forget_ids, pad_id, limits, batch_size)
    high, reached, probes = _shortest_prefixes(passes, ranking, max_per_text, started, say)
    chosen, probes = _union(passes, ranking, high, max_per_text, probes, say)
    from .gates import initial_log_alpha

    flat = torch.where(chosen, torch.tensor(CLOSED_LOG_ALPHA), torch.tensor(initial_log_alpha()))
    log_alpha = {layer.index: part.clone() for layer, part in zip(layers, torch.split(flat, widths))}
    say(f"attribution: {int(chosen.sum())} neurons in the union of {len(forget_ids)} prefixes "
        f"({sum(not r for r in reached)} texts not at their stopping point within {max_per_text} neurons)")
    return AttributionResult(log_alpha, high, reached, probes, time.perf_counter() - started)


def _scores(model, layers, forget_ids, neighbour_ids, pad_id: int, batch_size: int, contrast: float,
            score: str) -> torch.Tensor:
    """(texts, neurons): how each text ranks the neurons (``score``: attribution.SCORES), less
    ``contrast`` times its neighbours' mean attribution."""
    scores, active = attribution(model, layers, forget_ids, pad_id, batch_size, activations=True)
    flat = [ids for group in neighbour_ids for ids in group]
    if score not in SCORES:
        raise NeumuterError(f"unknown score {score!r} (choose {', '.join(SCORES)})")
    if flat and (contrast or score != "gradient"):
        owner = torch.tensor([t for t, group in enumerate(neighbour_ids) for _ in group])
        nb, nb_active = attribution(model, layers, flat, pad_id, batch_size, activations=True)
        if contrast:
            mean = torch.zeros_like(scores).index_add_(0, owner, nb)
            counts = torch.bincount(owner, minlength=len(forget_ids)).clamp(min=1)
            scores = scores - contrast * mean / counts[:, None]
    if score != "gradient":
        # how much more the neuron fires on this text than on the other forget texts and the
        # neighbours: a neuron that every text uses ranks low however large its gradient
        context = torch.cat([active, nb_active]) if flat else active
        others = (context.sum(0, keepdim=True) - active) / max(1, context.shape[0] - 1)
        specific = active / (others + 1e-6)
        scores = specific if score == "specific" else scores.clamp(min=0) * specific
    if not torch.isfinite(scores).all():
        raise NeumuterError("the attribution is not finite (the model gives non-finite losses)")
    return scores


class _Passes:
    """Whether each forget text is at its stopping point with some neurons at 0: one batched
    teacher-forced pass, each row carrying its own scales."""

    def __init__(self, model, layers, forget_ids, pad_id: int, limits: Sequence[float], batch_size: int):
        self.model, self.layers, self.limits, self.batch_size = model, layers, limits, batch_size
        self.widths = [layer.neurons for layer in layers]
        self.texts = len(forget_ids)
        self.device = input_device(model)
        self.ids, self.mask = (t.to(self.device) for t in pad(forget_ids, pad_id))

    def __call__(self, closed_in_row) -> list[bool]:
        """``closed_in_row(t)``: the neurons (layers concatenated) closed for text t."""
        passed = []
        for start in range(0, self.texts, self.batch_size):
            rows = list(range(start, min(start + self.batch_size, self.texts)))
            flat = torch.ones(len(rows), sum(self.widths))
            for r, t in enumerate(rows):
                flat[r, closed_in_row(t)] = 0.0
            scales = [part.to(self.device) for part in torch.split(flat, self.widths, dim=1)]
            width = int(self.mask[rows].sum(1).max())
            values = row_ma(self.model, self.layers, self.ids[rows, :width], self.mask[rows, :width], scales)
            passed.extend(v <= self.limits[t] + 1e-9 for v, t in zip(values, rows))
        return passed


def _shortest_prefixes(passes: _Passes, ranking: torch.Tensor, max_per_text: int, started: float, say
                       ) -> tuple[list[int], list[bool], int]:
    """Per text, by bisection over all texts at once, the shortest prefix of its ranking that
    brings it to its stopping point (``max_per_text`` when none does): (prefixes, reached,
    probes)."""
    def probe(prefix: list[int]) -> list[bool]:
        return passes(lambda t: ranking[t, :prefix[t]])

    n = passes.texts
    low, high = [0] * n, [max_per_text] * n     # invariant: prefix low fails, prefix high passes
    probes = 0
    at_zero = probe([0] * n)
    at_max = probe([max_per_text] * n)
    probes += 2
    reached = list(at_max)
    for t in range(n):
        if at_zero[t]:
            high[t] = 0
        elif not at_max[t]:
            low[t] = high[t] = max_per_text
    while any(h - lo > 1 for lo, h in zip(low, high)):
        middle = [(lo + h) // 2 if h - lo > 1 else h for lo, h in zip(low, high)]
        passed = probe(middle)
        probes += 1
        for t in range(n):
            if high[t] - low[t] > 1:
                if passed[t]:
                    high[t] = middle[t]
                else:
                    low[t] = middle[t]
        say(f"  bisection {probes}: prefixes {min(high)}..{max(high)} neurons per text "
            f"({time.perf_counter() - started:.1f}s)")
    return high, reached, probes


def _union(passes: _Passes, ranking: torch.Tensor, high: list[int], max_per_text: int, probes: int, say
           ) -> tuple[torch.Tensor, int]:
    """The union of the texts' prefixes (a bool per neuron), grown where it fails a text: the
    prefixes interact, a text that passed alone can fail beside the others' neurons (the memories
    were learnt together), so such a text's prefix grows until the union passes. ``high`` grows
    in place; returns the union and the probes counted so far."""
    def union(prefix: list[int]) -> torch.Tensor:
        chosen = torch.zeros(sum(passes.widths), dtype=torch.bool)
        for t in range(passes.texts):
            chosen[ranking[t, :prefix[t]]] = True
        return chosen

    chosen = union(high)
    for _ in range(UNION_ROUNDS):
        failing = [t for t, ok in enumerate(passes(lambda t: chosen)) if not ok and high[t] < max_per_text]
        probes += 1
        if not failing:
            break
        for t in failing:
            high[t] = min(max_per_text, max(high[t] + 1, math.ceil(high[t] * 1.25)))
        chosen = union(high)
        say(f"  union: {len(failing)} texts above their stopping point beside the others; their prefixes grow "
            f"({int(chosen.sum())} neurons)")
    return chosen, probes
