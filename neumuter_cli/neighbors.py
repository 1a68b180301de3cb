"""Neighbour texts made with a masked LM (SPEC §1; paper sec. 3.1 and C.4.3).

For each text, each of its ``k`` neighbours is made thus: tokenise the text with the MLM's
tokenizer; choose a random proportion ``ratio`` of its token positions (all of them when
``ratio = 1``); visit them in increasing order, and at each one put the mask token there, let
the MLM predict it from the *current* text (the positions already visited hold their
predictions) and write the prediction back. Special tokens are never predicted.

The choice of positions follows the yardstick (``baselines/naive_neighbors.py``; it cuts texts
to the window, this module does not) exactly: one
``random.Random(seed)`` for the whole stream, and for each text, for each neighbour in order,
``sorted(rng.sample(range(n_tokens), max(1, int(n_tokens * ratio))))``. The prediction is the
argmax (``temperature = 0``) or a sample from the temperature-scaled, optionally top-k
restricted distribution, drawn from a generator of its own per (record, neighbour), so the
result does not depend on the batch size or on how the stream is grouped.

Speed: every MLM call advances many sequences (records × neighbours) by one visited position
each; the rows of a call have similar lengths (little padding); the vocabulary projection, and
for BERT-like encoders the whole last layer, are computed only at the masked positions.

A text longer than the MLM's window is rewritten whole: position ``p`` is predicted from the
window of the current text centred on ``p`` (clamped to the text's ends).
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Sequence

import torch

from . import NeumuterError, distributed, fastpaths
from .config import MAX_NEIGHBORS, NeighborsConfig, check_seed
from .errors import SettingError
from .progress import Steps, steps
from .text import pad, padding_id

GROUP_BATCHES = 4           # records are read and rewritten in groups of about this many batches
MAX_HELD_TOKENS = 1 << 22   # the most tokens the neighbours of one record may hold at once
MIN_ROWS = 8                # a call is not cut for padding's sake below this many rows ...
PAD_WASTE = 0.1             # ... and above it, once padding would exceed this share of its tokens

ProgressFn = Callable[[str], None]


# ---------------------------------------------------------------- loading

def load_mlm(name_or_path: str, device: str = "auto", trust_remote_code: bool = False):
    """Load a masked LM and its tokenizer (local dir or hub name), frozen, in eval mode.

    Returns (model, tokenizer). The tokenizer must have a mask token. ``trust_remote_code``:
    the MLM's own code may run (a checkpoint that needs it is refused otherwise)."""
    from transformers import AutoModelForMaskedLM

    from .models import check_model_path, first_line, load_tokenizer, refuse_untrusted_code, resolve_device

    check_model_path(name_or_path)
    refuse_untrusted_code(name_or_path, trust_remote_code, f"the masked LM {name_or_path}", "trust_remote_code_mlm")
    target = distributed.place(resolve_device(device))
    try:
        mlm = AutoModelForMaskedLM.from_pretrained(name_or_path, dtype=torch.float32,
                                                   trust_remote_code=trust_remote_code)
    except Exception as exc:   # OSError, ValueError, a pickled file torch refuses to unpickle, ...
        raise NeumuterError(f"cannot load the masked LM {name_or_path}: {first_line(exc)}") from None
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    if tokenizer.mask_token_id is None:
        raise NeumuterError(f"{name_or_path}: the tokenizer has no mask token (is it a masked LM?)")
    mlm.to(target).eval()
    for param in mlm.parameters():
        param.requires_grad_(False)
    return mlm, tokenizer


def mlm_window(model, tokenizer) -> int:
    """Tokens per MLM call, special tokens included."""
    window = int(getattr(model.config, "max_position_embeddings", 512))
    if getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        window -= 2  # position ids start after the padding index
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < window:
        window = limit
    return window


# ---------------------------------------------------------------- the rewrite

@dataclass
class _Sequence:
    """One neighbour being written: the current token ids and the positions still to visit."""

    slot: int                      # index in the caller's output list
    tokens: list[int]              # current text, no special tokens
    positions: list[int]           # visited in this order
    rng: random.Random | None      # for sampling
    step: int = 0
    copies: list[int] = field(default_factory=list)  # other slots with the same (greedy) result


