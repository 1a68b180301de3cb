"""Does localisation localise? NeuMuter's scales against controls, all matched for forgetting.

Every control runs on the same model and the same texts and is measured the same way:

  neumuter     the scales file from `neumuter select` (--scales), applied as gates on the
               inputs of the FFN down-projections (models.scaled: the same numbers as folding)
  random       the same number of neurons per block with the same scale values, on neurons
               drawn at random (one row: the mean over --random-seeds seeds)
  activation   MemPi-style activation selection: score = mean |input of the down-projection|
               over the forget tokens minus the same over the neighbour tokens (--neighbors,
               records from `neumuter neighbors`); the top-k neurons get scale 0, with k the
               smallest count that reaches the target (bisection, at most --max-neurons),
               and once more at neumuter's count
  change       with --base: revert the k neurons the fine-tune changed most (no training), at
               the smallest k that reaches the target (bisection)
  ga           gradient ascent on every weight, batch 1 over the forget texts
  npo          NPO (Zhang et al. 2024): loss -(2/β)·log σ(-β·(log π_θ(y) - log π_ref(y))),
               log π summed over the text's tokens, π_ref = the model before unlearning

With --base BASE (the model before the fine-tune), a scales file from `localize --base` is
measured as `apply --base` folds it (each neuron at W_base + m (W − W_base)), and every neuron
control reverts its neurons to BASE instead of zeroing them. BASE can be the yardstick too
(--reference-model BASE): it never saw the forget texts.

Matched forgetting (--target): "reference" = every forget text's MA at or below the reference
model's MA on that text + --tolerance; a number = the mean forget MA at or below it. GA and
NPO stop at the first check (every --check-every steps) that meets it; activation selection
takes the smallest top-k that meets it; neumuter and random neurons are what they are. Every
row reports the level it actually reached.

Columns: forget MA (mean), forget texts at or below the reference model's MA + tolerance, the
KS p-value of the per-text losses against the reference model's (TOFU's forget quality),
retained MA, held-out perplexity (windows of --ppl-window tokens), steps and time. The reference
model's and the model's own rows come first. Everything goes to --out as JSON too.

The figure (each method's retained MA against its perplexity, filled when it met the target)
goes beside the JSON as controls.png (--plot FILE.png elsewhere, --no-plot none; needs
matplotlib).

usage (the SmolLM2 fixture):
  python benchmarks/controls.py --model /tmp/smol/mem --reference-model /tmp/smol/ref \\
      --fixtures /work/shared/fixtures --scales scales.safetensors --out controls.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from neumuter_cli import NeumuterError  # noqa: E402
from neumuter_cli.apply import check_base, check_fingerprint  # noqa: E402
from neumuter_cli.config import TOLERANCE  # noqa: E402
from neumuter_cli.measure import memorization_accuracy, perplexity, teacher_forced  # noqa: E402
from neumuter_cli.models import find_ffn_layers, input_device, load_model, parse_layers  # noqa: E402
from neumuter_cli.models import scaled as scaled_model  # noqa: E402
from neumuter_cli.plots import benchmark_figure, check_figure_path, figure_path, plot_controls  # noqa: E402
from neumuter_cli.records import atomic_output, read_records  # noqa: E402
from neumuter_cli.rollback import neuron_changes, rolled_back  # noqa: E402
from neumuter_cli.artifacts import SCALES_KIND, read_artifact  # noqa: E402
from neumuter_cli.select import scales_by_block  # noqa: E402
from neumuter_cli.text import encode  # noqa: E402

CONTROLS = ("neumuter", "random", "activation", "change", "ga", "npo")
EPS = 1e-9   # MA values are ratios of small integers; this keeps x + 0.05 from rounding below x + 0.05

Progress = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


# ---------------------------------------------------------------- the fixture and its measurements

@dataclass
class Reference:
    """The reference model's per-text numbers on the forget set (it never saw those texts)."""

    forget_ma: list[float]
    forget_losses: list[float]


@dataclass
class Fixture:
    model: torch.nn.Module
    tokenizer: object
    forget_ids: list[list[int]]
    retain_ids: list[list[int]]
    heldout: list[str]
    ppl_window: int = 256
    tolerance: float = TOLERANCE
    reference: Reference | None = None
    neighbor_ids: list[list[int]] = field(default_factory=list)
    rollback: dict | None = None    # rollback.neuron_changes toward a base: scales then move neurons toward it

    @property
    def layers(self):
        return find_ffn_layers(self.model)


