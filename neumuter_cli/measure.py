"""Memorisation and utility metrics (SPEC §3): MA (eq. 15), EL_n (eq. 16), token loss, corpus
perplexity by windows; and :func:`run_measure`, the whole ``measure`` command as one call. The
verdicts (eq. 17 thresholds, against a reference model), forget quality, MIA AUCs and PrivLeak
live in :mod:`neumuter_cli.mia`, the result and the files it is saved in in
:mod:`neumuter_cli.results`, quantisation in :mod:`neumuter_cli.quantize`, output in
:mod:`neumuter_cli.render`.

Token sequences are the tokenizer's ``input_ids`` of each text (special tokens as the tokenizer
adds them), cut to ``max_length``. Greedy decoding everywhere, never stopping at EOS.

Exact and fast EL_n
-------------------
The definition generates, for every prefix length ``i = 1..T-1``, the greedy continuation
``gen(i)`` of ``w_<i`` with exactly ``T-i`` tokens: ``T`` generate calls per text. Two exact
identities make it cheap:

* Reuse. The first token of ``gen(i)`` is the argmax of the teacher-forced logits at position
  ``i-1`` (the same argmax MA compares). When it equals the true token ``w_i``, greedy decoding
  goes on from the context ``w_<i + [w_i] = w_<(i+1)``, which is exactly the context of
  ``gen(i+1)``; so ``gen(i) = [w_i] + gen(i+1)`` (lengths: ``1 + (T-i-1) = T-i``). Walking the
  prefixes from the longest to the shortest, only the prefixes whose greedy token differs from
  the true one need a real generation. A memorised text (MA ≈ 0.94) needs ~6 % of them.
* Lock-step batches. Every continuation of a text ends at the same absolute position ``T-1``,
  so the rows of a batch can share absolute positions: rows sorted by prefix length, a batch is
  prefilled up to its shortest prefix, then decoded one position at a time, each row fed its
  own true tokens until its prefix ends and its own greedy tokens after that. No padding, no
  attention mask, no position-id tricks: each row is computed as a single-sequence KV-cached
  decode computes it (up to float reduction order, see below). The KV cache is given room for
  the whole batch up front, so a step writes one position in place instead of copying the
  whole cache (transformers' ``DynamicLayer`` concatenates at every step; fastpaths.py).

Overlaps are counted incrementally along the reuse chains (a multiset of the generation's
n-grams, a set of the suffix's n-grams), so the n-gram bookkeeping is O(T) per text, not O(T²).

Float: the argmax of a batched or cached computation can differ from another computation of the
same logits in the last bits; only a near-tie (a top-2 logit gap around 1e-6) can flip. The
naive reference (``baselines/naive_metrics.py``) is itself such a computation.
"""
from __future__ import annotations

import contextlib
import gc
import inspect
import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from . import NeumuterError, distributed, mia
from .config import MeasureConfig
from .errors import NonFiniteOutput, SettingError, SettingsMessage, escape
from .fastpaths import roomy_cache
from .models import input_device
from .progress import ProgressFn, steps, throttled
from .reference import check_not_edited_from, check_not_itself, check_not_made_from, refuse_self_reference, same_checkpoint
from .mia import MIA_RADIUS, is_forgotten, mark, summarize, thresholds
from .results import (HOLDOUT_WHY, UNSEEN_WHY, MeasureResult, check_disjoint, check_yardstick, el_key, read_thresholds,
                      record_label)
from .text import check_context, encode, model_context, pad

#: cap on the logits one teacher-forced forward may hold (batch × length × vocab floats)
LOGIT_BUDGET = 1 << 27


# ---------------------------------------------------------------- model calls

