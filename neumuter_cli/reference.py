"""A reference model is one that never saw the records: the verdicts compare the model with it.
Against itself every record passes as forgotten, so each check here refuses a reference that is
the model under another name: the same checkpoint, the same weights (or the same rounded to half
precision), a copy neumuter made from the model, or the model's own source before `apply` or
`quantize` edited it. `measure` and `localize` run them all."""
from __future__ import annotations

import os

from . import NeumuterError
from .models import lineage


def same_checkpoint(a: str, b: str) -> bool:
    """Whether two model names are the same checkpoint by name: the same path (links resolved)
    or the same hub name."""
    if os.path.exists(a) or os.path.exists(b):
        return os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b)
    return a == b


def refuse_self_reference(detail: str) -> None:
    raise NeumuterError(f"the reference is the model itself: {detail}; a verdict needs a reference that never "
                        "saw the records (against itself, every record passes as forgotten)")


def check_not_itself(model: str, prints: dict[str, str], reference: str, reference_prints: dict[str, str]) -> None:
    """Refuse a reference whose weights are the model's: the same fingerprint, or the same once
    both are rounded to bfloat16 or float16 (one model saved in two precisions);
    ``prints`` as :func:`models.fingerprints` gives them."""
    if prints["exact"] == reference_prints["exact"]:
        refuse_self_reference(f"{reference} has the weights of {model} (fingerprint {prints['exact']})")
    for kind in sorted(set(prints) & set(reference_prints) - {"exact"}):
        if prints[kind] == reference_prints[kind]:
            refuse_self_reference(f"{reference} has the weights of {model} rounded to {kind} "
                                   f"(fingerprints {prints['exact']} and {reference_prints['exact']})")


def check_not_made_from(model: str, fingerprint: str, reference: str, reference_path: str) -> None:
    """Refuse a reference checkpoint that neumuter made from the model (its neumuter.json names
    the model's fingerprint as a source: a quantised, relearnt or muted copy of the model)."""
    stage = lineage(reference_path).get(fingerprint)
    if stage is not None:
        refuse_self_reference(f"{reference} was made from {model} by `neumuter {stage}` (its neumuter.json "
                               f"names the fingerprint {fingerprint})")


def check_not_edited_from(model: str, model_path: str, reference: str, reference_fingerprint: str) -> None:
    """Refuse a reference that the model was made from by `apply` or `quantize` (the model's
    neumuter.json names it): the model is the reference's own weights with some neurons scaled
    or rounded, and the reference is the model before it forgot. (A model relearnt from the
    reference is fine: relearning is training, and the reference never saw what it learnt.)"""
    stage = lineage(model_path).get(reference_fingerprint)
    if stage in ("apply", "quantize"):
        refuse_self_reference(f"{model} was made from {reference} by `neumuter {stage}` (its neumuter.json names "
                               f"the fingerprint {reference_fingerprint}): it is that model with some weights "
                               "scaled or rounded")


__all__ = ["same_checkpoint", "refuse_self_reference", "check_not_itself", "check_not_made_from",
           "check_not_edited_from"]