def measure_model(model, tokenizer, forget_ids, retain_ids, heldout, ppl_window=256,
                  progress: Progress = _quiet) -> dict:
    """Forget MA and loss per text (one teacher-forced pass), retained MA, held-out perplexity."""
    started = time.perf_counter()
    tfs = teacher_forced(model, forget_ids)
    forget_ma = [tf.ma(ids) for tf, ids in zip(tfs, forget_ids)]
    out = {"forget_ma": forget_ma, "forget_ma_mean": _mean(forget_ma),
           "forget_losses": [tf.loss for tf in tfs]}
    out["retained_ma"] = _mean(memorization_accuracy(model, retain_ids)) if retain_ids else None
    out["perplexity"] = (perplexity(model, tokenizer, heldout, window=ppl_window)["perplexity"]
                         if heldout else None)
    progress(f"  measured in {time.perf_counter() - started:.0f} s: forget MA {out['forget_ma_mean']:.3f}, "
             f"retained MA {_fmt(out['retained_ma'])}, perplexity {_fmt(out['perplexity'], 2)}")
    return out


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def against_reference(row: dict, fx: Fixture) -> dict:
    """Add the columns that compare with the reference model: texts at its MA + tolerance and
    the KS p-value of the per-text losses."""
    if fx.reference is None:
        row["at_reference"], row["ks_p"] = None, None
        return row
    from scipy.stats import ks_2samp

    row["at_reference"] = sum(ma <= ref + fx.tolerance + EPS
                              for ma, ref in zip(row["forget_ma"], fx.reference.forget_ma))
    row["ks_p"] = float(ks_2samp(row["forget_losses"], fx.reference.forget_losses).pvalue)
    return row


# ---------------------------------------------------------------- the target and its check

@dataclass
class Target:
    """Matched forgetting: per text (``limits``: the reference model's MA + tolerance) or on
    the mean forget MA (``mean``)."""

    kind: str                      # "reference" or "mean"
    mean: float | None = None
    limits: list[float] | None = None

    @classmethod
    def parse(cls, spec: str, fx: Fixture) -> "Target":
        if spec == "reference":
            if fx.reference is None:
                raise NeumuterError("--target reference needs --reference-model")
            return cls("reference", limits=[ma + fx.tolerance for ma in fx.reference.forget_ma])
        try:
            value = float(spec)
        except ValueError:
            raise NeumuterError(f"--target must be 'reference' or a mean forget MA, not {spec!r}") from None
        if not 0 <= value <= 1:
            raise NeumuterError(f"--target {spec}: a mean MA lies in [0, 1]")
        return cls("mean", mean=value)

    def met(self, forget_ma: Sequence[float]) -> bool:
        if self.kind == "mean":
            return _mean(forget_ma) <= self.mean + EPS
        return all(ma <= limit + EPS for ma, limit in zip(forget_ma, self.limits))

    def describe(self) -> str:
        if self.kind == "mean":
            return f"mean forget MA <= {self.mean:g}"
        return "every forget text's MA <= the reference model's + tolerance"


class TargetCheck:
    """Whether the model, as it is now, meets the target; exact, but cheap for the per-text
    target: the texts that failed last time are measured first, one, then two, then four...,
    and the check stops at the first text still above its limit. Only a check that succeeds
    measures every text. ``calls`` and ``texts_measured`` count the work."""

    def __init__(self, fx: Fixture, target: Target):
        self.fx, self.target = fx, target
        self.margin = [math.inf] * len(fx.forget_ids)   # MA - limit, as last measured
        self.calls = self.texts_measured = 0

    def __call__(self) -> tuple[bool, float | None]:
        """(met, mean forget MA or None when not every text was measured)."""
        self.calls += 1
        ids = self.fx.forget_ids
        if self.target.kind == "mean":
            self.texts_measured += len(ids)
            mas = memorization_accuracy(self.fx.model, ids)
            return self.target.met(mas), _mean(mas)
        order = sorted(range(len(ids)), key=lambda i: -self.margin[i])
        measured: dict[int, float] = {}
        start, size = 0, 1
        while start < len(order):
            chunk = order[start:start + size]
            self.texts_measured += len(chunk)
            for i, ma in zip(chunk, memorization_accuracy(self.fx.model, [ids[i] for i in chunk])):
                self.margin[i] = ma - self.target.limits[i]
                measured[i] = ma
            if any(self.margin[i] > EPS for i in chunk):
                return False, None
            start, size = start + size, size * 2
        return True, _mean([measured[i] for i in range(len(ids))])


# ---------------------------------------------------------------- neuron scales