def _forward_params(model) -> set[str]:
    cached = getattr(model, "_neumuter_forward_params", None)
    if cached is None:
        try:
            cached = set(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
            cached = set()
        try:
            model._neumuter_forward_params = cached
        except AttributeError:  # pragma: no cover
            pass
    return cached


def _call(model, input_ids: torch.Tensor, cache=None, last_only: bool = False, attention_mask=None,
          use_cache: bool = True):
    """One forward pass; returns (logits, cache). Works with the transformers 5 ``cache``
    keyword and the older ``past_key_values``; asks for the last position's logits only when
    ``last_only`` and the model supports it."""
    params = _forward_params(model)
    kwargs = {"input_ids": input_ids, "use_cache": use_cache}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if cache is not None:
        kwargs["cache" if "cache" in params else "past_key_values"] = cache
    if last_only:
        if "logits_to_keep" in params:
            kwargs["logits_to_keep"] = 1
        elif "num_logits_to_keep" in params:  # pragma: no cover - transformers < 4.50
            kwargs["num_logits_to_keep"] = 1
    out = model(**kwargs)
    new_cache = None
    if use_cache:
        new_cache = out.get("cache", None)
        if new_cache is None:
            new_cache = out.get("past_key_values", None)
    logits = out.logits
    if last_only:
        logits = logits[:, -1]
    return logits, new_cache


# ---------------------------------------------------------------- teacher forcing: MA and loss

@dataclass
class TeacherForced:
    """One text's teacher-forced pass: ``preds[t]`` = argmax of the logits at position t (the
    greedy guess for token t+1), ``nll[t]`` = -log p(w_{t+1} | w_<=t), for t = 0..T-2.

    With ``stats``: ``mu[t]`` and ``sigma[t]`` = the mean and standard deviation of log p(v)
    over the vocabulary under the model's own distribution p at position t (Min-K %++)."""

    preds: list[int]
    nll: list[float]
    mu: list[float] | None = None
    sigma: list[float] | None = None

    def ma(self, ids: Sequence[int]) -> float:
        return sum(p == w for p, w in zip(self.preds, ids[1:])) / len(self.preds)

    @property
    def loss(self) -> float:
        return math.fsum(self.nll) / len(self.nll)


def _check_lengths(ids_list: Sequence[Sequence[int]], minimum: int = 2) -> None:
    for k, ids in enumerate(ids_list):
        if len(ids) < minimum:
            raise NeumuterError(f"text {k + 1} has {len(ids)} token(s): at least {minimum} are needed to measure it")


#: floor of the variance in Min-K %++'s normalisation (a one-hot distribution has none)
MIN_VARIANCE = 1e-6


def _vocab_stats(logits: torch.Tensor) -> tuple[list[float], list[float]]:
    """Mean and standard deviation of log p(v) under p = softmax(logits), for each row of a
    (positions, vocab) tensor; two passes (the variance as E[(log p - mu)^2], not E[x^2] - mu^2,
    which cancels), zero-probability tokens contributing nothing."""
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    finite = p > 0
    mu = torch.where(finite, p * logp, 0.0).sum(-1)
    var = torch.where(finite, p * (logp - mu[:, None]).square(), 0.0).sum(-1)
    sigma = var.clamp_min(MIN_VARIANCE).sqrt()
    return mu.cpu().tolist(), sigma.cpu().tolist()


@torch.no_grad()
def teacher_forced(model, ids_list: Sequence[Sequence[int]], batch_size: int = 32,
                   progress: ProgressFn = None, stats: bool = False) -> list[TeacherForced]:
    """Greedy guesses and token losses of every text in one teacher-forced forward pass each,
    batched. Texts are sorted by length; equal lengths share a batch without padding, unequal
    ones are right-padded with an attention mask (exact for causal LMs: padding comes after
    every real position). ``stats``: also the vocabulary mean and standard deviation of the
    log-probabilities at each position (same pass, computed text by text to bound memory).
    Split over processes (distributed.enable), each computes every n-th batch exactly as one
    process would, and every process gets every result."""
    _check_lengths(ids_list)
    if ids_list:
        check_context(model, max(map(len, ids_list)), "a text (use a smaller {max_length} or window)")
    device = input_device(model)
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 1
    order = sorted(range(len(ids_list)), key=lambda k: -len(ids_list[k]))
    results: dict[int, TeacherForced | int] = {}   # a text whose logits are not finite: its first such token
    start = 0
    tracker = steps(progress, len(order), "teacher-forced", "text")
    number = -1
    while start < len(order):
        longest = len(ids_list[order[start]])
        size = max(1, min(batch_size, LOGIT_BUDGET // max(1, longest * vocab)))
        batch = order[start:start + size]
        start += size
        number += 1
        if not distributed.owns(number):    # under a launcher, the batches are dealt out round-robin
            continue
        lengths = [len(ids_list[k]) for k in batch]
        x, mask = pad([ids_list[k] for k in batch])
        padded = min(lengths) != longest
        logits, _ = _call(model, x.to(device), attention_mask=mask.to(device) if padded else None,
                          use_cache=False)
        logits = logits[:, :-1].float()
        targets = x[:, 1:].to(logits.device)
        preds = logits.argmax(-1).cpu()
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").cpu()
        finite = torch.isfinite(logits).all(-1).cpu() & torch.isfinite(nll)     # (rows, positions)
        for row, k in enumerate(batch):
            n = lengths[row] - 1
            if not bool(finite[row, :n].all()):      # logits at position t predict token t + 2 (1-based)
                results[k] = int((~finite[row, :n]).nonzero()[0]) + 2
                continue
            results[k] = TeacherForced(preds[row, :n].tolist(), nll[row, :n].tolist())
            if stats:
                results[k].mu, results[k].sigma = _vocab_stats(logits[row, :n])
        tracker.advance(len(batch), f"teacher-forced: {min(start, len(order))}/{len(order)} texts")
    tracker.close()
    gathered = distributed.gather_items(results, len(ids_list))     # every process judges every text
    broken = [k for k, result in enumerate(gathered) if isinstance(result, int)]
    if broken:                                  # the first such text in the order given
        raise NonFiniteOutput(broken[0], token=gathered[broken[0]])
    return gathered  # type: ignore[return-value]


def memorization_accuracy(model, ids_list: Sequence[Sequence[int]], batch_size: int = 32) -> list[float]:
    """MA (eq. 15) of each token sequence: the share of positions t = 1..T-1 where the greedy
    token given w_<t is w_t. One batched teacher-forced pass."""
    return [tf.ma(ids) for tf, ids in zip(teacher_forced(model, ids_list, batch_size), ids_list)]


# ---------------------------------------------------------------- greedy generation in lock-step

@torch.no_grad()
def greedy_continuations(model, rows: Sequence[tuple[Sequence[int], int]], batch_size: int = 64,
                         progress: ProgressFn = None) -> list[list[int]]:
    """Greedy continuations, exactly ``new`` tokens each (no stop at EOS), for rows
    ``(context_ids, new)``.

    Rows are sorted by context length and run in lock-step batches of ``batch_size``: every row
    of a batch sits at the same absolute position. A batch is prefilled with the first ``p0``
    tokens of each row (``p0`` = its shortest context), then decoded one position at a time with
    a KV cache; a row is fed its own context tokens until its context ends and its own greedy
    tokens after that. No padding, no attention mask, no position-id tricks. Split over
    processes (distributed.enable), the batches are dealt out as in :func:`teacher_forced`."""
    results: list[list[int] | None] = [None] * len(rows)
    todo = []
    for j, (context, new) in enumerate(rows):
        if len(context) < 1:
            raise NeumuterError("a greedy continuation needs at least one context token")
        if new <= 0:
            results[j] = []
        else:
            todo.append(j)
    todo.sort(key=lambda j: (len(rows[j][0]), len(rows[j][0]) + rows[j][1]))
    if todo:
        check_context(model, max(len(rows[j][0]) + rows[j][1] - 1 for j in todo), "a generation")
    done = 0
    tracker = steps(progress, len(todo), "greedy generation", "continuation")
    generated: dict[int, list[int]] = {}
    for number, first in enumerate(range(0, len(todo), batch_size)):
        if not distributed.owns(number):    # under a launcher, the batches are dealt out round-robin
            continue
        batch = todo[first:first + batch_size]
        for j, tokens in zip(batch, _lockstep_batch(model, [rows[j] for j in batch])):
            generated[j] = tokens
        done += len(batch)
        tracker.advance(len(batch), f"greedy generation: {done}/{len(todo)} continuations")
    tracker.close()
    if todo:
        gathered = distributed.gather_items({k: generated[j] for k, j in enumerate(todo) if j in generated}, len(todo))
        for j, tokens in zip(todo, gathered):
            results[j] = tokens
    return results  # type: ignore[return-value]


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row, refusing non-finite logits (the argmax of NaN is arbitrary)."""
    if not bool(torch.isfinite(logits).all()):
        raise NeumuterError("a greedy continuation met a non-finite logit (NaN or infinity): the model's "
                            "weights are broken, no number it gives means anything")
    return logits.argmax(-1)


def _lockstep_batch(model, rows) -> list[list[int]]:
    """Every row prefilled to the shortest context, then fed its own context tokens until its
    context ends and its own greedy tokens after that."""
    device = input_device(model)
    starts = [len(context) for context, _ in rows]
    stops = [start + new for start, (_, new) in zip(starts, rows)]
    p0, last = min(starts), max(stops)
    true_tok = torch.zeros(len(rows), last, dtype=torch.long)
    for r, (context, _) in enumerate(rows):
        true_tok[r, :starts[r]] = torch.tensor(list(context), dtype=torch.long)
    true_tok = true_tok.to(device)
    start_t = torch.tensor(starts, device=device)
    out = torch.zeros(len(rows), last, dtype=torch.long, device=device)
    logits, cache = _call(model, true_tok[:, :p0], last_only=True)
    cache = roomy_cache(cache, last)
    nxt = _greedy(logits)                           # prediction for position p0
    for p in range(p0, last):
        out[:, p] = nxt
        if p == last - 1:
            break
        feed = torch.where(start_t > p, true_tok[:, p], nxt)
        logits, cache = _call(model, feed[:, None], cache=cache, last_only=True)
        nxt = _greedy(logits)                       # prediction for position p + 1
    out = out.cpu()
    return [out[r, starts[r]:stops[r]].tolist() for r in range(len(rows))]


# ---------------------------------------------------------------- extraction likelihood

def _diverged_rows(ids_list, tfs):
    """The (record, prefix length i) whose greedy token differs from w_i and whose continuation
    has more than one token, with its generation row: context w_<i + [greedy token]."""
    keys, rows = [], []
    for r, (ids, tf) in enumerate(zip(ids_list, tfs)):
        T = len(ids)
        for i in range(1, T - 1):
            guess = tf.preds[i - 1]
            if guess != ids[i]:
                keys.append((r, i))
                rows.append((list(ids[:i]) + [guess], T - i - 1))
    return keys, rows


def _generate_diverged(model, ids_list, tfs, batch_size, progress) -> dict[tuple[int, int], list[int]]:
    keys, rows = _diverged_rows(ids_list, tfs)
    if progress:
        total = sum(len(ids) - 1 for ids in ids_list)
        progress(f"EL: {len(keys)} of {total} prefixes need a generation "
                 f"(the others reuse the continuation of the next prefix)")
    tails = greedy_continuations(model, rows, batch_size, progress)
    return {key: [row[0][-1]] + tail for key, row, tail in zip(keys, rows, tails)}


def _generation(i, ids, tf, fresh, r, nxt):
    """gen(i) given gen(i+1) (``nxt``): reuse when the greedy token is the true one."""
    guess = tf.preds[i - 1]
    if guess == ids[i]:
        return [ids[i]] + nxt, True
    if i == len(ids) - 1:
        return [guess], False
    return fresh[(r, i)], False


def suffix_generations(model, ids_list: Sequence[Sequence[int]], batch_size: int = 64,
                       tfs: Sequence[TeacherForced] | None = None,
                       progress: ProgressFn = None) -> list[dict[int, list[int]]]:
    """For each text, ``{i: gen(i)}`` for i = 1..T-1: the greedy continuation of w_<i with
    exactly T-i tokens, computed with the reuse identity (for inspection and tests; EL does
    not materialise these)."""
    _check_lengths(ids_list)
    tfs = tfs or teacher_forced(model, ids_list, batch_size)
    fresh = _generate_diverged(model, ids_list, tfs, batch_size, progress)
    out = []
    for r, (ids, tf) in enumerate(zip(ids_list, tfs)):
        gens, nxt = {}, []
        for i in range(len(ids) - 1, 0, -1):
            nxt, _ = _generation(i, ids, tf, fresh, r, nxt)
            gens[i] = nxt
        out.append(gens)
    return out


class _OverlapCounter:
    """Σ_i overlap_i of eq. 16 for one n, fed gen(i) for i = T-1 down to 1.

    overlap_i = #{n-grams of gen(i) (with multiplicity) that occur among the n-grams of the
    true suffix w_i..w_{T-1}} / #(n-grams of that suffix); 0 when the suffix is shorter than n.
    Along a reuse chain gen(i) = [w_i] + gen(i+1): one n-gram joins the generation's multiset,
    at most one joins the suffix's set, so each step is O(1)."""

    def __init__(self, ids: Sequence[int], n: int):
        self.ids, self.n, self.T = ids, n, len(ids)
        self.suffix: set[tuple[int, ...]] = set()
        self.grams: Counter = Counter()
        self.hits = 0           # Σ_{g in grams} [g in suffix]
        self.overlaps: list[float] = []   # overlap_i for i = T-1, T-2, ...

    def step(self, i: int, gen: list[int], reused: bool) -> None:
        n, ids = self.n, self.ids
        new_suffix = tuple(ids[i:i + n]) if self.T - i >= n else None
        if reused:
            if new_suffix is not None and new_suffix not in self.suffix:
                self.suffix.add(new_suffix)
                self.hits += self.grams[new_suffix]
            if len(gen) >= n:
                head = tuple(gen[:n])
                self.grams[head] += 1
                self.hits += head in self.suffix
        else:
            if new_suffix is not None:
                self.suffix.add(new_suffix)
            self.grams = Counter(tuple(gen[k:k + n]) for k in range(len(gen) - n + 1))
            self.hits = sum(c for g, c in self.grams.items() if g in self.suffix)
        count = self.T - i - n + 1
        if count > 0:
            self.overlaps.append(self.hits / count)

    def value(self) -> float | None:
        denominator = self.T - 1 - (self.n - 1)
        if denominator <= 0:
            return None
        total = 0.0
        for overlap in reversed(self.overlaps):   # i = 1, 2, ...: the definition's order, bit for bit
            total += overlap
        return total / denominator


def extraction_likelihoods(model, ids_list: Sequence[Sequence[int]], ns: Sequence[int] = (10,),
                           batch_size: int = 64, tfs: Sequence[TeacherForced] | None = None,
                           progress: ProgressFn = None) -> dict[int, list[float | None]]:
    """EL_n (eq. 16) of each token sequence for every n in ``ns``: {n: [value per text]}.

    EL_n = Σ_{i=1..T-1} overlap_i / (T-n), overlap_i as in :class:`_OverlapCounter`; ``None``
    for a text of n tokens or fewer (no suffix holds an n-gram). Exact and fast: see the module
    docstring. ``tfs``: teacher-forced results already computed for these sequences."""
    ns = tuple(ns)
    if not ns or any(n < 1 for n in ns):
        raise NeumuterError("EL n must be a positive integer")
    _check_lengths(ids_list)
    tfs = tfs or teacher_forced(model, ids_list, batch_size)
    fresh = _generate_diverged(model, ids_list, tfs, batch_size, progress)
    values: dict[int, list[float | None]] = {n: [] for n in ns}
    for r, (ids, tf) in enumerate(zip(ids_list, tfs)):
        counters = [_OverlapCounter(ids, n) for n in ns]
        nxt: list[int] = []
        for i in range(len(ids) - 1, 0, -1):
            gen, reused = _generation(i, ids, tf, fresh, r, nxt)
            for counter in counters:
                counter.step(i, gen, reused)
            nxt = gen
            if not reused:
                fresh.pop((r, i), None)
        for n, counter in zip(ns, counters):
            values[n].append(counter.value())
    return values


def extraction_likelihood(model, ids_list: Sequence[Sequence[int]], n: int = 10, batch_size: int = 64,
                          progress: ProgressFn = None) -> list[float | None]:
    """EL_n (eq. 16) of each token sequence (``None`` when a text has n tokens or fewer)."""
    return extraction_likelihoods(model, ids_list, (n,), batch_size, progress=progress)[n]


# ---------------------------------------------------------------- per-record measurement

def measure_ids(model, ids_list: Sequence[Sequence[int]], el_ns: Sequence[int] = (10,), batch_size: int = 64,
                progress: ProgressFn = None, tfs: Sequence[TeacherForced] | None = None) -> list[dict]:
    """MA, EL_n for each n in ``el_ns`` (none: skip EL) and mean token loss of each token
    sequence: ``[{"tokens", "ma", "el_10", ..., "loss"}]``. ``tfs``: the teacher-forced passes
    of these sequences if already computed."""
    tfs = tfs or teacher_forced(model, ids_list, batch_size, progress)
    results = [{"tokens": len(ids), "ma": tf.ma(ids)} for ids, tf in zip(ids_list, tfs)]
    if el_ns:
        els = extraction_likelihoods(model, ids_list, el_ns, batch_size, tfs=tfs, progress=progress)
        for n in el_ns:
            for result, value in zip(results, els[n]):
                result[el_key(n)] = value
    for result, tf in zip(results, tfs):
        result["loss"] = tf.loss
    return results


def measure_records(model, tokenizer, texts: Sequence[str], el_ns: Sequence[int] = (10,),
                    max_length: int | None = 200, batch_size: int = 64,
                    progress: ProgressFn = None) -> list[dict]:
    """Tokenise ``texts`` (cut to ``max_length``) and measure each: see :func:`measure_ids`."""
    return measure_ids(model, encode(tokenizer, texts, max_length), el_ns, batch_size, progress)


# ---------------------------------------------------------------- perplexity

def _windows(length: int, window: int, stride: int):
    """(begin, end, first scored position) of each window over a text of ``length`` tokens:
    every position 1..length-1 is scored exactly once, with the most context the window
    leaves; a window's first token has no context and is never scored."""
    prev_end = 0
    begin = 0
    while True:
        end = min(begin + window, length)
        first = max(prev_end, begin + 1)
        if end > first:
            yield begin, end, first
        prev_end = end
        if end >= length:
            return
        begin += stride


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], window: int | None = None, stride: int | None = None,
               batch_size: int = 32, progress: ProgressFn = None) -> dict:
    """Corpus perplexity of (long) texts by sliding windows over each text separately.

    ``window``: tokens per forward pass (default: the model's context, capped at 1024).
    ``stride``: how far the window moves (default ``window``: non-overlapping windows, each
    scoring all its tokens but the first). With ``stride < window`` each window scores only the
    tokens the previous one did not, with the earlier tokens as context (the usual
    sliding-window perplexity). Returns ``{"perplexity", "nll", "tokens", "window", "stride"}``:
    ``tokens`` = the number of scored tokens, ``nll`` = their mean negative log-likelihood."""
    window = window or model_context(model, tokenizer)
    stride = stride or window
    if window < 2:      # the settings of `measure` that give them (a usage error there)
        raise SettingError("ppl_window", f"(the perplexity window) must be at least 2 tokens, not {window}")
    if not 1 <= stride <= window:
        raise SettingError("ppl_stride", f"(the perplexity stride) must be between 1 and the window ({window}), "
                                         f"not {stride}")
    pieces = []  # (token ids of the window, index of the first scored position inside it)
    owners = []  # the text each window comes from
    for k, ids in enumerate(encode(tokenizer, texts, None)):
        for begin, end, first in _windows(len(ids), window, stride):
            pieces.append((ids[begin:end], first - begin))
            owners.append(k)
    if not pieces:
        raise NeumuterError("no text is long enough to score (each needs at least 2 tokens)")
    chunks = [piece[0] for piece in pieces]
    try:
        tfs = teacher_forced(model, chunks, batch_size, progress=None)
    except NonFiniteOutput as exc:
        raise NonFiniteOutput(owners[exc.index]) from None
    total, count = 0.0, 0
    for (chunk, skip), tf in zip(pieces, tfs):
        scored = tf.nll[skip - 1:]
        total += math.fsum(scored)
        count += len(scored)
    nll = total / count
    if nll > math.log(sys.float_info.max):
        raise NeumuterError(f"the perplexity overflows: the mean loss is {nll:.6g} nats per token "
                            "(the model's weights are broken)")
    if progress:
        progress(f"perplexity: {count} tokens in {len(pieces)} windows of ≤ {window} (stride {stride})")
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "window": window, "stride": stride}