class NeighborWriter:
    """Makes neighbours for a stream of texts with one masked LM.

    Call it on successive lists of texts (or use :meth:`records`); the position RNG runs on
    across calls, so cutting the stream into groups does not change the result.

    The settings are a :class:`NeighborsConfig` (default: its defaults); keyword arguments
    named like its fields (``k=3``, ``temperature=0``) override single ones."""

    def __init__(self, model, tokenizer, config: NeighborsConfig | None = None,
                 progress: ProgressFn | None = None, **settings):
        config = replace(config or NeighborsConfig(), **settings)
        k, ratio, temperature = config.k, config.ratio, config.temperature
        if k < 1:
            raise SettingError("k", "must be at least 1")
        if k > MAX_NEIGHBORS:
            raise SettingError("k", f"must be at most {MAX_NEIGHBORS}, not {k}")
        check_seed(config.seed)
        if not 0.0 < ratio <= 1.0:
            raise SettingError("ratio", f"(the share of tokens rewritten) must be in (0, 1], not {ratio}")
        if temperature < 0 or not math.isfinite(temperature):
            raise SettingError("temperature", f"must be 0 (argmax) or positive, not {temperature}")
        if config.top_k < 0:
            raise SettingError("top_k", "must be 0 (no limit) or positive")
        if config.batch_size < 1:
            raise SettingError("batch_size", "must be at least 1")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.k, self.ratio, self.seed = k, ratio, config.seed
        self.temperature, self.top_k, self.batch_size = temperature, config.top_k, config.batch_size
        self.progress = progress
        self.window = mlm_window(model, tokenizer)
        if self.window < 3:
            raise NeumuterError(f"the MLM's window ({self.window} tokens) is too small")
        self.context = self.window - 2
        self.cls_id = _special_id(tokenizer, "cls_token_id", "bos_token_id")
        self.sep_id = _special_id(tokenizer, "sep_token_id", "eos_token_id")
        self.mask_id = tokenizer.mask_token_id
        self.pad_id = padding_id(tokenizer)
        self.device = model.get_input_embeddings().weight.device
        self.banned = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long, device=self.device)
        self._position_rng = random.Random(self.seed)
        self._records_seen = 0
        self._head = model.get_output_embeddings()
        self._gather: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, masked columns) of a call
        self._fast_layer = None
        self._check_fast_path()
        self.calls = 0     # MLM calls so far
        self.rewrites = 0  # token positions predicted so far
        self._tracker = Steps(progress, None)   # lines; while records() runs, its bar

    # -- public

    def __call__(self, texts: Sequence[str]) -> list[list[str]]:
        """The ``k`` neighbours of each text, in order."""
        token_lists = [self.tokenizer.tokenize(text) for text in texts]
        ids = [self.tokenizer.convert_tokens_to_ids(tokens) for tokens in token_lists]
        out = self.rewrite_ids(ids)
        return [[self.tokenizer.convert_tokens_to_string(self.tokenizer.convert_ids_to_tokens(seq))
                 for seq in per_text] for per_text in out]

    def rewrite_ids(self, token_ids: Sequence[Sequence[int]]) -> list[list[list[int]]]:
        """The same on MLM token ids (no special tokens): ``k`` rewritten id lists per text."""
        sequences: list[_Sequence] = []
        greedy_seen: dict[tuple, _Sequence] = {}
        for t, tokens in enumerate(token_ids):
            record = self._records_seen + t
            if len(tokens) == 0:
                raise NeumuterError(f"record {record + 1}: the text has no token for the masked LM")
            if len(tokens) * self.k > MAX_HELD_TOKENS:
                raise SettingError("k", f"{self.k}: record {record + 1} has {len(tokens):,} tokens for the masked LM, "
                                        f"and {self.k} neighbours of it would hold {len(tokens) * self.k:,} tokens at "
                                        f"once (at most {MAX_HELD_TOKENS:,}): give fewer neighbours or cut the text")
            n = max(1, int(len(tokens) * self.ratio))
            for j in range(self.k):
                slot = t * self.k + j
                positions = sorted(self._position_rng.sample(range(len(tokens)), n))
                if self.temperature == 0:
                    key = (t, tuple(positions))
                    if key in greedy_seen:  # argmax on the same positions: the same neighbour
                        greedy_seen[key].copies.append(slot)
                        continue
                rng = None if self.temperature == 0 else random.Random(f"neumuter-neighbors:{self.seed}:{record}:{j}")
                seq = _Sequence(slot, list(tokens), positions, rng)
                sequences.append(seq)
                if self.temperature == 0:
                    greedy_seen[(t, tuple(positions))] = seq
        # under a launcher, each process rewrites the records dealt to it (round-robin by record
        # number) and every process gets every result; the position choice above ran for all
        mine = [seq for seq in sequences if distributed.owns(self._records_seen + seq.slot // self.k)]
        self._records_seen += len(token_ids)
        calls, rewrites = self.calls, self.rewrites
        self._run(mine)
        written = {seq.slot: seq.tokens for seq in mine}
        if distributed.world().size > 1:
            parts = distributed.all_gather((written, self.calls - calls, self.rewrites - rewrites))
            written = {slot: tokens for part, _, _ in parts for slot, tokens in part.items()}
            self.calls = calls + sum(part[1] for part in parts)
            self.rewrites = rewrites + sum(part[2] for part in parts)
        flat: list[list[int] | None] = [None] * (len(token_ids) * self.k)
        for seq in sequences:
            for slot in [seq.slot, *seq.copies]:
                flat[slot] = written[seq.slot]
        return [[list(flat[t * self.k + j]) for j in range(self.k)] for t in range(len(token_ids))]

    def records(self, records: Iterable[dict], group: int | None = None, total: int | None = None
                ) -> Iterator[dict]:
        """Stream records: each comes out, in order, with its keys plus ``"neighbors"``.

        Records are read and rewritten in groups of ``group`` (default: enough for a few
        batches) so that a long stream is neither held whole nor rewritten one by one.
        ``total``: how many records the stream holds, if known (a progress bar's length)."""
        group = group or max(1, math.ceil(GROUP_BATCHES * self.batch_size / self.k))
        batch: list[dict] = []
        with steps(self.progress, total, "neighbors", "record") as self._tracker:
            for record in records:
                batch.append(record)
                if len(batch) >= group:
                    yield from self._emit(batch)
                    batch = []
            if batch:
                yield from self._emit(batch)

    # -- internals

    def _emit(self, batch: list[dict]) -> Iterator[dict]:
        start = time.monotonic()
        neighbours = self([record["text"] for record in batch])
        for record, texts in zip(batch, neighbours):
            out = dict(record)
            out["neighbors"] = texts
            yield out
        self._tracker.advance(len(batch), f"neighbors: {self._records_seen} records done ({len(batch)} in "
                                          f"{time.monotonic() - start:.1f} s, {self.rewrites} tokens rewritten, "
                                          f"{self.calls} MLM calls)")

    def _window_start(self, seq: _Sequence, position: int) -> int:
        if len(seq.tokens) <= self.context:
            return 0
        start = position - self.context // 2
        return min(max(start, 0), len(seq.tokens) - self.context)

    def _run(self, sequences: list[_Sequence]) -> None:
        """Advance every sequence by one visited position per round until all are done; a
        round is a few MLM calls of up to ``batch_size`` rows of similar lengths."""
        # widest first, and in that order for good: a sequence's width never changes
        pending = sorted(sequences, key=lambda s: (-self._width(s), -len(s.positions)))
        total = sum(len(s.positions) for s in sequences)
        done, last_report = 0, time.monotonic()
        with torch.inference_mode(), self._narrowed():
            while pending:
                for chunk in self._chunks(pending):
                    for seq, choice in zip(chunk, self._step(chunk)):
                        seq.tokens[seq.positions[seq.step]] = choice
                        seq.step += 1
                done += len(pending)
                pending = [seq for seq in pending if seq.step < len(seq.positions)]
                if self._tracker.bar:
                    self._tracker.advance(0, note=f"{done}/{total} tokens of this group")
                elif time.monotonic() - last_report > 10:
                    last_report = time.monotonic()
                    self._tracker.advance(0, f"neighbors: {done}/{total} tokens of this group rewritten")

    def _width(self, seq: _Sequence) -> int:
        return min(len(seq.tokens), self.context) + 2

    def _chunks(self, pending: list[_Sequence]) -> Iterator[list[_Sequence]]:
        """Cut the (widest-first) sequences into calls: at most ``batch_size`` rows, and a new
        call once padding would exceed PAD_WASTE of a call that has MIN_ROWS rows already."""
        chunk: list[_Sequence] = []
        widths = 0
        for seq in pending:
            width = self._width(seq)
            if chunk:
                full = len(chunk) >= self.batch_size
                waste = 1 - (widths + width) / ((len(chunk) + 1) * self._width(chunk[0]))
                if full or (len(chunk) >= MIN_ROWS and waste > PAD_WASTE):
                    yield chunk
                    chunk, widths = [], 0
            chunk.append(seq)
            widths += width
        if chunk:
            yield chunk

    def _step(self, active: list[_Sequence]) -> list[int]:
        """One MLM call: mask the next position of every active sequence, predict it."""
        rows = []
        masked = []
        for seq in active:
            position = seq.positions[seq.step]
            start = self._window_start(seq, position)
            row = [self.cls_id, *seq.tokens[start:start + self.context], self.sep_id]
            row[position - start + 1] = self.mask_id
            rows.append(row)
            masked.append(position - start + 1)
        input_ids, attention = pad(rows, self.pad_id)
        logits = self._logits(input_ids, attention, masked)
        self.calls += 1
        self.rewrites += len(rows)
        return self._choose(logits.float(), active)

    def _choose(self, logits: torch.Tensor, active: list[_Sequence]) -> list[int]:
        """The token written at each active sequence's position: the argmax, or a draw from the
        softmax of the tempered logits. Every number that reaches the softmax is finite: a NaN
        would make the draw arbitrary, not random."""
        allowed = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
        allowed[self.banned] = False
        if not bool(torch.isfinite(logits[:, allowed]).all()):
            raise NeumuterError("the masked LM computes a non-finite logit (NaN or infinity): its weights are broken, "
                                "so no neighbour it writes means anything")
        logits[:, self.banned] = float("-inf")
        if self.temperature == 0:
            return logits.argmax(dim=-1).tolist()
        logits = logits / self.temperature
        if not bool(torch.isfinite(logits[:, allowed]).all()):
            raise SettingError("temperature", f"{self.temperature:g} is so small that the logits divided by it "
                                              "overflow: give a larger one, or 0 for the argmax")
        if self.top_k:
            values, ids = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1)
        else:
            values, ids = logits.sort(dim=-1, descending=True)
        cdf = torch.softmax(values, dim=-1).cumsum(dim=-1).cpu()
        ids = ids.cpu()
        picks = []
        for i, seq in enumerate(active):
            u = seq.rng.random() * float(cdf[i, -1])
            j = min(int(torch.searchsorted(cdf[i], torch.tensor([u]), right=True)), cdf.shape[1] - 1)
            picks.append(int(ids[i, j]))
        return picks

    @contextlib.contextmanager
    def _narrowed(self):
        """While active, the MLM computes its output only at the masked positions.

        Encoders of the BERT family (BERT, RoBERTa, ELECTRA, ...) run their last layer for the
        masked rows only (keys and values still come from every position; see fastpaths.py);
        any other MLM runs whole and only its vocabulary projection is narrowed. The fast path
        is used only if it gave the full model's logits on a probe batch (see
        :meth:`_check_fast_path`)."""
        try:
            if self._fast_layer is not None:
                with fastpaths.last_layer_at_masked(self._fast_layer, lambda: self._gather):
                    yield
            elif self._head is not None:
                hook = self._head.register_forward_pre_hook(self._narrow_head_input)
                try:
                    yield
                finally:
                    hook.remove()
            else:
                yield
        finally:
            self._gather = None

    def _narrow_head_input(self, module, args):
        hidden = args[0]
        if hidden.dim() != 3 or self._gather is None:
            return None
        rows, cols = self._gather
        return (hidden[rows, cols], *args[1:])

    def _logits(self, input_ids, attention, masked) -> torch.Tensor:
        """(rows, vocab) logits at the masked positions; ``masked`` = their column per row."""
        rows = torch.arange(len(masked), device=self.device)
        cols = torch.tensor(masked, dtype=torch.long, device=self.device)
        self._gather = (rows, cols)
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)).logits
        if logits.dim() == 3:
            logits = logits[:, 0] if logits.shape[1] == 1 else logits[rows, cols]
        return logits

    def _check_fast_path(self) -> None:
        """Keep the narrowed last layer only if it reproduces the full model on a probe batch."""
        layer = fastpaths.bert_like_last_layer(self.model)
        if layer is None:
            return
        banned = set(self.banned.tolist())
        vocab = [i for i in range(min(self.model.config.vocab_size, 1000)) if i not in banned]
        gen = torch.Generator().manual_seed(0)
        lengths, masked = (9, 6), [3, 5]
        input_ids = torch.full((2, max(lengths)), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, length in enumerate(lengths):
            body = torch.tensor(vocab)[torch.randint(len(vocab), (length - 2,), generator=gen)]
            input_ids[row, :length] = torch.cat([torch.tensor([self.cls_id]), body, torch.tensor([self.sep_id])])
            input_ids[row, masked[row]] = self.mask_id
            attention[row, :length] = 1
        with torch.inference_mode():
            full = self._logits(input_ids, attention, masked)
            self._fast_layer = layer
            try:
                with self._narrowed():
                    fast = self._logits(input_ids, attention, masked)
                differs = None
                if fast.shape != full.shape or not torch.allclose(fast, full, rtol=1e-4,
                                                                  atol=1e-4 * float(full.abs().max())):
                    differs = "its logits differ from the whole layer's"
            except (TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
                # a layer of BERT's layout but another calling convention
                differs = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
            if differs is not None:
                self._fast_layer = None
                if self.progress:
                    self.progress(f"neighbors: the MLM's last layer runs whole (narrowed layer unusable: {differs})")
        self._gather = None


def _special_id(tokenizer, *names: str) -> int:
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return value
    raise NeumuterError(f"the MLM tokenizer has no {names[0].replace('_id', '')} (nor {names[-1].replace('_id', '')})")


__all__ = ["NeighborsConfig", "MAX_HELD_TOKENS", "load_mlm", "mlm_window", "NeighborWriter"]
