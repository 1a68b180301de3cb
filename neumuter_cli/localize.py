"""Train one Hard-Concrete gate per FFN neuron (paper eq. 13) with every model weight frozen.

    L = forget_term(D_f) + λ · KL(p_orig || p_gated on neighbours) + η · R(M)

The original distribution is the same model with the gates removed; it is computed once,
before training, and kept as the top-k log-probabilities of each neighbour token plus one
"rest of the vocabulary" bucket (an exact KL between those coarse distributions, which is a
lower bound of the full KL and equal to it when ``kl_top_k`` covers the vocabulary).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import NeumuterError, distributed
from .config import FORGET_TERMS, LOCALIZE_METHODS, OPTIMIZERS, TOLERANCE, LocalizeConfig, StopRule, check_seed
from .errors import ConflictingSettings, NonFiniteLoss, NonFiniteOutput, escape
from .gates import GAMMA, ZETA, deterministic_gate, initial_log_alpha, l0_term, training_gate
from .models import FFNLayer, block_spans, float32_steps, gated, input_device, scaled
from .rollback import interpolated, rolled_back
from .progress import steps
from .records import finite_number
from .select import DEFAULT_RULE, select_neurons
from .text import check_context, encode, pad, padding_id


# (field, lowest, highest, whether the lowest is allowed): every float of the config is finite
CONFIG_RANGES = (("lr", 0, None, False), ("kl_weight", 0, None, True), ("l0_weight", 0, None, True),
                 ("beta", 0, None, False), ("max_forget_loss", 0, None, True), ("margin", 0, None, True),
                 ("target_ma", 0, 1, True))


def check_config(config: LocalizeConfig) -> None:
    """Refuse a config that cannot train: an unknown forget term, a non-finite number, or one
    out of its range (e.g. a learning rate of 0, a negative weight, a target MA above 1)."""
    if config.forget_term not in FORGET_TERMS:
        raise NeumuterError(f"unknown forget term {config.forget_term!r} (choose {', '.join(FORGET_TERMS)})")
    check_seed(config.seed)
    for name, low, high, low_ok in CONFIG_RANGES:
        value = getattr(config, name)
        if not finite_number(value):
            raise NeumuterError(f"{name} must be a finite number, not {value!r}")
        if value < low or (value == low and not low_ok) or (high is not None and value > high):
            bound = f"{'>=' if low_ok else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            raise NeumuterError(f"{name} must be {bound}, not {value!r}")


@dataclass
class LocalizeResult:
    log_alpha: dict[int, torch.Tensor]
    losses: dict
    epochs_run: int
    stopped_early: bool
    seconds: float
    pruned: dict | None = None


# ---------------------------------------------------------------- loss terms

def forget_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, config: LocalizeConfig,
                target_ma: torch.Tensor | None = None):
    """The forget term to *minimise*, and the mean cross-entropy (for the progress line).

    ``target_ma`` (one value per row) replaces ``config.target_ma`` for the hinge: the MA at
    which each text stops pulling."""
    logits = logits[:, :-1].float()
    target = input_ids[:, 1:]
    weight = mask[:, 1:].float()
    tokens = weight.sum(1).clamp(min=1)
    with torch.set_grad_enabled(torch.is_grad_enabled() and config.forget_term != "hinge"):
        # (rows, vocab) layout: cross_entropy on a (batch, vocab, time) view is several times slower
        ce_tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                 reduction="none").view_as(target)
    ce = (ce_tok * weight).sum(1) / tokens                     # per sample
    if config.forget_term == "ascent":
        term = -ce.mean()
    elif config.forget_term == "bounded":
        # the public code: ascend while the loss is below the bound, descend hard above it
        coefficient = torch.where(ce.detach() <= config.max_forget_loss, -1.0, 5.0)
        term = (coefficient * ce).mean()
    else:
        # push the true token below the best other token by `margin`, then stop pushing:
        # the memorised prediction is gone and nothing else needs to move
        true = logits.gather(-1, target[..., None])[..., 0]
        top2 = logits.topk(2, dim=-1)
        other = torch.where(top2.indices[..., 0] == target, top2.values[..., 1], top2.values[..., 0])
        hinge = F.relu(true - other + config.margin)
        accuracy = ((true > other).float() * weight).sum(1) / tokens
        # "forget just enough": a text already at the target MA stops pulling, so the cheapest
        # tokens to break (content, not the boilerplate the neighbours protect) break first
        target = config.target_ma if target_ma is None else target_ma.to(accuracy.device)
        active = (accuracy > target).float()
        term = ((hinge * weight).sum(1) / tokens * active).mean()
    return term, ce.mean().detach()


@torch.no_grad()
def original_distribution(model, batches, top_k: int):
    """Per neighbour batch: (top-k indices, top-k log-probs, log of the rest's mass); None for
    a batch that is None (no share of it in this process)."""
    cached = []
    for batch in batches:
        if batch is None:
            cached.append(None)
            continue
        input_ids, mask = batch
        logp = F.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), -1)
        if top_k and top_k < logp.shape[-1]:
            values, indices = logp.topk(top_k, dim=-1)
            rest = torch.log1p(-values.exp().sum(-1).clamp(max=1 - 1e-6))
            cached.append((indices, values, rest))
        else:
            cached.append((None, logp, None))
    return cached


def neighbour_kl(logits: torch.Tensor, mask: torch.Tensor, original) -> torch.Tensor:
    """KL(p_orig || p_gated), summed over the vocabulary, averaged over neighbour tokens."""
    indices, p_log, p_rest = original
    q_log = F.log_softmax(logits.float(), -1)
    if indices is None:
        kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    else:
        q_top = q_log.gather(-1, indices)
        q_rest = torch.log1p(-q_top.exp().sum(-1).clamp(max=1 - 1e-6))
        kl = (p_log.exp() * (p_log - q_top)).sum(-1) + p_rest.exp() * (p_rest - q_rest)
    weight = mask.float()
    return (kl * weight).sum() / weight.sum().clamp(min=1)


class SharedAdam(torch.optim.Optimizer):
    """Adam with one second moment for all the parameters of a group instead of one per entry.

    Plain Adam divides each gate's gradient by that gate's own running RMS, so every gate with
    a small but steady pull moves at the full learning rate and closes as fast as an important
    one. With a shared RMS the steps keep the gradients' proportions: the gates that matter
    most for the forget texts close first, the rest barely move, and the mask stays sparse."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            state = self.state.setdefault("group", {"step": 0, "v": 0.0})
            state["step"] += 1
            square = sum(float(p.grad.pow(2).sum()) for p in params) / sum(p.numel() for p in params)
            state["v"] = beta2 * state["v"] + (1 - beta2) * square
            v_hat = state["v"] / (1 - beta2 ** state["step"])
            for p in params:
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                m_hat = m / (1 - beta1 ** state["step"])
                p.sub_(group["lr"] * m_hat / (v_hat ** 0.5 + group["eps"]))


# ---------------------------------------------------------------- the loop

def localize(
    model,
    tokenizer,
    records: Sequence[dict],
    layers: Sequence[FFNLayer],
    config: LocalizeConfig,
    check: Callable[[dict[int, torch.Tensor]], bool] | None = None,
    progress: Callable[[str], None] | None = None,
    targets: Sequence[float] | None = None,
    changes: dict | None = None,
) -> LocalizeResult:
    """Train gates on ``layers`` so that the records' ``text`` becomes unlikely while the
    model's output on their ``neighbors`` stays the same.

    ``check(gates_by_block)`` (deterministic gate values) is called every
    ``config.check_every`` epochs; training stops when it returns True. ``targets`` (one MA per
    record) are the hinge's per-text stopping points in place of ``config.target_ma``.

    ``changes`` (``rollback.neuron_changes`` of every block in ``layers``): each gate moves its
    neuron between the base model's weights (0) and the model's (1) instead of scaling it;
    neurons the fine-tune left alone have no gate (theirs stays at 1 and outside the L0 term)."""
    check_config(config)
    if not records:
        raise NeumuterError("no forget records")
    device = input_device(model)
    pad_id = padding_id(tokenizer)
    generator = torch.Generator().manual_seed(config.seed)
    batches = _forget_batches(model, tokenizer, records, config, targets, pad_id, device, generator, progress)

    started = time.perf_counter()
    original = original_distribution(model, [batch.neighbours for batch in batches], config.kl_top_k)

    log_alpha, optimiser = _gates_and_optimiser(layers, config, device)
    current: list[torch.Tensor] = [torch.ones(layer.neurons) for layer in layers]
    trainable = None if changes is None else [changes[layer.index].changed.to(device) for layer in layers]
    hooks = gated(layers, lambda i: current[i]) if changes is None else \
        interpolated([changes[layer.index] for layer in layers], lambda i: current[i])
    stopped = done = False
    epoch, last, stall = 0, {}, _Stall(config.patience, progress)
    with hooks, \
            steps(progress, config.epochs * len(batches), "localize", "step") as tracker:
        for epoch in range(1, config.epochs + 1):
            totals = {"forget_ce": 0.0, "forget_term": 0.0, "kl": 0.0, "l0": 0.0}
            for b, batch in enumerate(batches):
                # every process draws the noise of every gate from the same generator: the same gates
                for i, la in enumerate(log_alpha):
                    current[i] = _only(trainable, i, training_gate(la, config.beta, generator, config.straight_through))
                sums, reg = _gate_step(model, batch, original[b], log_alpha, optimiser, config, pad_id, epoch,
                                       trainable)
                tracker.advance()
                share = batch.rows / len(records)
                totals["forget_ce"] += sums[3].item() * share
                totals["forget_term"] += sums[1].item() * share
                totals["kl"] += sums[2].item() * share
                totals["l0"] += reg.item() * share
            last = _end_of_epoch(epoch, log_alpha, totals, started, tracker)
            if check is not None and (epoch % config.check_every == 0 or epoch == config.epochs):
                for i in range(len(current)):
                    current[i] = torch.ones(layers[i].neurons)
                with torch.no_grad():
                    done = check({layer.index: _only(trainable, i, deterministic_gate(la.detach()))
                                  for i, (layer, la) in enumerate(zip(layers, log_alpha))})
                if done or stall.stuck(check, changes is not None and config.complete):
                    stopped = epoch < config.epochs
                    tracker.done(epoch * len(batches))
                    break
    final = {layer.index: la.detach().to("cpu", torch.float32) for layer, la in zip(layers, log_alpha)}
    if trainable is not None:       # a neuron without a gate is written as an open one
        final = {b: torch.where(trainable[i].cpu(), la, torch.full_like(la, initial_log_alpha()))
                 for i, (b, la) in enumerate(final.items())}
    pruned = None
    if check is not None and done and config.prune:
        final, pruned = smallest_passing_set(final, check, progress)
    elif check is not None and not done and changes is not None and config.complete:
        final, pruned = complete_by_change(final, {b: changes[b] for b in final}, check, progress)
    return LocalizeResult(
        log_alpha=final, losses=last, epochs_run=epoch, stopped_early=stopped,
        seconds=time.perf_counter() - started, pruned=pruned)


def _forget_batches(model, tokenizer, records: Sequence[dict], config: LocalizeConfig, targets, pad_id: int, device,
                    generator: torch.Generator, progress) -> list[_Batch]:
    """The records' forget texts and neighbours as token ids, checked, in the seeded order of
    training, cut into this process's share of each optimiser step's batch."""
    forget_ids = encode(tokenizer, [r["text"] for r in records], config.max_length)
    neighbour_ids = [encode(tokenizer, r["neighbors"], config.max_length) for r in records]
    for ids, record in zip(forget_ids, records):
        if len(ids) < 2:
            raise NeumuterError(f"forget text {record.get('id', record['text'][:30])!r} has fewer than 2 tokens")
    longest = max(len(ids) for ids in [*forget_ids, *(n for group in neighbour_ids for n in group)])
    check_context(model, longest, "a forget text or neighbour (use a smaller {max_length})")

    order = torch.randperm(len(records), generator=generator).tolist()
    world = distributed.world()
    if world.size > config.batch_size and progress:
        progress(f"warning: batches of {config.batch_size} forget texts split over {world.size} processes: "
                 f"{world.size - config.batch_size} of them have nothing to do (raise the batch size)")
    return [_batch(order[start:start + config.batch_size], forget_ids, neighbour_ids, targets, pad_id, device)
            for start in range(0, len(order), config.batch_size)]


def _gates_and_optimiser(layers: Sequence[FFNLayer], config: LocalizeConfig, device):
    """One log_alpha per neuron of ``layers``, every gate open, and their optimiser."""
    log_alpha = [torch.full((layer.neurons,), initial_log_alpha(), device=device, requires_grad=True)
                 for layer in layers]
    if config.optimizer not in OPTIMIZERS:
        raise NeumuterError(f"unknown optimizer {config.optimizer!r} (choose {', '.join(OPTIMIZERS)})")
    return log_alpha, (SharedAdam if config.optimizer == "shared-adam" else torch.optim.Adam)(log_alpha, lr=config.lr)


class _Stall:
    """Training that no longer brings the forget texts toward their limits: ``patience`` checks in
    a row whose excess (the forget texts' MA above their limits, summed) is not 1 % below the
    best check's."""

    def __init__(self, patience: int, progress=None):
        self.patience, self.progress, self.best, self.since = patience, progress, None, 0

    def stuck(self, check, applies: bool) -> bool:
        excess = (getattr(check, "last", None) or {}).get("excess")
        if not applies or excess is None:
            return False
        if self.best is None or excess < 0.99 * self.best:
            self.best, self.since = excess, 0
            return False
        self.since += 1
        if self.since >= self.patience and self.progress:
            self.progress(f"  stalled: {self.patience} checks without the forget texts' MA above their limits "
                          f"shrinking (best: {self.best:.4f} summed); completing")
        return self.since >= self.patience


def _only(trainable: list[torch.Tensor] | None, i: int, gate: torch.Tensor) -> torch.Tensor:
    """The gate values of the ``i``-th layer, 1 for its neurons without a gate."""
    return gate if trainable is None else torch.where(trainable[i], gate, torch.ones_like(gate))


def _gate_step(model, batch: _Batch, original, log_alpha: list[torch.Tensor], optimiser, config: LocalizeConfig,
               pad_id: int, epoch: int, trainable: list[torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step of the gates on one batch (the gate values already drawn); returns the
    batch's (loss, forget term, KL, CE) summed over the processes, and the L0 term (over the
    ``trainable`` neurons alone, when given)."""
    world = distributed.world()
    reg = l0_term(log_alpha if trainable is None else [la[t] for la, t in zip(log_alpha, trainable)], config.beta)
    term = kl = ce = reg.new_zeros(())
    if batch.forget is not None:
        (f_ids, f_mask), (n_ids, n_mask) = batch.forget, batch.neighbours
        both = _concat(f_ids, f_mask, n_ids, n_mask, pad_id)
        logits = model(input_ids=both[0], attention_mask=both[1]).logits
        f_logits = logits[: f_ids.shape[0], : f_ids.shape[1]]
        n_logits = logits[f_ids.shape[0]:, : n_ids.shape[1]]
        term, ce = forget_loss(f_logits, f_ids, f_mask, config, batch.target)
        kl = neighbour_kl(n_logits, n_mask, original)
    # this process's share of the batch's means (1 in one process); the L0 term once
    term, kl, ce = term * batch.forget_share, kl * batch.neighbour_share, ce * batch.forget_share
    loss = term + config.kl_weight * kl + (config.l0_weight * reg if world.main else 0.0)
    optimiser.zero_grad(set_to_none=True)
    if loss.requires_grad:
        loss.backward()
    sums = torch.stack([loss.detach(), term.detach(), kl.detach(), ce.detach()])
    if world.size > 1:
        for la in log_alpha:
            if la.grad is None:
                la.grad = torch.zeros_like(la)
        distributed.all_reduce_sum([*(la.grad for la in log_alpha), sums])
    if not torch.isfinite(sums[0]):
        raise NonFiniteLoss(f"epoch {epoch}: the loss is not finite ({sums[0].item()})")
    with float32_steps(f"epoch {epoch}"):
        optimiser.step()
    return sums, reg


def _end_of_epoch(epoch: int, log_alpha: list[torch.Tensor], totals: dict, started: float, tracker) -> dict:
    """Refuse gates that are no longer finite, report the epoch, and return its losses."""
    if not all(torch.isfinite(la).all() for la in log_alpha):
        # the flag named as the CLI's: callers of the library test this very message
        raise NeumuterError(f"epoch {epoch}: the gates are not finite any more; try a smaller --lr")
    with torch.no_grad():
        gates = [deterministic_gate(la) for la in log_alpha]
        closed = sum(int((g < 0.5).sum()) for g in gates) / sum(g.numel() for g in gates)
    line = (f"epoch {epoch:3d}  forget CE {totals['forget_ce']:.3f}  neighbour KL {totals['kl']:.4f}  "
            f"L0 {totals['l0']:.4f}  gates < 0.5: {100 * closed:.2f}%  ({time.perf_counter() - started:.1f}s)")
    tracker.advance(0, line, f"epoch {epoch}: CE {totals['forget_ce']:.3f}, KL {totals['kl']:.4f}, "
                             f"gates < 0.5: {100 * closed:.1f}%")
    return dict(epoch=epoch, **{k: round(v, 5) for k, v in totals.items()}, closed=closed)


def keep_most_closed(log_alpha: dict[int, torch.Tensor], k: int) -> dict[int, torch.Tensor]:
    """``log_alpha`` with only its k most-closed moved gates (lowest log_alpha, ties in block and
    neuron order) kept and every other gate reopened (deterministic value exactly 1)."""
    blocks = sorted(log_alpha)
    flat = torch.cat([log_alpha[b] for b in blocks])
    moved = deterministic_gate(flat) < 1.0
    order = torch.sort(torch.where(moved, flat, torch.full_like(flat, float("inf"))), stable=True).indices
    chosen = order[:min(k, int(moved.sum()))]
    kept = torch.full_like(flat, initial_log_alpha())
    kept[chosen] = flat[chosen]
    out, start = {}, 0
    for b in blocks:
        out[b] = kept[start:start + log_alpha[b].numel()]
        start += log_alpha[b].numel()
    return out


def smallest_passing_set(log_alpha: dict[int, torch.Tensor], check, progress=None
                         ) -> tuple[dict[int, torch.Tensor], dict]:
    """Keep only the k most-closed gates (lowest log_alpha) and reopen every other one, with the
    smallest k for which ``check`` still passes, found by bisection (``check`` passing is close to
    monotone in k: more closed gates forget more). Returns the pruned log_alpha and counts."""
    total = sum(int((deterministic_gate(v) < 1.0).sum()) for v in log_alpha.values())

    def keep(k: int) -> dict[int, torch.Tensor]:
        return keep_most_closed(log_alpha, k)

    low, high = 0, total                      # check(keep(high)) passed: it is the trained mask
    passing = getattr(check, "last", None)
    tracker = steps(progress, max(1, math.ceil(math.log2(max(2, total)))), "prune", "probe")
    while high - low > max(1, high // 50):    # 2 %: each probe costs a pass over the forget texts
        middle = (low + high) // 2
        tracker.advance(0, f"  prune: trying the {middle} most-closed gates of {total}", f"{middle} gates")
        if check({b: deterministic_gate(v) for b, v in keep(middle).items()}):
            high, passing = middle, getattr(check, "last", None)
        else:
            low = middle
        tracker.advance()
    tracker.done(tracker.count)               # the bar's total was a bound on the probes
    tracker.close()
    if passing is not None:
        check.last = passing                  # what the kept set scored, not the last failed probe
    return keep(high), {"moved": total, "kept": high}


#: the log_alpha written for a neuron that completion reverts fully (its deterministic gate is 0)
CLOSED = -10.0


def complete_by_change(log_alpha: dict[int, torch.Tensor], changes: dict, check, progress=None
                       ) -> tuple[dict[int, torch.Tensor], dict]:
    """When training ends before ``check`` passes (rollback only): revert fully, beside the gates
    training closed, the changed neurons whose gates are not closed, those the fine-tune changed
    most first (relative size of the change), as few as pass ``check``, found by bisection. A full rollback of every
    changed neuron is the last resort; when even it fails, ``log_alpha`` is returned unchanged.
    Returns the log_alpha with the added neurons closed, and counts."""
    blocks = sorted(log_alpha)
    flat = torch.cat([log_alpha[b] for b in blocks])
    still_open = (deterministic_gate(flat) > 0.0) & torch.cat([changes[b].changed.cpu() for b in blocks])
    sizes = torch.cat([changes[b].size.cpu() for b in blocks])
    order = torch.sort(torch.where(still_open, -sizes, torch.full_like(sizes, math.inf)), stable=True).indices
    order = order[:int(still_open.sum())]

    def closed(k: int) -> dict[int, torch.Tensor]:
        out = flat.clone()
        out[order[:k]] = CLOSED
        return dict(zip(blocks, out.split([log_alpha[b].numel() for b in blocks])))

    say = progress or (lambda message: None)
    say(f"  complete: training ended before every forget text passed; reverting, beside the gates it closed, "
        f"the most-changed of the {len(order)} changed neurons whose gates are not closed, as few as pass")
    low, high = 0, len(order)
    if not check({b: deterministic_gate(v) for b, v in closed(high).items()}):
        say("  complete: not even rolling back every changed neuron passes; the mask is the trained one")
        return log_alpha, {"completed": None, "open": len(order)}
    passing = getattr(check, "last", None)
    while high - low > max(1, high // 50):
        middle = (low + high) // 2
        if check({b: deterministic_gate(v) for b, v in closed(middle).items()}):
            high, passing = middle, getattr(check, "last", None)
        else:
            low = middle
    if passing is not None:
        check.last = passing
    return closed(high), {"completed": high, "open": len(order)}


@dataclass
class _Batch:
    """One optimiser step's forget texts (this process's share of them) and their neighbours."""

    rows: int                        # forget texts in the whole batch, over every process
    forget: tuple | None             # (input_ids, mask) of this process's share; None: no share
    neighbours: tuple | None
    target: torch.Tensor | None      # the hinge's per-text target MA
    forget_share: float              # this share's part of the batch's texts ...
    neighbour_share: float           # ... and of its neighbour tokens (1 and 1 in one process)


def _batch(chosen: list[int], forget_ids, neighbour_ids, targets, pad_id: int, device) -> _Batch:
    def neighbours_of(rows):
        return [ids for i in rows for ids in neighbour_ids[i] if len(ids) >= 1]

    mine = distributed.split(chosen)
    if not mine:
        return _Batch(len(chosen), None, None, None, 0.0, 0.0)
    forget = pad([forget_ids[i] for i in mine], pad_id)
    neighbours = pad(neighbours_of(mine), pad_id)
    target = None if targets is None else torch.tensor([float(targets[i]) for i in mine])
    share = sum(map(len, neighbours_of(mine))) / sum(map(len, neighbours_of(chosen)))
    return _Batch(len(chosen), tuple(t.to(device) for t in forget), tuple(t.to(device) for t in neighbours),
                  target, len(mine) / len(chosen), share)


def _concat(f_ids, f_mask, n_ids, n_mask, pad_id):
    """One forward pass for forget texts and neighbours together (right-padded)."""
    width = max(f_ids.shape[1], n_ids.shape[1])
    def widen(t, value):
        return F.pad(t, (0, width - t.shape[1]), value=value)
    return (torch.cat([widen(f_ids, pad_id), widen(n_ids, pad_id)]),
            torch.cat([widen(f_mask, 0), widen(n_mask, 0)]))


__all__ = ["FORGET_TERMS", "LocalizeConfig", "LocalizeResult", "StopRule", "localize", "forget_loss", "neighbour_kl",
           "forgetting_check", "run_localize"]


# ---------------------------------------------------------------- the stage: records in, mask out

def mask_artifact(model, layers_all: Sequence[FFNLayer], result: LocalizeResult, config: LocalizeConfig,
                  records: Sequence[dict], stop: dict | None = None) -> tuple[dict, dict]:
    """The mask file's tensors and metadata (SPEC §2)."""
    from . import __version__
    from .artifacts import FORMAT_VERSION, MASK_KIND
    from .models import describe
    from .records import sha256_texts

    tensors = {f"log_alpha.{block}": la for block, la in result.log_alpha.items()}
    metadata = {
        "kind": MASK_KIND,
        "format_version": FORMAT_VERSION,
        **describe(model, layers_all),
        "layers": sorted(result.log_alpha),
        "hyperparameters": {**asdict(config), "gamma": GAMMA, "zeta": ZETA},
        "forget_sha256": sha256_texts(r["text"] for r in records),
        "forget_records": len(records),
        "neighbors_per_record": sorted({len(r["neighbors"]) for r in records}),
        "losses": result.losses,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "pruned": result.pruned or {},
        "stop": stop or {},
        "tool_version": __version__,
    }
    return tensors, metadata


def forgetting_check(model, tokenizer, records: Sequence[dict], layers_all: Sequence[FFNLayer],
                     limits: dict, max_length: int, el_n: int = 10, rule: tuple[str, float] = DEFAULT_RULE,
                     progress: Callable[[str], None] | None = None, changes: dict | None = None):
    """A ``check`` for :func:`localize`: select neurons with ``rule`` (as `select` will), scale
    them (with ``changes``: move them toward the base model), and say whether every forget text is at or below the thresholds ``limits``
    (``{"ma": ..., "el_10": ...}``; eq. 17). ``limits["ma"]`` may also be a list with one limit
    per record (the reference model's MA on that text + a tolerance). MA is checked first;
    EL_n only once MA passes.
    ``check.last`` holds the counts of the latest call (``above``, ``el_above``, ``selected``)."""
    from .measure import extraction_likelihood, memorization_accuracy
    from .results import el_key

    ids = encode(tokenizer, [r["text"] for r in records], max_length)
    ma_limits = limits["ma"] if isinstance(limits["ma"], (list, tuple)) else [limits["ma"]] * len(ids)
    label = "its reference-model MA + tolerance" if isinstance(limits["ma"], (list, tuple)) \
        else f"the MA threshold {limits['ma']:.4f}"

    def check(gates_by_block: dict[int, torch.Tensor]) -> bool:
        scales = select_neurons({b: g.cpu() for b, g in gates_by_block.items()}, *rule)
        muted = scaled(model, scales, layers_all) if changes is None else rolled_back(model, changes, scales)
        with muted, _naming(records, "forget text", "the gated model"):
            ma = memorization_accuracy(model, ids)
            above = sum(value > limit for value, limit in zip(ma, ma_limits))
            el_above = None
            if not above and limits.get(el_key(el_n)) is not None:
                el = extraction_likelihood(model, ids, el_n)
                el_above = sum(v is not None and v > limits[el_key(el_n)] for v in el)
        selected = sum(int((s < 1).sum()) for s in scales.values())
        check.last = {"above": above, "el_above": el_above, "selected": selected, "records": len(ids),
                      "mean_ma": sum(ma) / len(ma),
                      "excess": sum(max(0.0, value - limit) for value, limit in zip(ma, ma_limits))}
        if progress:
            extra = "" if el_above is None else f", {el_above} above the EL_{el_n} threshold"
            progress(f"  check: {selected} neurons selected; {above} of {len(ids)} forget texts above "
                     f"{label} (mean MA {sum(ma) / len(ma):.4f}){extra}")
        return above == 0 and (el_above in (0, None))

    check.last = None
    return check


def reference_model_limits(reference_model, tokenizer, records: Sequence[dict], max_length: int,
                           tolerance: float = TOLERANCE) -> dict:
    """Per-text stopping points from a model that never saw the forget texts: each text's MA
    under ``reference_model`` (teacher-forced, computed once before training) + ``tolerance``.
    Forgetting further than that is over-forgetting, itself a membership signal."""
    from .measure import memorization_accuracy

    from .results import check_yardstick, record_label

    ids = encode(tokenizer, [r["text"] for r in records], max_length)
    reference_ma = memorization_accuracy(reference_model, ids)
    for k, (record, ma) in enumerate(zip(records, reference_ma)):
        check_yardstick({"ma": ma}, f"the reference model: forget text {record_label(record, k)}")
    return {"ma": [min(1.0, ma + tolerance) for ma in reference_ma], "reference_ma": reference_ma,
            "tolerance": tolerance}


# ---------------------------------------------------------------- the stage in one call

@dataclass
class LocalizeRun:
    tensors: dict[str, torch.Tensor]     # the mask file's tensors and metadata
    metadata: dict
    result: LocalizeResult
    last_check: dict | None              # the forgetting check's counts for the mask as written


def run_localize(model, tokenizer, records: Sequence[dict], config: LocalizeConfig, layers: str | None = None,
                 stop: StopRule | None = None, progress: Callable[[str], None] | None = None,
                 base: str | None = None) -> LocalizeRun:
    """The `localize` stage: gates on the blocks ``layers`` (SPEC like "10-16,21"; None: all),
    stopped by ``stop`` (its reference model, if any, is loaded here, used and freed before
    training); returns the mask file's content.

    ``base`` (a checkpoint the model was fine-tuned from, loaded as ``stop.load`` says): each
    gate rolls its neuron back toward it instead of scaling it (rollback.py). Only the neurons
    the fine-tune changed are gated (of ``layers``, default: the blocks it changed), and the
    base model is the reference model unless ``stop`` names another or a threshold."""
    from .models import find_ffn_layers, parse_layers

    stop = stop or StopRule()
    say = progress or (lambda message: None)
    check_seed(config.seed)
    torch.manual_seed(config.seed)
    layers_all = find_ffn_layers(model)
    changes, base_info, limits = None, None, None
    if base is not None:
        if config.method != "gates":
            raise ConflictingSettings("{base} rolls back with trained gates: use {method} gates")
        changes, base_info, limits = _load_base(model, tokenizer, records, base, layers, layers_all, stop,
                                                config.max_length, say)
        chosen = [layers_all[b] for b in sorted(changes)]
    else:
        chosen = [layers_all[i] for i in parse_layers(layers, len(layers_all))]
    targets = None
    if limits is not None or stop.reference_model is not None:
        limits = limits or _reference_model_limits(model, tokenizer, records, stop, config.max_length, say)
        targets = limits["reference_ma"] if stop.target_ma is None else None
    else:
        limits = _generic_limits(model, tokenizer, stop, config.max_length, say)
    if stop.target_ma is not None:
        config.target_ma = stop.target_ma
    elif limits is not None and targets is None:
        config.target_ma = limits["ma"] / 2
    check = None
    if limits is not None:
        check = forgetting_check(model, tokenizer, records, layers_all, limits, config.max_length, progress=progress,
                                 changes=changes)
    gates = sum(layer.neurons for layer in chosen) if changes is None else \
        sum(int(change.changed.sum()) for change in changes.values())
    mode = "scaling neurons (the paper)" if changes is None else f"rolling neurons back toward {base}"
    say(f"localize: {len(records)} forget texts, {sum(len(r['neighbors']) for r in records)} neighbours, "
        f"{gates} gates in {len(chosen)} blocks, {mode}")
    if config.method == "attribution":
        result = _by_attribution(model, tokenizer, records, chosen, config, limits, check, progress)
    elif config.method == "gates":
        result = localize(model, tokenizer, records, chosen, config, check=check, progress=progress, targets=targets,
                          changes=changes)
    else:
        raise NeumuterError(f"unknown method {config.method!r} (choose {', '.join(LOCALIZE_METHODS)})")
    tensors, metadata = mask_artifact(model, layers_all, result, config, records, stop=limits)
    if base_info is not None:
        metadata["base"] = base_info
    return LocalizeRun(tensors, metadata, result, check.last if check is not None else None)


def _by_attribution(model, tokenizer, records, layers, config: LocalizeConfig, limits: dict | None, check,
                    progress) -> LocalizeResult:
    """The attribution method (attribution.py): per-text rankings cut where each text reaches its
    stopping point; the forgetting check then scores the union, as for trained gates."""
    from .attribution import localize_by_attribution

    if limits is None:
        raise NeumuterError("the attribution method needs a stopping point: a reference model, reference texts "
                            "or an MA threshold")
    forget_ids = encode(tokenizer, [r["text"] for r in records], config.max_length)
    check_context(model, max(len(ids) for ids in forget_ids), "a forget text (use a smaller {max_length})")
    neighbour_ids = [encode(tokenizer, r["neighbors"], config.max_length) for r in records] \
        if config.contrast or config.score != "gradient" else []
    per_text = limits["ma"] if isinstance(limits["ma"], (list, tuple)) else [limits["ma"]] * len(records)
    found = localize_by_attribution(model, tokenizer, forget_ids, neighbour_ids, layers, per_text,
                                    config.max_per_text, config.contrast, config.score,
                                    shrink_rounds=config.shrink_rounds, progress=progress)
    check({b: deterministic_gate(la) for b, la in found.log_alpha.items()})
    return LocalizeResult(log_alpha=found.log_alpha, losses={}, epochs_run=0, stopped_early=False,
                          seconds=found.seconds,
                          pruned={"per_text": found.per_text, "texts_not_reached": sum(not r for r in found.reached),
                                  "probes": found.probes})


def _naming(records: Sequence[dict], what: str, model: str):
    """A NonFiniteOutput on text k becomes one line naming record k and the model."""
    from .results import record_label

    @contextlib.contextmanager
    def naming():
        try:
            yield
        except NonFiniteOutput as exc:
            label = record_label(records[exc.index], exc.index) if exc.index < len(records) else f"#{exc.index + 1}"
            raise NeumuterError(f"{what} {label}: {model} {exc.problem}") from None
    return naming()


def _load_base(model, tokenizer, records, base: str, layers: str | None, layers_all, stop: StopRule,
               max_length: int, say) -> tuple[dict, dict, dict | None]:
    """Load the base model once: check it is the model's ancestor, keep what the fine-tune
    changed in the blocks ``layers`` (None: every block it changed), and, when ``stop`` names
    no other yardstick, take the base model's MA on each forget text as the stopping points.
    Returns (changes by block, the base's record for the mask, limits or None)."""
    from .models import check_same_tokenizer, load_model, parse_layers, refuse_untrusted_code
    from .reference import same_checkpoint
    from .rollback import base_record, check_ancestor, neuron_changes

    name = getattr(model, "neumuter_source", "the model")
    if isinstance(name, str) and same_checkpoint(name, base):
        raise NeumuterError(f"--base {base} is the model itself: there is nothing to roll back")
    refuse_untrusted_code(base, stop.trust_remote_code_reference, f"base model {base}", "trust_remote_code_reference")
    say(f"loading {escape(base)} (the base model)")
    base_model, base_tokenizer = load_model(base, **asdict(stop.reference_load))
    check_same_tokenizer(tokenizer, base_tokenizer, name, f"base model {base}", [r["text"] for r in records])
    distance = check_ancestor(model, base_model, name, f"base model {base}")
    picked = [layers_all[i] for i in parse_layers(layers, len(layers_all))]
    changes = {b: c for b, c in neuron_changes(model, base_model, picked).items() if bool(c.changed.any())}
    if not changes:
        raise NeumuterError(f"the FFN neurons of {'every block' if layers is None else 'blocks ' + layers} equal "
                            f"those of {base}: there is nothing to roll back")
    changed = sum(int(c.changed.sum()) for c in changes.values())
    say(f"base model {base}: {changed} of {sum(layer.neurons for layer in picked)} FFN neurons changed by the "
        f"fine-tune, in blocks {block_spans(sorted(changes))} (weights {distance:.3f} apart)")
    info = base_record(base_model, base)
    limits = None
    if stop.reference_model is None and stop.reference_texts is None and stop.stop_ma is None:
        limits = _reference_limits_from(model, tokenizer, records, base_model, base_tokenizer,
                                        f"base model {base}", stop, max_length, say)
    elif stop.reference_model is not None and same_checkpoint(stop.reference_model, base):
        limits = _reference_limits_from(model, tokenizer, records, base_model, base_tokenizer,
                                        f"reference model {base}", stop, max_length, say)
    del base_model
    return changes, info, limits


def _reference_model_limits(model, tokenizer, records, stop: StopRule, max_length: int, say) -> dict:
    from .reference import check_not_made_from, refuse_self_reference, same_checkpoint
    from .models import fingerprints, load_model, refuse_untrusted_code

    name = getattr(model, "neumuter_source", "the model")
    what = f"reference model {stop.reference_model}"
    if isinstance(name, str) and same_checkpoint(name, stop.reference_model):
        refuse_self_reference(f"{what} is the checkpoint {name}")
    own = fingerprints(model, rounded=True)
    check_not_made_from(name, own["exact"], what, stop.reference_model)
    refuse_untrusted_code(stop.reference_model, stop.trust_remote_code_reference, what, "trust_remote_code_reference")
    say(f"loading {escape(stop.reference_model)}")
    reference, reference_tokenizer = load_model(stop.reference_model, **asdict(stop.reference_load))
    limits = _reference_limits_from(model, tokenizer, records, reference, reference_tokenizer, what, stop,
                                    max_length, say, own)
    del reference
    return limits


def _reference_limits_from(model, tokenizer, records, reference, reference_tokenizer, what: str, stop: StopRule,
                           max_length: int, say, own: dict | None = None) -> dict:
    """Each forget text's MA under the loaded ``reference`` + the tolerance, after the checks that
    it is not the model under another name and tokenizes as the model does."""
    from .reference import check_not_edited_from, check_not_itself
    from .models import check_same_tokenizer, fingerprints

    name = getattr(model, "neumuter_source", "the model")
    check_same_tokenizer(tokenizer, reference_tokenizer, name, what, [r["text"] for r in records])
    own = own or fingerprints(model, rounded=True)      # one pass over the weights, when the caller made it
    theirs = fingerprints(reference, rounded=True)
    check_not_itself(name, own, what, theirs)
    if isinstance(name, str):
        check_not_edited_from(name, name, what, theirs["exact"])
    with _naming(records, "forget text", what):
        limits = reference_model_limits(reference, tokenizer, records, max_length, stop.tolerance)
    ref = limits["reference_ma"]
    say(f"reference model: forget MA {sum(ref) / len(ref):.4f} (min {min(ref):.4f}, max {max(ref):.4f}); "
        f"early stop when every forget text is at or below its reference MA + {stop.tolerance:g}")
    return limits


def _generic_limits(model, tokenizer, stop: StopRule, max_length: int, say) -> dict | None:
    """Eq. 17's thresholds: ``stop_ma``/``stop_el``, else the MA threshold measured on the
    reference texts (teacher-forced, cheap; EL_10 is only checked when ``stop_el`` gives it)."""
    if stop.reference_texts is None and stop.stop_ma is None:
        return None
    limits = {}
    if stop.stop_ma is None:
        from .measure import memorization_accuracy

        texts = list(stop.reference_texts)[:stop.reference_limit]
        with _naming([{"text": t} for t in texts], "reference text", "the model"):
            values = memorization_accuracy(model, encode(tokenizer, texts, max_length))
        limits["ma"] = sum(values) / len(values)
        say(f"MA threshold {limits['ma']:.4f} (mean over {len(values)} reference texts)")
    else:
        limits["ma"] = stop.stop_ma
    if stop.stop_el is not None:
        limits["el_10"] = stop.stop_el
    say(f"early stop when every forget text has MA <= {limits['ma']:.4f}"
        + (f" and EL_10 <= {stop.stop_el:.4f}" if stop.stop_el is not None else ""))
    return limits