# ---------------------------------------------------------------- extraction examples (Table 14)

def generations(model, tokenizer, texts: Sequence[str], prefix_tokens: int = 100, new_tokens: int = 100,
                batch_size: int = 64) -> list[dict | None]:
    """The paper's extraction attack (Table 14): the first ``prefix_tokens`` tokens of each text
    as the prompt, the greedy ``new_tokens``-token continuation beside the true suffix.

    Each result: ``prefix``, ``true``, ``generated`` (texts), ``matching`` = the number of
    leading generated tokens equal to the true ones, ``diverges_at`` = the first token index
    where they differ (None if they never do within the true suffix), ``same`` / ``different``
    = the generated text split there. ``None`` for a text no longer than the prefix."""
    ids_list = encode(tokenizer, texts, prefix_tokens + new_tokens)
    keep = [k for k, ids in enumerate(ids_list) if len(ids) > prefix_tokens]
    gens = greedy_continuations(model, [(ids_list[k][:prefix_tokens], new_tokens) for k in keep], batch_size)
    out: list[dict | None] = [None] * len(ids_list)
    for k, gen in zip(keep, gens):
        true = ids_list[k][prefix_tokens:]
        matching = 0
        while matching < min(len(gen), len(true)) and gen[matching] == true[matching]:
            matching += 1
        diverges = matching if matching < len(true) else None
        out[k] = {
            "prefix": tokenizer.decode(ids_list[k][:prefix_tokens]),
            "true": tokenizer.decode(true),
            "generated": tokenizer.decode(gen),
            "matching": matching,
            "diverges_at": diverges,
            "same": tokenizer.decode(gen[:matching]),
            "different": tokenizer.decode(gen[matching:]),
        }
    return out



