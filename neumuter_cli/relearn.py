"""The relearning attack: fine-tune a model on texts (e.g. the first halves of the forget texts)
for a few optimiser steps, to red-team one's own unlearning. Knowledge that was only hidden
comes back in a few steps; a model that never saw the texts learns them no faster than from
scratch.

Plain next-token cross-entropy on each record's ``text`` (its first ``max_length`` tokens),
mean over the real tokens of a batch, optimised with Adam (no weight decay: decay would pull
every weight towards zero, which is no part of relearning), constant learning rate, no
warm-up. Dropout stays off (the model stays in eval mode), so the only randomness is the data
order, which the seed fixes: each step takes the next ``batch_size`` texts of an endless
stream that goes through all records in a seeded random order, reshuffled at every pass. The
state after step k is therefore the same whatever the total number of steps.

Weights stored in half precision are updated through float32 master copies (an update of
lr ≈ 1e-5 is below half a bfloat16 step of a typical weight and would be lost otherwise).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from . import NeumuterError, distributed
from .config import LoadOptions, RelearnConfig, check_seed
from .errors import NonFiniteLoss, SettingError, escape
from .records import finite_number
from .models import block_spans, decoder_blocks, float32_steps, input_device, parse_layers
from .progress import steps
from .text import check_context, encode, pad, padding_id

ProgressFn = Callable[[str], None] | None


@dataclass
class RelearnResult:
    steps: int                       # optimiser steps taken
    losses: list[float]              # the batch loss of each step, before its update
    blocks: list[int] | None         # the decoder blocks trained; None: every weight of the model
    trained_parameters: int
    seconds: float
    order: list[list[int]] = field(default_factory=list)   # record indices of each step's batch
    loss_after: float | None = None  # the last step's batch loss after its update


#: the largest learning rate Adam can apply to float32 weights (the master copies of half weights
#: are float32 too): torch refuses a larger step size as "cannot be converted to type float"
MAX_LR = torch.finfo(torch.float32).max
#: the most texts one step takes
MAX_BATCH = 1 << 16


def check_config(config: RelearnConfig) -> None:
    """Refuse settings that cannot train: the errors a user can fix, as one line each
    (SettingError, naming the parameter)."""
    if isinstance(config.steps, bool) or not isinstance(config.steps, int) or config.steps < 1:
        raise SettingError("steps", f"must be a whole number >= 1, not {config.steps!r}")
    if not finite_number(config.lr) or config.lr <= 0:
        raise SettingError("lr", f"must be a finite number > 0, not {config.lr!r}")
    if config.lr > MAX_LR:
        raise SettingError("lr", f"must be at most {MAX_LR:.6g} (the largest float32), not {config.lr:g}")
    if isinstance(config.batch_size, bool) or not isinstance(config.batch_size, int) or config.batch_size < 1:
        raise SettingError("batch_size", f"must be a whole number >= 1, not {config.batch_size!r}")
    if config.batch_size > MAX_BATCH:       # one step holds the batch's texts, logits and gradients at once
        raise SettingError("batch_size", f"must be at most {MAX_BATCH:,} texts (one step computes them at once), "
                                         f"not {config.batch_size}")
    if config.max_length is not None and (isinstance(config.max_length, bool) or not isinstance(config.max_length, int)
                                          or config.max_length < 2):
        raise SettingError("max_length", f"must be a whole number of at least 2 tokens, not {config.max_length!r}")
    check_seed(config.seed)


def batches(records: int, steps: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """The record indices of each step's batch, one step at a time: an endless stream through
    all records, in a new seeded random order at every pass, cut into batches of ``batch_size``
    (a batch may span two passes). Nothing beyond the current pass is held, whatever ``steps``."""
    generator = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    for _ in range(steps):
        while len(stream) < batch_size:
            stream += torch.randperm(records, generator=generator).tolist()
        batch, stream = stream[:batch_size], stream[batch_size:]
        yield batch


def data_order(records: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """:func:`batches`, every step's at once."""
    return list(batches(records, steps, batch_size, seed))


