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


def rank_neurons(model, layers: Sequence[FFNLayer], forget_ids, neighbour_ids, pad_id: int, contrast: float,
                 score: str, batch_size: int) -> torch.Tensor:
    """(texts, neurons): each text's score of every neuron (layers concatenated), higher first."""
    if score not in SCORES:
        raise NeumuterError(f"unknown score {score!r} (choose {', '.join(SCORES)})")
    scores, active = attribution(model, layers, forget_ids, pad_id, batch_size, activations=True)
    flat = [ids for group in neighbour_ids for ids in group]
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
        if score == "specific-smoothed":
            # a neuron nearly silent everywhere would rank high on noise: add its layer's mean
            # activation on the others below the line
            widths = [layer.neurons for layer in layers]
            floor = torch.cat([part.mean(1, keepdim=True).expand_as(part)
                               for part in torch.split(others, widths, dim=1)], dim=1)
            scores = active / (others + floor + 1e-6)
        else:
            specific = active / (others + 1e-6)
            scores = specific if score == "specific" else scores.clamp(min=0) * specific
    if not torch.isfinite(scores).all():
        raise NeumuterError("the attribution is not finite (the model gives non-finite losses)")
    return scores


def stopping_check(model, layers, forget_ids, pad_id: int, limits, batch_size: int):
    """A function of ``closed_in_row`` (text -> indices of the neurons closed in its row) that
    says whether each text is at its stopping point: batched teacher-forced passes in which
    each row carries its own closed neurons."""
    device = input_device(model)
    widths = [layer.neurons for layer in layers]
    total = sum(widths)
    ids, mask = (t.to(device) for t in pad(forget_ids, pad_id))

    def passes(closed_in_row) -> list[bool]:
        passed = []
        for start in range(0, len(forget_ids), batch_size):
            rows = list(range(start, min(start + batch_size, len(forget_ids))))
            flat = torch.ones(len(rows), total)
            for r, t in enumerate(rows):
                flat[r, closed_in_row(t)] = 0.0
            scales = [part.to(device) for part in torch.split(flat, widths, dim=1)]
            width = int(mask[rows].sum(1).max())
            values = row_ma(model, layers, ids[rows, :width], mask[rows, :width], scales)
            passed.extend(v <= limits[t] + 1e-9 for v, t in zip(values, rows))
        return passed

    return passes