# ---------------------------------------------------------------- one `measure` run: the library entry point

def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _tokenize(tokenizer, records: Sequence[dict], max_length: int | None, name: str):
    """Token ids of each record cut to ``max_length``, and each text's zlib length (of the
    measured part: the text itself, or the decoded tokens when the text was cut)."""
    full = encode(tokenizer, [r["text"] for r in records], None)
    ids = [x[:max_length] if max_length else x for x in full]
    compressed = []
    for k, (record, x, whole) in enumerate(zip(records, ids, full)):
        if len(x) < 2:
            raise NeumuterError(f"{name}: record {record_label(record, k)} has {len(x)} token(s); "
                                "at least 2 are needed to measure it")
        text = record["text"] if len(x) == len(whole) else tokenizer.decode(x, skip_special_tokens=True)
        compressed.append(max(1, mia.zlib_length(text)))
    return ids, compressed


def _measure_with_passes(model, ids_list, el_ns, batch_size, progress, stats: bool):
    """:func:`measure_ids` that also returns the teacher-forced passes (for the MIA scores)."""
    tfs = teacher_forced(model, ids_list, batch_size, progress, stats=stats)
    return measure_ids(model, ids_list, el_ns, batch_size, progress, tfs=tfs), tfs


def _mia_scores(tfs, compressed) -> list[dict]:
    return [mia.mia_scores(tf.nll, tf.mu, tf.sigma, c) for tf, c in zip(tfs, compressed)]