def read_scales(path: str, fx: Fixture) -> dict[int, torch.Tensor]:
    """A `neumuter select` scales file, checked against the model (fingerprint, widths)."""
    artifact = read_artifact(path, SCALES_KIND)
    tensors, meta = artifact.tensors, artifact.metadata
    scales = scales_by_block(tensors, meta, path)
    layers = fx.layers
    info = check_fingerprint(meta, fx.model, layers, path)
    if meta.get("neurons") != info["neurons"]:
        raise NeumuterError(f"{path}: neuron counts {meta.get('neurons')} do not match the model's {info['neurons']}")
    return scales


def roll_back_toward(fx: Fixture, base, base_name: str, scales_meta: dict, scales_path: str | None,
                     progress: Progress = _quiet) -> None:
    """From now on, the fixture's neuron rows revert toward ``base`` instead of zeroing. A scales
    file (its metadata) must have been made toward that same base."""
    if scales_path:
        check_base(scales_meta, base, scales_path, base_name)
    fx.rollback = {b: c for b, c in neuron_changes(fx.model, base).items() if c.changed.any()}
    progress(f"neuron rows revert toward the base model: "
             f"{sum(int(c.changed.sum()) for c in fx.rollback.values())} FFN neurons differ from it")


def scaled(fx: Fixture, scales: dict[int, torch.Tensor]):
    """The fixture's model with each named block's down-projection inputs multiplied by its scales
    or, when the fixture rolls back, each neuron at W_base + m (W − W_base) for its scale m."""
    if fx.rollback is not None:
        return rolled_back(fx.model, fx.rollback, scales)
    return scaled_model(fx.model, scales, fx.layers)


def modified_count(scales: dict[int, torch.Tensor]) -> int:
    return sum(int((s != 1).sum()) for s in scales.values())


def per_block_counts(scales: dict[int, torch.Tensor]) -> dict[int, int]:
    return {b: int((s != 1).sum()) for b, s in sorted(scales.items())}


def random_like(scales: dict[int, torch.Tensor], seed: int) -> dict[int, torch.Tensor]:
    """The same scale values, block by block, on neurons drawn at random (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for block, scale in sorted(scales.items()):
        values = scale[scale != 1]
        chosen = torch.randperm(scale.numel(), generator=generator)[:values.numel()]
        shuffled = values[torch.randperm(values.numel(), generator=generator)]
        new = torch.ones_like(scale)
        new[chosen] = shuffled
        out[block] = new
    return out


@torch.no_grad()
def mean_abs_activations(fx: Fixture, ids_list: Sequence[Sequence[int]], blocks: Sequence[int]
                         ) -> dict[int, torch.Tensor]:
    """Mean |input of the down-projection| per neuron over every token of the texts."""
    by_index = {layer.index: layer for layer in fx.layers}
    sums = {b: torch.zeros(by_index[b].neurons, dtype=torch.float64) for b in blocks}
    handles = []
    for b in blocks:
        def hook(module, args, b=b):
            sums[b] += args[0].detach().abs().reshape(-1, args[0].shape[-1]).sum(0).double().cpu()
        handles.append(by_index[b].module.register_forward_pre_hook(hook))
    tokens = 0
    device = input_device(fx.model)
    try:
        for ids in ids_list:   # one text at a time: no padding tokens in the sums
            fx.model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
            tokens += len(ids)
    finally:
        for handle in handles:
            handle.remove()
    return {b: (s / tokens).float() for b, s in sums.items()}


def activation_scores(fx: Fixture, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
    """Forget minus neighbour mean |activation| per neuron (MemPi's ACTIVATIONS, with the
    neighbours as the non-memorised contrast)."""
    if not fx.neighbor_ids:
        raise NeumuterError("activation selection needs neighbour texts (--neighbors)")
    forget = mean_abs_activations(fx, fx.forget_ids, blocks)
    neighbours = mean_abs_activations(fx, fx.neighbor_ids, blocks)
    return {b: forget[b] - neighbours[b] for b in blocks}


def ranked_neurons(scores: dict[int, torch.Tensor]) -> list[tuple[int, int]]:
    """(block, neuron) of every scored neuron, highest score first (stable: ties by block, then
    neuron)."""
    blocks = sorted(scores)
    flat = torch.cat([scores[b] for b in blocks])
    owner = [(b, n) for b in blocks for n in range(scores[b].numel())]
    order = torch.sort(flat, descending=True, stable=True).indices.tolist()
    return [owner[k] for k in order]


def top_k_scales(ranking: list[tuple[int, int]], widths: dict[int, int], k: int) -> dict[int, torch.Tensor]:
    """Scale 0 on the first k neurons of the ranking, 1 elsewhere (every ranked block named)."""
    out = {b: torch.ones(w) for b, w in widths.items()}
    for block, neuron in ranking[:k]:
        out[block][neuron] = 0.0
    return out


# ---------------------------------------------------------------- the controls

def scales_row(fx: Fixture, target: Target, scales: dict[int, torch.Tensor], method: str, control: str,
               progress: Progress = _quiet) -> dict:
    """Measure the model with the given scales as gates."""
    started = time.perf_counter()
    with scaled(fx, scales):
        row = measure_model(fx.model, fx.tokenizer, fx.forget_ids, fx.retain_ids, fx.heldout, fx.ppl_window,
                            progress)
    row.update(control=control, method=method, modified=modified_count(scales),
               modified_per_block=per_block_counts(scales), reached=target.met(row["forget_ma"]), steps=None,
               seconds=time.perf_counter() - started)
    return against_reference(row, fx)


def random_rows(fx: Fixture, target: Target, scales: dict[int, torch.Tensor], seeds: Sequence[int],
                progress: Progress = _quiet) -> dict:
    """Random neurons with neumuter's per-block counts and values, one run per seed; the row is
    the mean over the seeds, each seed's row is kept under ``seeds``."""
    runs = []
    for seed in seeds:
        progress(f"random neurons, seed {seed}")
        row = scales_row(fx, target, random_like(scales, seed), f"random (seed {seed})", "random", progress)
        row["seed"] = seed
        runs.append(row)
    mean = {key: _mean([r[key] for r in runs]) for key in
            ("forget_ma_mean", "retained_ma", "perplexity", "at_reference", "ks_p", "seconds")
            if all(r[key] is not None for r in runs)}
    row = {key: None for key in ("retained_ma", "perplexity", "at_reference", "ks_p")}
    row.update(mean)
    row.update(control="random", method=f"random neurons (mean of {len(runs)} seeds)",
               modified=runs[0]["modified"], modified_per_block=runs[0]["modified_per_block"], steps=None,
               reached=sum(r["reached"] for r in runs) / len(runs), seeds=runs)
    return row