def trainable_parameters(model, layers: str | None) -> tuple[list[torch.nn.Parameter], list[int] | None]:
    """The parameters to train: every parameter of the model (``layers`` None or "all"), or
    those of the decoder blocks named by ``layers`` (the SPEC of `localize --layers`)."""
    if layers is None or layers.strip().lower() in ("", "all"):
        params = list(model.parameters())
        return list({id(p): p for p in params}.values()), None
    _, blocks = decoder_blocks(model)
    chosen = parse_layers(layers, len(blocks))
    params = [p for index in chosen for p in blocks[index].parameters()]
    return list({id(p): p for p in params}.values()), chosen


def relearn(model, tokenizer, records: Sequence[dict], config: RelearnConfig, progress: ProgressFn = None,
            on_step: Callable[[int, float], None] | None = None) -> RelearnResult:
    """Fine-tune ``model`` in place on the records' ``text`` for exactly ``config.steps`` Adam
    steps (see the module's notes). ``on_step(step, loss)`` is called after each update (step
    1..steps), e.g. to measure the model along the way. Afterwards the model is back in eval
    mode with every weight frozen, as ``models.load_model`` leaves it."""
    check_config(config)
    if not records:
        raise NeumuterError("no records to relearn")
    ids_list = _token_ids(model, tokenizer, records, config.max_length)
    params, blocks = trainable_parameters(model, config.layers)
    if not params:
        raise NeumuterError("no parameters to train")
    order: list[list[int]] = []          # each step's batch, as it is taken
    # half-precision weights get float32 masters: the optimiser updates those, the model gets copies
    masters = [p.detach().float().clone() if p.dtype != torch.float32 and p.is_floating_point() else None
               for p in params]
    optimised = [m if m is not None else p for p, m in zip(params, masters)]
    optimiser = torch.optim.Adam(optimised, lr=config.lr, weight_decay=0.0)
    model.eval()
    for p in params:
        p.requires_grad_(True)
    count = sum(p.numel() for p in params)
    if progress:
        where = "every weight" if blocks is None else f"the weights of blocks {block_spans(blocks)}"
        progress(f"relearn: {len(records)} texts, {config.batch_size} per step, {config.steps} Adam steps "
                 f"at lr {config.lr:g} on {where} ({count:,} parameters)")
    world = distributed.world()
    if world.size > config.batch_size and progress:
        progress(f"warning: batches of {config.batch_size} texts split over {world.size} processes: "
                 f"{world.size - config.batch_size} of them have nothing to do (raise the batch size)")
    losses: list[float] = []
    started = time.perf_counter()
    tracker = steps(progress, config.steps, "relearn", "step")
    batch_loss = _BatchLoss(model, ids_list, padding_id(tokenizer))
    try:
        for step, batch in enumerate(batches(len(records), config.steps, config.batch_size, config.seed), 1):
            order.append(batch)
            losses.append(_step(batch_loss, batch, step, params, masters, optimised, optimiser))
            tracker.advance(1, f"step {step:4d}/{config.steps}  loss {losses[-1]:.4f}  "
                               f"({time.perf_counter() - started:.1f}s)", f"loss {losses[-1]:.4f}")
            if on_step is not None:
                on_step(step, losses[-1])
        after = _check_after_last_step(model, batch_loss, order[-1], config.steps)
    finally:
        tracker.close()
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        model.eval()
    return RelearnResult(steps=len(losses), losses=losses, blocks=blocks, trained_parameters=count,
                         seconds=time.perf_counter() - started, order=order, loss_after=after)