def _read_records_input(config: MeasureConfig) -> list[dict]:
    from .records import EmptyInput, read_records

    if config.input_path is None:
        return []
    if config.input_path == "-" and config.ppl_path:   # perplexity alone: an empty stdin is fine
        try:
            return read_records("-")
        except EmptyInput:
            return []
    return read_records(config.input_path)


def _reference_aucs_from_file(scores: dict, holdout: dict, progress: ProgressFn) -> dict | None:
    """The reference's AUCs from a saved JSON output made with the same holdout; None (and a
    warning) when the file has none."""
    summary = scores.get("summary") or {}
    saved = summary.get("holdout")
    keys = [f"auc_{name}" for name in mia.MIA_SCORES]
    if not isinstance(saved, dict) or not all(isinstance(summary.get(k), (int, float)) for k in keys):
        if progress:
            progress(f"warning: {escape(scores['path'])} holds no holdout AUCs, so no PrivLeak: write it with "
                     "`measure RECORDS --model REF --holdout HOLDOUT --format json`")
        return None
    if any(saved.get(k) != holdout[k] for k in ("records", "tokens", "sha256")):
        raise SettingsMessage("{path} was measured with another holdout set (or {max_length}): PrivLeak needs "
                              "both models' AUCs on the same holdout texts", path=scores["path"])
    check_yardstick({k: summary[k] for k in keys}, f"{scores['path']}: summary")
    return {k: float(summary[k]) for k in keys}