def smallest_top_k(fx: Fixture, target: Target, ranking: list[tuple[int, int]], widths: dict[int, int],
                   max_neurons: int, progress: Progress = _quiet) -> tuple[int, bool, list[dict]]:
    """The smallest k ≤ ``max_neurons`` whose top-k of ``ranking`` (at scale 0) meets the target,
    by bisection: (k, True, trace); when even ``max_neurons`` misses, (max_neurons, False, trace)."""
    check = TargetCheck(fx, target)
    trace: list[dict] = []

    def reached(k: int) -> bool:
        with scaled(fx, top_k_scales(ranking, widths, k)):
            met, _ = check()
        trace.append({"k": k, "reached": met})
        progress(f"  top {k}: {'meets' if met else 'misses'} the target")
        return met

    if reached(0):
        return 0, True, trace
    if not reached(max_neurons):
        return max_neurons, False, trace
    lo, hi = 0, max_neurons    # invariant: top-lo misses, top-hi meets
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if reached(mid):
            hi = mid
        else:
            lo = mid
    return hi, True, trace


def activation_rows(fx: Fixture, target: Target, blocks: Sequence[int], max_neurons: int,
                    neumuter_count: int | None, progress: Progress = _quiet) -> list[dict]:
    """Top-k activation selection at the smallest k ≤ ``max_neurons`` that meets the target
    (bisection; when even ``max_neurons`` does not, the row at ``max_neurons`` with reached =
    False), and at neumuter's count when given."""
    started = time.perf_counter()
    progress(f"activation scores over blocks {_blocks(blocks)}")
    scores = activation_scores(fx, blocks)
    ranking = ranked_neurons(scores)
    widths = {b: s.numel() for b, s in scores.items()}
    max_neurons = min(max_neurons, len(ranking))
    found, ok, trace = smallest_top_k(fx, target, ranking, widths, max_neurons, progress)
    search_seconds = time.perf_counter() - started
    progress(f"activation selection: top {found} neurons " + ("meet the target" if ok else
             "(the cap) still miss the target"))
    rows = []
    label = "activation (smallest top-k at target)" if ok else "activation (top-k at the cap)"
    row = scales_row(fx, target, top_k_scales(ranking, widths, found), label, "activation", progress)
    row.update(steps=len(trace), seconds=search_seconds + row["seconds"], bisection=trace,
               max_neurons=max_neurons, blocks=list(blocks))
    rows.append(row)
    if neumuter_count is not None and neumuter_count != found:
        k = min(neumuter_count, len(ranking))
        progress(f"activation selection at neumuter's count ({k})")
        row = scales_row(fx, target, top_k_scales(ranking, widths, k), "activation (neumuter's count)",
                         "activation at neumuter's count", progress)
        row["blocks"] = list(blocks)
        rows.append(row)
    return rows


