"""Texts as token ids: encode them, check they fit the model's context, pad them into a batch.

Every stage that feeds a model goes through these, so that a text is cut, refused and padded
the same way everywhere. Right padding with an attention mask is exact for a causal LM: the
padding comes after every real position, which never attends to it.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .errors import SettingsMessage


def encode(tokenizer, texts: Iterable[str], max_length: int | None = 200) -> list[list[int]]:
    """The token ids of each text (special tokens as the tokenizer adds them), cut to
    ``max_length`` (None: no cut)."""
    out = []
    for text in texts:
        ids = list(tokenizer(text, verbose=False)["input_ids"])
        out.append(ids[:max_length] if max_length else ids)
    return out


def padding_id(tokenizer) -> int:
    """The id that fills a padded row: the tokenizer's pad token, else 0 (masked out anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad(batch: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id rows to the longest: (input_ids, attention_mask), both (rows, width)
    long tensors on the CPU; the mask is 1 on the real tokens."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return input_ids, mask


def model_context(model, tokenizer=None, cap: int = 1024) -> int:
    """The model's context length (from its config), capped at ``cap``."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return min(value, cap)
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**9:
        return min(value, cap)
    return cap


def check_context(model, length: int, what: str) -> None:
    """Refuse ``length`` tokens of ``what`` beyond the model's context: the position embeddings
    would be indexed past their end. ``what`` may name a setting, as in ``"a text (use a smaller
    {max_length})"`` (errors.SettingsMessage)."""
    context = model_context(model, cap=1 << 62)
    if length > context:
        raise SettingsMessage(what + " of {length} tokens is longer than the model's context ({context} tokens)",
                              length=length, context=context)


__all__ = ["encode", "padding_id", "pad", "model_context", "check_context"]