@contextlib.contextmanager
def _naming(records: Sequence[dict], name: str, model: str):
    """A NonFiniteOutput on sequence k becomes one line naming record k of ``name`` and the model."""
    try:
        yield
    except NonFiniteOutput as exc:
        label = record_label(records[exc.index], exc.index) if exc.index < len(records) else f"#{exc.index + 1}"
        raise NeumuterError(f"{name}: record {label}: {model} {exc.problem}; no verdict is given") from None


def run_measure(config: MeasureConfig, progress: ProgressFn = None) -> MeasureResult:
    """One ``measure`` run: read every input, load the model (and quantise it), measure the
    records (MA, EL_n, loss), the eq. 17 reference set, the holdout texts, generations and
    perplexity; then, the model freed, the reference model on the same token ids; finally the
    verdicts, forget quality, AUCs and PrivLeak. At most one model is in memory at a time.

    Every number comes from finite logits (a NaN or infinite one is refused, naming the record)
    of a model loaded whole (``models.load_model``). The reference is never the model itself:
    a reference model with the model's fingerprint, or reference scores that the model itself
    wrote (their ``model_fingerprint``), are refused. Each output record carries
    ``model_fingerprint``, the fingerprint of the model as loaded (before any quantisation), so
    that the output used as reference scores later says where it came from."""
    config.validate()
    say = progress or (lambda message: None)
    inner = throttled(progress)
    inputs = _read_inputs(config)                                # 1. every input, before any model
    measured = _measure_model(config, inputs, say, inner)        # 2. the model, freed on return
    reference = _measure_reference(config, inputs, measured, say, inner)    # 3. alone in memory
    return _judge(config, inputs, measured, reference, say)      # 4. verdicts and summary


@dataclass
class _Inputs:
    """Every input of one run, read and checked before any model loads."""

    records: list[dict]
    name: str                        # how messages name the records' file
    ref_records: list[dict] | None   # eq. 17's texts never seen
    limits: dict | None              # eq. 17's thresholds, read (or, later, measured on ref_records)
    holdout_records: list[dict] | None
    ppl_records: list[dict] | None
    ref_scores: dict | None          # a reference model's saved numbers

    @property
    def texts(self) -> list[str]:
        return [r["text"] for r in self.records]


def _read_inputs(config: MeasureConfig) -> _Inputs:
    """Read every file, then check what can be checked without weights: the quantisation type,
    and a reference model's checkpoint name, tokenizer and vocabulary."""
    from .models import (check_same_tokenizer, check_vocabulary, checkpoint_vocab_size, load_tokenizer,
                         refuse_untrusted_code)
    from .quantize import gguf_type
    from .records import read_records

    el_ns = tuple(config.el_ns)
    records = _read_records_input(config)
    inputs = _Inputs(
        records, "<stdin>" if config.input_path == "-" else str(config.input_path),
        read_records(config.reference_path) if config.reference_path else None,
        read_thresholds(config.thresholds_path, el_ns) if config.thresholds_path else None,
        read_records(config.holdout_path) if config.holdout_path else None,
        read_records(config.ppl_path) if config.ppl_path else None, None)
    if config.check and not records:
        raise SettingsMessage("{check}: no records to check")
    _check_disjoint(inputs, config)
    for setting in ("reference_model", "reference_scores_path", "holdout_path"):
        if getattr(config, setting) and not records:
            raise SettingsMessage("{" + setting + "} needs records to measure")
    if config.reference_scores_path:
        inputs.ref_scores = mia.read_reference_scores(config.reference_scores_path, inputs.texts, el_ns)
    if config.quantize:
        gguf_type(config.quantize)          # an unknown type or a missing gguf fails now
    if config.reference_model:               # compare the tokenizers before any weight loads
        label = f"reference model {config.reference_model}"
        if same_checkpoint(config.model, config.reference_model):
            refuse_self_reference(f"{label} is the checkpoint {config.model}")
        trusted = config.trust_remote_code_reference         # trust is per model: never the model's flag
        refuse_untrusted_code(config.model, config.trust_remote_code, config.model)
        refuse_untrusted_code(config.reference_model, trusted, label, "trust_remote_code_reference")
        reference_tokenizer = load_tokenizer(config.reference_model, trusted)
        check_same_tokenizer(load_tokenizer(config.model, config.trust_remote_code), reference_tokenizer,
                             config.model, label, inputs.texts + [r["text"] for r in inputs.holdout_records or []])
        rows = checkpoint_vocab_size(config.reference_model, trusted)
        if rows is not None:                 # an embedding too small fails now, not after the first model
            check_vocabulary(label, rows, reference_tokenizer)
    return inputs