def change_row(fx: Fixture, target: Target, progress: Progress = _quiet) -> dict:
    """With --base: revert the k neurons the fine-tune changed most (relative size ‖Δw‖ / ‖w_base‖),
    no training, at the smallest k that meets the target (bisection over every changed neuron)."""
    started = time.perf_counter()
    sizes = {b: torch.where(c.changed, c.size, torch.full_like(c.size, -1.0)) for b, c in fx.rollback.items()}
    changed = sum(int(c.changed.sum()) for c in fx.rollback.values())
    ranking = ranked_neurons(sizes)[:changed]          # unchanged neurons (size -1) rank last: cut off
    widths = {b: s.numel() for b, s in sizes.items()}
    progress(f"top k by fine-tune change, over the {changed} changed neurons")
    found, ok, trace = smallest_top_k(fx, target, ranking, widths, changed, progress)
    label = ("top k by fine-tune change (smallest k at target)" if ok else
             "top k by fine-tune change (every changed neuron)")
    row = scales_row(fx, target, top_k_scales(ranking, widths, found), label, "change", progress)
    row.update(steps=len(trace), seconds=time.perf_counter() - started, bisection=trace)
    return row


def ascent_row(fx: Fixture, target: Target, method: str, lr: float, budget_steps: int, check_every: int,
               optimizer: str = "adam", beta: float = 0.1, seed: int = 0, progress: Progress = _quiet,
               save_dir: str | None = None) -> dict:
    """Gradient ascent ("ga") or NPO ("npo") on every weight, batch 1 over the forget texts in a
    seeded random order per epoch, checked every ``check_every`` steps, stopped at the first
    check that meets the target or after ``budget_steps``. The weights are restored after the
    row is measured (and, with ``save_dir``, the unlearned model saved there first, e.g. for
    benchmarks/robustness.py)."""
    if method not in ("ga", "npo"):
        raise ValueError(method)
    if check_every < 1 or budget_steps < 0:
        raise NeumuterError("--check-every must be >= 1 and --budget-steps >= 0")
    model = fx.model
    params = list(model.parameters())   # tied weights appear once
    snapshot = [p.detach().clone() for p in params]
    reference_logp = None
    if method == "npo":   # log π_ref(y) of each forget text, from the model before any step
        reference_logp = [-math.fsum(tf.nll) for tf in teacher_forced(model, fx.forget_ids)]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = input_device(model)
    check = TargetCheck(fx, target)
    started = time.perf_counter()
    met, level = check()
    trace = [{"step": 0, "reached": met, "forget_ma_mean": level}]
    steps, order, step_seconds = 0, [], 0.0
    losses: list[float] = []
    was_training = model.training
    try:
        model.eval()   # no dropout: the steps are deterministic (SmolLM2 has none anyway)
        for p in params:
            p.requires_grad_(True)
        opt = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer](params, lr=lr)
        while not met and steps < budget_steps:
            if not order:
                order = torch.randperm(len(fx.forget_ids), generator=generator).tolist()
            i = order.pop(0)
            step_started = time.perf_counter()
            x = torch.tensor([fx.forget_ids[i]], device=device)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            nll = F.cross_entropy(logits, x[0, 1:], reduction="none")
            if method == "ga":
                loss = -nll.mean()
            else:
                log_ratio = -nll.sum() - reference_logp[i]
                loss = -(2.0 / beta) * F.logsigmoid(-beta * log_ratio)
            if not torch.isfinite(loss):
                progress(f"  {method}: loss is {loss.item()} at step {steps + 1}: stopped")
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_seconds += time.perf_counter() - step_started
            steps += 1
            losses.append(loss.item())
            if steps % check_every == 0 or steps == budget_steps:
                met, level = check()
                trace.append({"step": steps, "reached": met, "forget_ma_mean": level})
                progress(f"  {method} step {steps}: loss {loss.item():.3f}, "
                         + (f"forget MA {level:.3f}" if level is not None else "a text is still above its limit")
                         + (" -> target met" if met else ""))
        seconds = time.perf_counter() - started
        del opt
        for p in params:
            p.requires_grad_(False)
        row = measure_model(model, fx.tokenizer, fx.forget_ids, fx.retain_ids, fx.heldout, fx.ppl_window, progress)
        if save_dir:
            model.save_pretrained(save_dir)
            fx.tokenizer.save_pretrained(save_dir)
            progress(f"  {method}: the unlearned model is saved in {save_dir}")
    finally:
        for p in params:
            p.requires_grad_(False)
        with torch.no_grad():
            for p, saved in zip(params, snapshot):
                p.copy_(saved)
        model.train(was_training)
    name = {"ga": "gradient ascent", "npo": "NPO"}[method]
    row.update(control=method, method=f"{name} (lr {lr:g}{', beta %g' % beta if method == 'npo' else ''})",
               modified=sum(p.numel() for p in params), modified_unit="weights",
               reached=target.met(row["forget_ma"]), steps=steps,
               seconds=seconds, step_seconds=step_seconds, checks=check.calls, texts_checked=check.texts_measured,
               trace=trace, train_losses=losses, optimizer=optimizer, lr=lr, budget_steps=budget_steps,
               check_every=check_every)
    if method == "npo":
        row["beta"] = beta
    return against_reference(row, fx)