class PrefixSearch:
    """Prefixes of each text's ranking (``ranking[t]``: neuron indices, most important first),
    judged by ``check`` (:func:`stopping_check`), which counts as one probe per call."""

    def __init__(self, ranking: torch.Tensor, total: int, check, say: Callable[[str], None] = lambda m: None,
                 started: float | None = None):
        self.ranking, self.total, self.check, self.say = ranking, total, check, say
        self.started = time.perf_counter() if started is None else started
        self.n, self.longest = ranking.shape
        self.probes = 0

    def passes(self, closed_in_row) -> list[bool]:
        """Whether each text is at its stopping point with the neurons ``closed_in_row(t)`` at 0."""
        self.probes += 1
        return self.check(closed_in_row)

    def alone(self, prefix: list[int]) -> list[bool]:
        """Each text with only its own prefix closed."""
        return self.passes(lambda t: self.ranking[t, :prefix[t]])

    def smallest(self, check, low: list[int], high: list[int], label: str | None = None) -> list[int]:
        """Per text, the smallest prefix in [low, high] at which ``check`` passes, by one batched
        bisection (high is taken to pass; a text whose low equals its high stays there)."""
        low, high = list(low), list(high)
        for t, ok in enumerate(check([0] * self.n)):
            if ok:
                low[t] = high[t] = 0
        while any(h - lo > 1 for lo, h in zip(low, high)):
            middle = [(lo + h) // 2 if h - lo > 1 else h for lo, h in zip(low, high)]
            passed = check(middle)
            for t in range(self.n):
                if high[t] - low[t] > 1:
                    if passed[t]:
                        high[t] = middle[t]
                    else:
                        low[t] = middle[t]
            if label:
                self.say(f"  {label} {self.probes}: prefixes {min(high)}..{max(high)} neurons per text "
                         f"({time.perf_counter() - self.started:.1f}s)")
        return high

    def members(self, prefix: list[int]) -> torch.Tensor:
        """(texts, neurons): whether the neuron is in the text's prefix."""
        member = torch.zeros(self.n, self.total, dtype=torch.bool)
        for t in range(self.n):
            member[t, self.ranking[t, :prefix[t]]] = True
        return member

    def grow(self, prefix: list[int]) -> tuple[torch.Tensor, bool]:
        """The prefixes interact: a text that passed alone can fail beside the others' neurons
        (the memories were learnt together); such a text's prefix grows (in place) until the
        union passes. Returns the union and whether every text passes beside it."""
        chosen = self.members(prefix).any(0)
        for _ in range(UNION_ROUNDS):
            verdicts = self.passes(lambda t: chosen)
            if all(verdicts):
                return chosen, True
            failing = [t for t, ok in enumerate(verdicts) if not ok and prefix[t] < self.longest]
            if not failing:
                break
            for t in failing:
                prefix[t] = min(self.longest, max(prefix[t] + 1, math.ceil(prefix[t] * 1.25)))
            chosen = self.members(prefix).any(0)
            self.say(f"  union: {len(failing)} texts above their stopping point beside the others; their "
                     f"prefixes grow ({int(chosen.sum())} neurons)")
        return chosen, False

    def shrink(self, prefix: list[int]) -> list[int]:
        """Each text's smallest prefix that passes beside the other texts' neurons (the union
        forgets each text further than its own prefix did)."""
        member = self.members(prefix)
        others = (member.sum(0, keepdim=True) - member.int()) > 0

        def beside_others(k: list[int]) -> list[bool]:
            def closed(t):
                row = others[t].clone()
                row[self.ranking[t, :k[t]]] = True
                return row
            return self.passes(closed)

        return self.smallest(beside_others, [0] * self.n, prefix)


def localize_by_attribution(model, tokenizer, forget_ids: Sequence[Sequence[int]],
                            neighbour_ids: Sequence[Sequence[Sequence[int]]], layers: Sequence[FFNLayer],
                            limits: Sequence[float], max_per_text: int, contrast: float = 0.0,
                            score: str = "gradient", batch_size: int = 8, shrink_rounds: int = 0,
                            progress: Callable[[str], None] | None = None) -> AttributionResult:
    """Per-text attribution rankings and their smallest passing prefixes (module docstring).

    ``limits``: one MA per text, its stopping point. ``contrast``: weight of the neighbours'
    mean attribution subtracted from the text's. ``shrink_rounds``: rounds in which each text's
    prefix shrinks to what it needs beside the others' neurons, the union still passing."""
    say = progress or (lambda message: None)
    if not forget_ids:
        raise NeumuterError("no forget records")
    if len(limits) != len(forget_ids):
        raise NeumuterError(f"{len(limits)} limits for {len(forget_ids)} forget texts")
    if max_per_text < 1:
        raise NeumuterError(f"max_per_text must be >= 1, not {max_per_text}")
    if shrink_rounds < 0:
        raise NeumuterError(f"shrink_rounds must be >= 0, not {shrink_rounds}")
    started = time.perf_counter()
    pad_id = padding_id(tokenizer)
    total = sum(layer.neurons for layer in layers)
    max_per_text = min(max_per_text, total)
    scores = rank_neurons(model, layers, forget_ids, neighbour_ids, pad_id, contrast, score, batch_size)
    say(f"attribution: {len(forget_ids)} texts ranked over {total} neurons ({time.perf_counter() - started:.1f}s)")
    # ranking[t] = neuron indices (layers concatenated) of text t, most important first; ties by index
    ranking = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :max_per_text]
    check = stopping_check(model, layers, forget_ids, pad_id, limits, batch_size)
    search = PrefixSearch(ranking, total, check, say, started)
    n = len(forget_ids)
    reached = search.alone([max_per_text] * n)
    high = search.smallest(search.alone, [0 if ok else max_per_text for ok in reached], [max_per_text] * n,
                           "bisection")
    chosen, whole = search.grow(high)
    for _ in range(shrink_rounds if whole else 0):
        smaller = search.shrink(high)
        if smaller == high:
            break
        candidate, whole = search.grow(smaller)
        if not whole or candidate.sum() >= chosen.sum():
            break
        high, chosen = smaller, candidate
        say(f"  shrink: {int(chosen.sum())} neurons once each text keeps what it needs beside the others")
    from .gates import initial_log_alpha

    flat = torch.where(chosen, torch.tensor(CLOSED_LOG_ALPHA), torch.tensor(initial_log_alpha()))
    widths = [layer.neurons for layer in layers]
    log_alpha = {layer.index: part.clone() for layer, part in zip(layers, torch.split(flat, widths))}
    say(f"attribution: {int(chosen.sum())} neurons in the union of {n} prefixes "
        f"({sum(not r for r in reached)} texts not at their stopping point within {max_per_text} neurons)")
    return AttributionResult(log_alpha, high, reached, search.probes, time.perf_counter() - started)