def _check_disjoint(inputs: _Inputs, config: MeasureConfig, measured: "_Measured | None" = None,
                    ref_ids: Sequence[Sequence[int]] | None = None) -> None:
    """The holdout and eq. 17's texts never seen hold none of the records: compared by text
    before the model loads, by the token ids measured (``measured``) once it has."""
    for others, path, ids, why in ((inputs.holdout_records, config.holdout_path,
                                    measured and measured.holdout_ids, HOLDOUT_WHY),
                                   (inputs.ref_records, config.reference_path, ref_ids, UNSEEN_WHY)):
        if not others or not inputs.records:
            continue
        if measured is None:
            check_disjoint(inputs.records, inputs.texts, [r["text"] for r in others], inputs.name, path, why)
        elif ids is not None:
            check_disjoint(inputs.records, list(map(tuple, measured.ids)), list(map(tuple, ids)), inputs.name,
                           path, why, tokens=True)


@dataclass
class _Measured:
    """What the model gave, and the token ids the reference model is measured on."""

    prints: dict[str, str]           # models.fingerprints of the model as loaded
    quantized: dict | None
    ids: list[list[int]]
    compressed: list[int]            # each record's zlib length (MIA)
    results: list[dict]
    limits: dict | None
    holdout_ids: list[list[int]] | None = None
    holdout_compressed: list[int] | None = None
    scores: dict | None = None       # MeasureResult.mia_scores
    generations: list | None = None
    perplexity: dict | None = None


def _measure_model(config: MeasureConfig, inputs: _Inputs, say, inner) -> _Measured:
    """Load the model, refuse reference scores it wrote itself, quantise it, and measure every
    text under it. The model is freed when this returns."""
    from .models import fingerprints, load_model
    from .quantize import quantize_model

    el_ns, records, ref_scores = tuple(config.el_ns), inputs.records, inputs.ref_scores
    say(f"loading {escape(config.model)}")
    lm, tokenizer = load_model(config.model, **asdict(config.load))
    # of the model as loaded, before any quantisation; rounded too, to compare with the reference
    prints = fingerprints(lm, rounded=bool(config.reference_model))
    _check_not_own_reference(config, prints["exact"], ref_scores)
    quantized = quantize_model(lm, config.quantize, say) if config.quantize else None
    ids, compressed = _tokenize(tokenizer, records, config.max_length, inputs.name) if records else ([], [])
    if ref_scores is not None:
        _check_same_tokens(ref_scores, ids)
    with_mia = inputs.holdout_records is not None
    label = f"model {config.model}"
    measured = _Measured(prints, quantized, ids, compressed, [], inputs.limits)
    tfs = []
    if records:
        say(f"measuring {len(records)} records of {escape(inputs.name)} ({sum(map(len, ids))} tokens)")
        with _naming(records, inputs.name, label):
            measured.results, tfs = _measure_with_passes(lm, ids, el_ns, config.batch_size, inner, with_mia)
    if inputs.ref_records is not None:
        ref_ids, _ = _tokenize(tokenizer, inputs.ref_records, config.max_length, config.reference_path)
        _check_disjoint(inputs, config, measured, ref_ids)
        say(f"measuring {len(inputs.ref_records)} records of {escape(config.reference_path)} "
            f"({sum(map(len, ref_ids))} tokens)")
        with _naming(inputs.ref_records, config.reference_path, label):
            measured.limits = thresholds(measure_ids(lm, ref_ids, el_ns, config.batch_size, inner), el_ns)
        check_yardstick(measured.limits, f"{config.reference_path}: the mean")
    if measured.limits is not None:
        mark(measured.results, measured.limits, el_ns)
    if with_mia:
        measured.holdout_ids, measured.holdout_compressed = _tokenize(tokenizer, inputs.holdout_records,
                                                                      config.max_length, config.holdout_path)
        _check_disjoint(inputs, config, measured)
        say(f"scoring {len(measured.holdout_ids)} holdout texts ({sum(map(len, measured.holdout_ids))} tokens)")
        member_scores = _mia_scores(tfs, compressed)
        with _naming(inputs.holdout_records, config.holdout_path, label):
            holdout_tfs = teacher_forced(lm, measured.holdout_ids, config.batch_size, inner, stats=True)
        measured.scores = {"records": member_scores, "holdout": _mia_scores(holdout_tfs, measured.holdout_compressed)}
    if config.generations and records:
        say(f"generating {min(config.generations, len(records))} continuations")
        measured.generations = generations(lm, tokenizer, inputs.texts[:config.generations], config.prefix_tokens,
                                           config.new_tokens, config.batch_size)
    if inputs.ppl_records is not None:
        with _naming(inputs.ppl_records, config.ppl_path, label):
            measured.perplexity = perplexity(lm, tokenizer, [r["text"] for r in inputs.ppl_records],
                                             config.ppl_window, config.ppl_stride, config.batch_size, inner)
    return measured


def _check_not_own_reference(config: MeasureConfig, fingerprint: str, ref_scores: dict | None) -> None:
    """Refuse a reference model made from the model, and reference scores the model wrote."""
    if config.reference_model:
        check_not_made_from(config.model, fingerprint, f"reference model {config.reference_model}",
                            config.reference_model)
    if ref_scores is not None:
        if ref_scores["fingerprint"] == fingerprint:
            refuse_self_reference(f"reference scores {ref_scores['path']} were measured on a model with the "
                                  f"fingerprint of {config.model} ({fingerprint})")
        check_not_edited_from(config.model, config.model, f"the model of reference scores {ref_scores['path']}",
                              ref_scores["fingerprint"])