# ---------------------------------------------------------------- the table

def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _blocks(blocks: Sequence[int]) -> str:
    blocks = list(blocks)
    if blocks and blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"{blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else str(blocks[0])
    return ",".join(map(str, blocks))


def _modified(row: dict, total_neurons: int) -> str:
    n = row.get("modified")
    if n is None:
        return "–"
    if row.get("modified_unit") == "weights":
        return f"all {n / 1e6:.1f}M weights"
    return f"{n} neurons ({100 * n / total_neurons:.2f} %)"


def _reached(row: dict) -> str:
    value = row.get("reached")
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    seeds = len(row.get("seeds", [])) or 1
    return f"{round(value * seeds)}/{seeds} seeds"


def _cost(row: dict) -> str:
    seconds = row.get("seconds")
    if seconds is None:
        return "–"
    steps = row.get("steps")
    if steps is None:
        return f"{seconds:.0f} s"
    unit = "checks" if row.get("bisection") is not None else "steps"
    return f"{steps} {unit}, {seconds:.0f} s"


def table(rows: Sequence[dict], n_forget: int, total_neurons: int) -> str:
    from tabulate import tabulate

    body = []
    for row in rows:
        at_ref = row.get("at_reference")
        body.append([
            row["method"], _modified(row, total_neurons), _fmt(row.get("forget_ma_mean")),
            "–" if at_ref is None else (f"{int(at_ref)}/{n_forget}" if float(at_ref).is_integer()
                                        else f"{at_ref:.1f}/{n_forget}"),
            _fmt(row.get("ks_p")), _fmt(row.get("retained_ma")), _fmt(row.get("perplexity"), 2),
            _reached(row), _cost(row),
        ])
    headers = ["method", "modified", "forget MA", "at ref+tol", "KS p", "retained MA", "perplexity",
               "target met", "steps / time"]
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


# ---------------------------------------------------------------- the run

def _texts(path: str, limit: int | None = None, require=("text",)) -> list[dict]:
    records = read_records(path, require)
    return records[:limit] if limit else records