def _token_ids(model, tokenizer, records: Sequence[dict], max_length: int | None) -> list[list[int]]:
    """Each record's token ids, refused when a text has nothing to learn from or, at
    ``max_length``, does not fit the model's context (as in localize: the position embeddings
    would be indexed past their end)."""
    ids_list = encode(tokenizer, [r["text"] for r in records], max_length)
    for ids, record in zip(ids_list, records):
        if len(ids) < 2:
            label = record.get("id", record["text"][:30])
            raise NeumuterError(f"text {label!r} has fewer than 2 tokens: nothing to learn from")
    check_context(model, max(map(len, ids_list)), "a text (use a smaller {max_length})")
    return ids_list


class _BatchLoss:
    """This process's part of the mean token loss of a batch (all of it in one process): under a
    launcher each process takes its share of the batch, and its loss is divided by the whole
    batch's tokens, so the parts (and their gradients) sum to one process's."""

    def __init__(self, model, ids_list: Sequence[Sequence[int]], pad_id: int):
        self.model, self.ids_list, self.pad_id = model, ids_list, pad_id
        self.device = input_device(model)

    def __call__(self, batch: Sequence[int]) -> torch.Tensor:
        mine = distributed.split(batch)
        if not mine:
            return torch.zeros((), device=self.device)
        tokens = sum(len(self.ids_list[k]) - 1 for k in batch)
        input_ids, mask = pad([self.ids_list[k] for k in mine], self.pad_id)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        target = input_ids[:, 1:].to(logits.device)
        weight = mask[:, 1:].to(logits.device).float()
        token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                     reduction="none").view_as(target)
        # divided by a 0-dim tensor as before (one process gives the same bits)
        return (token_loss * weight).sum() / torch.tensor(float(tokens), device=weight.device)


def _step(batch_loss: _BatchLoss, batch: Sequence[int], step: int, params, masters, optimised, optimiser) -> float:
    """One Adam step on ``batch`` (float32 masters of half weights updated, then copied back);
    returns the batch loss before the update. A loss that is not finite stops before the update."""
    optimiser.zero_grad(set_to_none=True)
    for m in masters:
        if m is not None:
            m.grad = None
    loss = batch_loss(batch)
    if loss.requires_grad:
        loss.backward()
    for p, m in zip(params, masters):
        if m is not None and p.grad is not None:
            m.grad = p.grad.float()
            p.grad = None
    loss = loss.detach().reshape(1)
    if distributed.world().size > 1:
        for p in optimised:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        distributed.all_reduce_sum([*(p.grad for p in optimised), loss])
    if not torch.isfinite(loss).all():      # before the update: the weights stay as they were
        raise NonFiniteLoss(f"step {step}: the loss is not finite ({loss.item()}): the update of "
                            f"step {step - 1} broke the model" if step > 1 else
                            f"step 1: the loss is not finite ({loss.item()}) before any update")
    with float32_steps(f"step {step}"):
        optimiser.step()
    with torch.no_grad():
        for p, m in zip(params, masters):
            if m is not None:
                p.copy_(m.to(p.dtype))
    return loss.item()