def _check_same_tokens(ref_scores: dict, ids: Sequence[Sequence[int]]) -> None:
    for k, (entry, x) in enumerate(zip(ref_scores["records"], ids)):
        if entry["tokens"] is not None and entry["tokens"] != len(x):
            raise SettingsMessage("{path}: record {number} was measured on {measured} tokens, here it has "
                                  "{tokens}: measure the reference with the same {max_length} and tokenizer",
                                  path=ref_scores["path"], number=k + 1, measured=entry["tokens"], tokens=len(x))


@dataclass
class _Reference:
    """The reference's numbers on the records: measured under a reference model, or saved."""

    results: list[dict] | None = None
    fingerprint: str | None = None
    aucs: dict | None = None
    quantized: dict | None = None


def _measure_reference(config: MeasureConfig, inputs: _Inputs, measured: _Measured, say, inner) -> _Reference:
    """The reference model on the records' token ids (and the holdout's), alone in memory; or the
    saved reference scores. Adds the reference's MIA scores to ``measured.scores``."""
    from .models import fingerprints, load_model
    from .quantize import quantize_model

    if not config.reference_model:
        if inputs.ref_scores is None:
            return _Reference()
        return _Reference(inputs.ref_scores["records"], inputs.ref_scores["fingerprint"])
    _free_memory()
    label = f"reference model {config.reference_model}"
    say(f"loading reference model {escape(config.reference_model)}")
    ref_lm, _ = load_model(config.reference_model, **asdict(config.reference_load))
    prints = fingerprints(ref_lm, rounded=True)
    check_not_itself(config.model, measured.prints, label, prints)
    reference = _Reference(fingerprint=prints["exact"])
    check_not_edited_from(config.model, config.model, label, reference.fingerprint)
    reference.quantized = quantize_model(ref_lm, config.quantize, say) if config.quantize_reference else None
    say(f"measuring the {len(inputs.records)} records under the reference model")
    with_mia = inputs.holdout_records is not None
    with _naming(inputs.records, inputs.name, label):
        reference.results, ref_tfs = _measure_with_passes(ref_lm, measured.ids, tuple(config.el_ns),
                                                          config.batch_size, inner, with_mia)
    for k, (record, result) in enumerate(zip(inputs.records, reference.results)):
        check_yardstick(result, f"{label}: record {record_label(record, k)}")
    if with_mia:
        say(f"scoring the {len(measured.holdout_ids)} holdout texts under the reference model")
        with _naming(inputs.holdout_records, config.holdout_path, label):
            ref_holdout = teacher_forced(ref_lm, measured.holdout_ids, config.batch_size, inner, stats=True)
        scores = measured.scores
        scores.update(ref_records=_mia_scores(ref_tfs, measured.compressed),
                      ref_holdout=_mia_scores(ref_holdout, measured.holdout_compressed))
        reference.aucs = mia.aucs(scores["ref_records"], scores["ref_holdout"])
    del ref_lm, ref_tfs
    _free_memory()
    return reference


def _judge(config: MeasureConfig, inputs: _Inputs, measured: _Measured, reference: _Reference,
           say) -> MeasureResult:
    """The verdicts on the records, and the summary of the run."""
    from .records import sha256_texts

    el_ns, results = tuple(config.el_ns), measured.results
    fingerprint = measured.prints["exact"]
    if reference.results is not None:
        mia.mark_against_reference(results, reference.results, el_ns, config.tolerance)
    out_records = [{**record, **result, "model_fingerprint": fingerprint}
                   for record, result in zip(inputs.records, results)]
    for record, gen in zip(out_records, measured.generations or []):
        record["generation"] = gen
    summary = {"model": {"name": config.model, "fingerprint": fingerprint}}
    if results:
        summary.update(summarize(results, el_ns, measured.limits))
    if reference.results is not None:
        source = ({"model": config.reference_model} if config.reference_model
                  else {"scores": config.reference_scores_path})
        summary["reference"] = {**source, "fingerprint": reference.fingerprint, "tolerance": config.tolerance}
        if reference.quantized:
            summary["reference"]["quantized"] = reference.quantized
        summary.update(mia.reference_summary(results, el_ns))
    if measured.scores is not None:
        holdout = {"records": len(measured.holdout_ids), "tokens": sum(map(len, measured.holdout_ids)),
                   "sha256": sha256_texts(r["text"] for r in inputs.holdout_records)}
        summary["holdout"] = holdout
        model_aucs = mia.aucs(measured.scores["records"], measured.scores["holdout"])
        summary.update(model_aucs)
        ref_aucs = reference.aucs
        if inputs.ref_scores is not None:
            ref_aucs = _reference_aucs_from_file(inputs.ref_scores, holdout, say)
        if ref_aucs is not None:
            summary.update({f"ref_{key}": value for key, value in ref_aucs.items()})
            summary.update(mia.privleaks(model_aucs, ref_aucs))
    if measured.quantized:
        summary["quantized"] = measured.quantized
    if measured.perplexity is not None:
        summary["perplexity"] = measured.perplexity
    return MeasureResult(out_records, summary, tuple(config.el_ns), measured.scores)


__all__ = [
    "teacher_forced", "TeacherForced", "memorization_accuracy", "greedy_continuations", "suffix_generations",
    "extraction_likelihoods", "extraction_likelihood", "measure_ids", "measure_records", "perplexity", "generations",
    "MeasureConfig", "run_measure",
    # defined in results, mia and text, and still importable from here
    "MeasureResult", "el_key", "record_label", "read_thresholds", "thresholds", "is_forgotten", "mark", "summarize",
    "MIA_RADIUS", "encode", "check_context", "model_context",
]