def build_parser() -> argparse.ArgumentParser:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", help="the model that memorised the forget texts (required unless --from-json)")
    ap.add_argument("--reference-model", help="the same training without the forget texts (needed by --target "
                                              "reference, the 'at ref+tol' and 'KS p' columns)")
    ap.add_argument("--fixtures", default=os.path.join(here, "..", "..", "shared", "fixtures"),
                    help="folder of the default sets below (default: %(default)s)")
    ap.add_argument("--forget", help="forget set, JSONL (default: FIXTURES/forget.jsonl)")
    ap.add_argument("--retain", help="retained set, JSONL (default: FIXTURES/retain.jsonl)")
    ap.add_argument("--heldout", help="held-out texts for perplexity, JSONL (default: FIXTURES/heldout.jsonl)")
    ap.add_argument("--neighbors",
                    help="the forget records with \"neighbors\" (default: FIXTURES/forget.neighbors.jsonl)")
    ap.add_argument("--scales", help="neumuter's scales file (from `neumuter select`); needed by neumuter and random")
    ap.add_argument("--base", help="the model before the fine-tune: neuron controls revert toward it (needed by a "
                                   "`localize --base` scales file and by the change control)")
    ap.add_argument("--controls", default=",".join(CONTROLS),
                    help="which controls, comma-separated (default: %(default)s; neumuter and random are skipped "
                         "without --scales, change without --base)")
    ap.add_argument("--target", default="reference",
                    help="'reference' (every text at or below the reference model's MA + tolerance) or a mean "
                         "forget MA (default: %(default)s)")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE,
                    help="MA above the reference model's that still counts as forgotten (default: %(default)s)")
    ap.add_argument("--random-seeds", type=int, default=3, help="seeds for random neurons (default: %(default)s)")
    ap.add_argument("--max-neurons", type=int,
                    help="cap on activation selection's k (default: 10%% of the neurons of its blocks)")
    ap.add_argument("--activation-blocks",
                    help="blocks activation selection ranks, e.g. 20-29 or all (default: the scales file's blocks, "
                         "else all)")
    ap.add_argument("--ga-lr", type=float, default=1e-5, help="(default: %(default)s)")
    ap.add_argument("--npo-lr", type=float, default=1e-5, help="(default: %(default)s)")
    ap.add_argument("--npo-beta", type=float, default=0.1, help="(default: %(default)s)")
    ap.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                    help="for GA and NPO (default: %(default)s)")
    ap.add_argument("--budget-steps", type=int, default=320,
                    help="at most this many GA / NPO steps (batch 1; default: %(default)s = 10 epochs of 32 texts)")
    ap.add_argument("--check-every", type=int, default=1,
                    help="check the target every N GA / NPO steps (default: %(default)s)")
    ap.add_argument("--max-length", type=int, default=200,
                    help="tokens per forget / retained text (default: %(default)s)")
    ap.add_argument("--retain-limit", type=int, help="use only the first N retained texts")
    ap.add_argument("--heldout-limit", type=int, help="use only the first N held-out texts")
    ap.add_argument("--ppl-window", type=int, default=256, help="perplexity window in tokens (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"], help="(default: %(default)s)")
    ap.add_argument("--threads", type=int,
                    help="torch CPU threads (default: torch's; on a busy machine 1 is often several times faster)")
    ap.add_argument("--out", help="write every number to this JSON file")
    ap.add_argument("--plot", metavar="FILE.png", help="the figure (default: --out with .png)")
    ap.add_argument("--no-plot", action="store_true", help="no figure")
    ap.add_argument("--from-json", metavar="FILE", help="measure nothing: draw --plot from the JSON of an earlier run")
    ap.add_argument("--save-dir", help="save the gradient-ascent and NPO models in DIR/ga and DIR/npo "
                                       "(inputs of benchmarks/robustness.py)")
    return ap


def _name(path: str | None) -> str:
    return os.path.basename(os.path.normpath(path)) if path else "?"


ROW_NAMES = {   # the rows whose name depends on the settings (--from-json names older JSON's rows the same way)
    "reference": lambda settings: f"reference model {_name(settings['reference_model'])} (never saw the forget texts)",
    "neumuter": lambda settings: (f"neumuter, rolled back toward {_name(settings['base'])}" if settings.get("base")
                                  else "neumuter"),
}