def _check_after_last_step(model, batch_loss: _BatchLoss, last_batch: Sequence[int], steps_taken: int) -> float:
    """Every update but the last is checked by the loss of the next step: check the last one too,
    so that a model that computes NaN is never returned (nor written). Returns the last batch's
    loss after the update."""
    with torch.no_grad():
        last = batch_loss(last_batch).detach().reshape(1)
        distributed.all_reduce_sum([last])       # the whole batch's loss (nothing in one process)
        after = last.item()
    broken = next((name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if broken is not None or not math.isfinite(after):
        what = f"weight {broken} is not finite" if broken else f"the loss is not finite ({after})"
        raise NonFiniteLoss(f"after step {steps_taken}: {what}: the update broke the model")
    return after


def first_halves(records: Sequence[dict], tokenizer, max_length: int | None = 200) -> list[dict]:
    """Each record with its ``text`` cut to the first half of its tokens (of its first
    ``max_length`` tokens, the part that `measure` scores): the relearning set of the robustness
    check, which trains on what an attacker could know (the start of a text) and looks whether
    the rest comes back. Other keys are kept; ``half_of_tokens`` says how many tokens were
    halved. Records of fewer than 4 tokens are refused (no half to learn from)."""
    out = []
    for ids, record in zip(encode(tokenizer, [r["text"] for r in records], max_length), records):
        if len(ids) < 4:
            label = record.get("id", record["text"][:30])
            raise NeumuterError(f"text {label!r} is too short to halve ({len(ids)} of at least 4 tokens)")
        half = tokenizer.decode(ids[: len(ids) // 2], skip_special_tokens=True)
        out.append({**record, "text": half, "half_of_tokens": len(ids)})
    return out


def provenance(model, config: RelearnConfig, result: RelearnResult, records: Sequence[dict],
               source: str, source_fingerprint: str | None = None,
               input_records: Sequence[dict] | None = None, first_halves: bool = False) -> dict:
    """The ``neumuter.json`` of a relearned checkpoint: what was done, on what, with what
    outcome, and the source checkpoint's own records (``history``).

    ``records`` are the texts trained on; ``input_records`` the records they were made from
    (e.g. before :func:`first_halves`; default: ``records``). ``input_sha256`` hashes the
    latter's texts as mask files hash the forget texts (``forget_sha256``), so the two match
    for the same set; ``trained_sha256`` hashes what was trained on; ``first_halves`` says
    whether those were the input's first halves."""
    from . import __version__
    from .artifacts import previous_records
    from .models import fingerprint
    from .records import sha256_texts

    record = {
        "stage": "relearn",
        "tool_version": __version__,
        "source_model": source,
        "source_fingerprint": source_fingerprint,
        "fingerprint": fingerprint(model),
        "architecture": getattr(getattr(model, "config", None), "model_type", type(model).__name__),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "input_sha256": sha256_texts(r["text"] for r in (records if input_records is None else input_records)),
        "trained_sha256": sha256_texts(r["text"] for r in records),
        "first_halves": first_halves,
        "records": len(records),
        "optimizer": "Adam (no weight decay, constant learning rate)",
        **{k: v for k, v in asdict(config).items() if k != "layers"},
        "layers": "all" if result.blocks is None else result.blocks,
        "trained_parameters": result.trained_parameters,
        "losses": [round(v, 6) for v in result.losses],
        "final_loss": round(result.losses[-1], 6) if result.losses else None,
        "loss_after_last_step": None if result.loss_after is None else round(result.loss_after, 6),
        "seconds": round(result.seconds, 2),
    }
    record["history"] = previous_records(source)
    return record


def run_relearn(model: str, input_path: str, output: str, config: RelearnConfig, halves: bool = False,
                force: bool = False, load: LoadOptions | None = None, progress: ProgressFn = None) -> RelearnResult:
    """The `relearn` stage from paths: check the settings and the output folder, read the
    records, load the model, train it on the records (on their :func:`first_halves` with
    ``halves``) and save the checkpoint with its :func:`provenance`. Under a launcher every
    process trains its share and rank 0 writes."""
    from .artifacts import check_output_dir, save_checkpoint
    from .models import fingerprint, load_model
    from .records import read_records

    check_config(config)                # a bad lr fails before the model loads
    check_output_dir(output, force, protected=(model, input_path))
    records = read_records(input_path)
    if progress:
        progress(f"loading {escape(model)}")
    lm, tokenizer = load_model(model, **asdict(load or LoadOptions()))
    trained = first_halves(records, tokenizer, config.max_length) if halves else records
    source_fingerprint = fingerprint(lm)
    result = relearn(lm, tokenizer, trained, config, progress=progress)
    record = provenance(lm, config, result, trained, model, source_fingerprint, input_records=records,
                        first_halves=halves)
    if distributed.is_main():
        save_checkpoint(lm, tokenizer, output, record, force, protected=(model, input_path))
    return result


__all__ = ["RelearnConfig", "RelearnResult", "relearn", "check_config", "batches", "data_order", "trainable_parameters",
           "first_halves", "provenance", "run_relearn"]
