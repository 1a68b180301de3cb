"""Speed-ups that reach into transformers' internals, kept together here.

Two of them, each exact (same numbers as the plain computation) and each with a plain fallback:

* :func:`roomy_cache` (measure's lock-step generation): a KV cache whose ``DynamicLayer``\\ s
  write each decode step in place, instead of ``torch.cat``-ing the whole cache at every step.
* :func:`bert_like_last_layer` / :func:`last_layer_at_masked` (neighbors): a BERT-like
  encoder's last layer computed for the masked positions only.

They are used only with the transformers versions they were written against (:data:`TESTED`),
and can be switched off with the environment variable ``NEUMUTER_NO_FASTPATHS=1`` or
:func:`disabled` (the tests compare both ways). Off, measure uses transformers' own cache and
neighbors runs every layer whole (only the vocabulary projection is narrowed).
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
from importlib import metadata
from typing import Callable, Iterator

import torch

#: transformers versions the fast paths were written and tested against: [first, last) as
#: (major, minor). DynamicLayer (per-layer caches) came with 4.56.
TESTED = ((4, 56), (6, 0))

_switched_off = 0


def transformers_version() -> tuple[int, int] | None:
    """(major, minor) of the installed transformers, None if it cannot be read."""
    try:
        found = re.match(r"(\d+)\.(\d+)", metadata.version("transformers"))
    except metadata.PackageNotFoundError:
        return None
    return (int(found[1]), int(found[2])) if found else None


def enabled() -> bool:
    """Whether the fast paths may be used: a tested transformers, and not switched off."""
    if _switched_off or os.environ.get("NEUMUTER_NO_FASTPATHS", "") not in ("", "0"):
        return False
    version = transformers_version()
    return version is not None and TESTED[0] <= version < TESTED[1]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block, every fast path falls back to the plain computation."""
    global _switched_off
    _switched_off += 1
    try:
        yield
    finally:
        _switched_off -= 1


# ---------------------------------------------------------------- the KV cache with room

@functools.cache
def _roomy_classes():
    """(DynamicLayer, RoomyLayer), or None when this transformers has no DynamicLayer."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None

    class RoomyLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys and values live in a buffer with room for more
        positions: a decode step writes its position in place and returns a view, instead of
        concatenating the whole cache into a new tensor at every step (on CPU that copy costs
        as much as the model itself). Same values, same shapes, same attention."""

        @classmethod
        def wrap(cls, layer, capacity: int):
            new = cls.__new__(cls)
            new.__dict__.update(layer.__dict__)
            new._room(layer.keys, layer.values, capacity)
            return new

        def _room(self, keys, values, capacity):
            b, h, length, _ = keys.shape
            capacity = max(capacity, length)
            self._kbuf = keys.new_empty(b, h, capacity, keys.shape[-1])
            self._vbuf = values.new_empty(b, values.shape[1], capacity, values.shape[-1])
            self._kbuf[:, :, :length] = keys
            self._vbuf[:, :, :length] = values
            self.keys, self.values = self._kbuf[:, :, :length], self._vbuf[:, :, :length]

        def _owns(self, keys, values) -> bool:
            return (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor) and keys.dim() == 4
                    and keys.data_ptr() == self._kbuf.data_ptr() and values.data_ptr() == self._vbuf.data_ptr()
                    and keys.shape[:2] == self._kbuf.shape[:2] and values.shape[:2] == self._vbuf.shape[:2])

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = self.keys, self.values
            length, extra = keys.shape[-2], key_states.shape[-2]
            if not self._owns(keys, values) or length + extra > self._kbuf.shape[-2]:
                # rows dropped or reordered, or out of room: a new buffer (twice the size)
                self._room(keys, values, 2 * (length + extra))
            self._kbuf[:, :, length:length + extra] = key_states
            self._vbuf[:, :, length:length + extra] = value_states
            self.keys = self._kbuf[:, :, :length + extra]
            self.values = self._vbuf[:, :, :length + extra]
            return self.keys, self.values

    return DynamicLayer, RoomyLayer


def roomy_cache(cache, capacity: int):
    """Give every plain ``DynamicLayer`` of a fresh cache room for ``capacity`` positions, so
    that decoding writes in place; any other cache or layer type (and every cache when the
    fast paths are off) is returned as it is."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or getattr(cache, "offloading", False) or not enabled():
        return cache
    classes = _roomy_classes()
    if classes is None:
        return cache
    dynamic_layer, roomy_layer = classes
    for k, layer in enumerate(layers):
        if (type(layer) is dynamic_layer and getattr(layer, "is_initialized", False)
                and isinstance(layer.keys, torch.Tensor) and layer.keys.dim() == 4
                and isinstance(layer.values, torch.Tensor) and layer.values.dim() == 4):
            layers[k] = roomy_layer.wrap(layer, capacity)
    return cache


# ---------------------------------------------------------------- a BERT layer at the masked rows

def bert_like_last_layer(model):
    """The last encoder layer of a masked LM if it has the BERT layout (self-attention
    query/key/value, attention output, intermediate, output, absolute positions) and the fast
    paths are on; else None. The caller must check the narrowed layer against the whole one on
    a probe batch before relying on it (neighbors does)."""
    if not enabled():
        return None
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    if not layers:
        return None
    layer = layers[-1]
    attention = getattr(getattr(layer, "attention", None), "self", None)
    needed = [getattr(attention, name, None) for name in ("query", "key", "value", "num_attention_heads",
                                                            "attention_head_size")]
    needed += [getattr(layer.attention, "output", None), getattr(layer, "intermediate", None),
               getattr(layer, "output", None)]
    if any(x is None for x in needed) or getattr(layer, "is_decoder", False) \
            or getattr(attention, "position_embedding_type", "absolute") != "absolute":
        return None
    return layer


@contextlib.contextmanager
def last_layer_at_masked(layer, gather: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Within the block, ``layer`` (from :func:`bert_like_last_layer`) computes only the row
    ``gather()`` names in each sequence (``(rows, columns)``: one masked column per row) and
    returns (rows, 1, hidden); keys and values still come from every position."""
    layer.forward = functools.partial(_layer_at_masked, layer, gather)
    try:
        yield
    finally:
        layer.__dict__.pop("forward", None)


def _layer_at_masked(layer, gather, hidden_states, attention_mask=None, *args, **kwargs):
    rows, cols = gather()
    batch, width, _ = hidden_states.shape
    attention = layer.attention.self
    heads, size = attention.num_attention_heads, attention.attention_head_size
    here = hidden_states[rows, cols].unsqueeze(1)
    query = attention.query(here).view(batch, 1, heads, size).transpose(1, 2)
    key = attention.key(hidden_states).view(batch, width, heads, size).transpose(1, 2)
    value = attention.value(hidden_states).view(batch, width, heads, size).transpose(1, 2)
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :1, :]  # row 0 ([CLS]) is never padding
    scale = getattr(attention, "scaling", size ** -0.5)
    context = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                               scale=scale)
    context = context.transpose(1, 2).reshape(batch, 1, heads * size)
    mixed = layer.attention.output(context, here)
    return layer.output(layer.intermediate(mixed), mixed)


__all__ = ["TESTED", "transformers_version", "enabled", "disabled", "roomy_cache", "bert_like_last_layer",
           "last_layer_at_masked"]