def figure_title(result: dict) -> str:
    settings = result["settings"]
    return (f"{_name(settings['model'])} on {len(result['rows'][0]['forget_ma'])} forget texts: controls at matched "
            "forgetting")


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.from_json:
        if not args.plot:
            raise SystemExit("error: --from-json needs --plot FILE.png")
        with open(args.from_json, encoding="utf-8") as handle:
            result = json.load(handle)
        for row in result["rows"]:
            if row["control"] in ROW_NAMES:
                row["method"] = ROW_NAMES[row["control"]](result["settings"])
        check_figure_path(args.plot)
        benchmark_figure(plot_controls, result, args.plot, figure_title(result), "controls.py")
        return result
    if not args.model:
        build_parser().error("the following arguments are required: --model")
    try:
        return run(args)
    except NeumuterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def run(args) -> dict:
    progress = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    controls = [c.strip() for c in args.controls.split(",") if c.strip()]
    unknown = sorted(set(controls) - set(CONTROLS))
    if unknown:
        raise NeumuterError(f"unknown control {unknown[0]!r} (choose from {', '.join(CONTROLS)})")
    if not args.scales:
        skipped = [c for c in controls if c in ("neumuter", "random")]
        if skipped:
            progress(f"no --scales: skipping {', '.join(skipped)}")
        controls = [c for c in controls if c not in ("neumuter", "random")]
    if "change" in controls and not args.base:
        progress("no --base: skipping change")
        controls.remove("change")
    path = lambda given, name: given or os.path.join(args.fixtures, name)  # noqa: E731
    plot = figure_path(args.out, args.plot, args.no_plot)
    check_figure_path(plot)
    started = time.perf_counter()

    progress(f"loading {args.model}")
    model, tokenizer = load_model(args.model, device=args.device)
    forget = [r["text"] for r in _texts(path(args.forget, "forget.jsonl"))]
    retain = [r["text"] for r in _texts(path(args.retain, "retain.jsonl"), args.retain_limit)]
    heldout = [r["text"] for r in _texts(path(args.heldout, "heldout.jsonl"), args.heldout_limit)]
    fx = Fixture(model, tokenizer, encode(tokenizer, forget, args.max_length),
                 encode(tokenizer, retain, args.max_length), heldout, args.ppl_window, args.tolerance)
    if "activation" in controls:
        records = _texts(path(args.neighbors, "forget.neighbors.jsonl"), require=("text", "neighbors"))
        fx.neighbor_ids = encode(tokenizer, [nb for r in records for nb in r["neighbors"]], args.max_length)
    layers = fx.layers
    total_neurons = sum(layer.neurons for layer in layers)
    scales_meta = read_artifact(args.scales).metadata if args.scales else {}
    if args.base:
        progress(f"base model {args.base}")
        base, _ = load_model(args.base, device=args.device)
        roll_back_toward(fx, base, args.base, scales_meta, args.scales, progress)
        del base
    elif scales_meta.get("base") is not None:
        raise NeumuterError(f"{args.scales} rolls neurons back toward a base model: give it as --base")
    progress(f"{len(forget)} forget, {len(retain)} retained, {len(heldout)} held-out texts; "
             f"{len(layers)} FFN blocks, {total_neurons} neurons")

    rows = []
    if args.reference_model:
        progress(f"reference model {args.reference_model}")
        reference, _ = load_model(args.reference_model, device=args.device)
        if reference.get_input_embeddings().weight.shape[0] != model.get_input_embeddings().weight.shape[0]:
            raise NeumuterError("the reference model's vocabulary differs from the model's")
        row = measure_model(reference, tokenizer, fx.forget_ids, fx.retain_ids, fx.heldout, fx.ppl_window, progress)
        fx.reference = Reference(row["forget_ma"], row["forget_losses"])
        del reference
        row.update(control="reference", method=ROW_NAMES["reference"](vars(args)), modified=None)
        rows.append(against_reference(row, fx))
    target = Target.parse(args.target, fx)
    progress(f"target: {target.describe()}")

    progress("the model as it is")
    row = measure_model(model, tokenizer, fx.forget_ids, fx.retain_ids, fx.heldout, fx.ppl_window, progress)
    row.update(control="before", method="model before unlearning", modified=None, reached=target.met(row["forget_ma"]))
    rows.append(against_reference(row, fx))

    scales = read_scales(args.scales, fx) if args.scales else None
    neumuter_count = modified_count(scales) if scales is not None else None
    if "neumuter" in controls:
        progress(f"neumuter: {neumuter_count} neurons in blocks {_blocks(sorted(scales))}")
        rows.append(scales_row(fx, target, scales, ROW_NAMES["neumuter"](vars(args)), "neumuter", progress))
    if "random" in controls:
        seeds = [args.seed + k for k in range(args.random_seeds)]
        rows.append(random_rows(fx, target, scales, seeds, progress))
    if "activation" in controls:
        if args.activation_blocks:
            blocks = parse_layers(args.activation_blocks, len(layers))
        elif scales is not None:
            blocks = sorted(scales)
        else:
            blocks = [layer.index for layer in layers]
        candidates = sum(layers[b].neurons for b in blocks)
        cap = args.max_neurons if args.max_neurons is not None else max(1, candidates // 10)
        rows.extend(activation_rows(fx, target, blocks, cap, neumuter_count, progress))
    if "change" in controls:
        rows.append(change_row(fx, target, progress))
    for method, lr in (("ga", args.ga_lr), ("npo", args.npo_lr)):
        if method in controls:
            progress(f"{method}: lr {lr:g}, at most {args.budget_steps} steps, check every {args.check_every}")
            save_dir = os.path.join(args.save_dir, method) if args.save_dir else None
            rows.append(ascent_row(fx, target, method, lr, args.budget_steps, args.check_every, args.optimizer,
                                   args.npo_beta, args.seed, progress, save_dir))

    print(f"target: {target.describe()}" + (f" (tolerance {args.tolerance:g})" if target.kind == "reference" else ""))
    print(table(rows, len(forget), total_neurons))
    result = {
        "settings": {key: value for key, value in vars(args).items()},
        "target": {"kind": target.kind, "mean": target.mean, "limits": target.limits,
                   "description": target.describe()},
        "total_neurons": total_neurons,
        "neumuter_count": neumuter_count,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    if args.out:
        with atomic_output(args.out) as handle:
            json.dump(result, handle, indent=1, default=_json_default)
            handle.write("\n")
    benchmark_figure(plot_controls, result, plot, figure_title(result), "controls.py")
    progress(f"done in {result['seconds']:.0f} s")
    return result


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(type(value).__name__)


if __name__ == "__main__":
    main()
