"""Removal (paper eq. 14): fold a scales file into the FFN down-projections and save an
ordinary checkpoint that loads with plain ``AutoModelForCausalLM.from_pretrained``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from . import NeumuterError, __version__
from .artifacts import CHECKPOINT_KIND, CHECKPOINT_RECORD, SCALES_KIND, check_kind, check_output_dir
from .errors import FingerprintMismatch
from .models import FFNLayer, describe, find_ffn_layers, fold_scales
from .records import atomic_directory, dumps_json, loads_json


def check_fingerprint(meta: dict, model, layers: Sequence[FFNLayer], name: str = "scales") -> dict:
    """Refuse scales made for another model; returns ``describe(model, layers)``."""
    info = describe(model, layers)
    made_for = meta.get("fingerprint")
    if made_for != info["fingerprint"]:
        raise FingerprintMismatch(made_for if isinstance(made_for, str) else None, info["fingerprint"],
            f"{name} was made for model {meta.get('model', '?')!s} (fingerprint {made_for}), "
            f"but --model {info['model']} has fingerprint {info['fingerprint']}: "
            f"localize and select on the model you apply to")
    return info


@torch.no_grad()
def apply_scales(model, layers: Sequence[FFNLayer], scales_by_block: dict[int, torch.Tensor],
                 allow_any_scale: bool = False) -> dict[int, int]:
    """Fold per-neuron scales into the down-projections of the given blocks, in place.

    ``scales_by_block`` maps block index (``FFNLayer.index``) → one scale per neuron; blocks
    not named are left alone. A scale outside [0, 1] (which `select` never writes: a scale is
    a gate value) is refused unless ``allow_any_scale``: above 1 it would amplify a neuron,
    below 0 flip its sign. The weights keep their dtype. Returns, per block, the number of
    neurons whose scale is not 1."""
    by_index = {layer.index: layer for layer in layers}
    missing = sorted(set(scales_by_block) - set(by_index))
    if missing:
        raise NeumuterError(f"scales for block {missing[0]}, but the model has blocks 0-{len(layers) - 1}")
    chosen = [by_index[b] for b in sorted(scales_by_block)]
    scales = [scales_by_block[layer.index].detach().reshape(-1).float() for layer in chosen]
    for layer, scale in zip(chosen, scales):
        if scale.numel() != layer.neurons:
            raise NeumuterError(f"block {layer.index} ({layer.path}): {scale.numel()} scales "
                                f"for {layer.neurons} neurons")
        if not torch.isfinite(scale).all():
            raise NeumuterError(f"block {layer.index}: scales hold NaN or infinite values")
        outside = ((scale < 0) | (scale > 1)).nonzero().flatten()
        if len(outside) and not allow_any_scale:
            neuron = int(outside[0])
            raise NeumuterError(f"block {layer.index}: the scale of neuron {neuron} is {float(scale[neuron]):g}, "
                                f"outside [0, 1] ({len(outside)} such in this block); `select` writes gate values "
                                "in [0, 1]: use --allow-any-scale to fold such scales anyway")
    fold_scales(chosen, scales)
    return {layer.index: int((scale != 1.0).sum()) for layer, scale in zip(chosen, scales)}


def _plain_model(model):
    """A model loaded from GGUF carries a quantizer that refuses ``save_pretrained``; when its
    weights are ordinary float tensors (dequantised on load), drop it so that the model is
    written as an ordinary float checkpoint."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    method = getattr(method, "value", method)
    if method != "gguf":
        raise NeumuterError(f"cannot write a checkpoint of a model quantised with {method}: "
                            f"load it unquantised")
    if getattr(quantizer, "packed_modules", None):
        raise NeumuterError("this GGUF model keeps its weights packed for quantised kernels; "
                            "load it with --device cpu to write a float checkpoint")
    for param in model.parameters():
        if not param.is_floating_point():
            raise NeumuterError("this GGUF model holds non-float weights; cannot write a float checkpoint")
    quantizer.remove_quantization_config(model)
    return model


def save_checkpoint(model, tokenizer, out_dir: str, record: dict, force: bool = False,
                    protected: Sequence[str | None] = ()) -> None:
    """Write ``model`` (safetensors) + ``tokenizer`` + ``neumuter.json`` into ``out_dir``
    atomically: everything goes to a temporary folder beside it, renamed at the end. What
    ``out_dir`` may be, and when it may be replaced, is :func:`artifacts.check_output_dir`
    (``force`` replaces a previous checkpoint only; ``protected``: paths it must not hold).
    ``neumuter.json`` gets the kind and the list of files written (``kind``, ``files``) and
    is written with sorted keys, so that the same inputs give the same bytes. A GGUF-loaded
    model is written as an ordinary float checkpoint."""
    check_output_dir(out_dir, force, protected)
    with atomic_directory(out_dir, force=True) as tmp:
        model = _plain_model(model)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = sorted({entry.name for entry in Path(tmp).iterdir()} | {CHECKPOINT_RECORD})
        record = {**record, "kind": CHECKPOINT_KIND, "files": files}
        text = dumps_json(record, indent=2, ensure_ascii=False, sort_keys=True)
        with open(Path(tmp) / CHECKPOINT_RECORD, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


def previous_records(source: str) -> list[dict]:
    """The history of a muted checkpoint used as the source of a later request."""
    path = Path(source) / CHECKPOINT_RECORD
    if not os.path.isdir(source) or not path.is_file():
        return []
    try:
        with open(path, encoding="utf-8") as handle:
            previous = loads_json(handle.read())
    except (OSError, ValueError):     # unreadable, not JSON, or a number JSON output cannot carry
        return []
    if not isinstance(previous, dict):
        return []
    history = previous.pop("history", [])
    history = [entry for entry in history if isinstance(entry, dict)] if isinstance(history, list) else []
    previous.pop("files", None)   # that folder's layout, not provenance
    return [*history, previous]


def apply_scales_file(model, tokenizer, tensors: dict[str, torch.Tensor], meta: dict, out_dir: str,
                      scales_sha256: str | None = None, force: bool = False, name: str = "scales",
                      allow_any_scale: bool = False, protected: Sequence[str | None] = ()) -> dict:
    """The stage: check the scales against ``model``, fold them, save the checkpoint.
    Returns the record written to ``neumuter.json``."""
    from .select import scales_by_block

    check_kind(meta, SCALES_KIND, name)
    scales = scales_by_block(tensors, meta, name)
    layers = find_ffn_layers(model)
    source = check_fingerprint(meta, model, layers, name)
    if meta.get("neurons") != source["neurons"]:
        raise NeumuterError(f"{name}: neuron counts {meta.get('neurons')} do not match the model's {source['neurons']}")
    protected = (*protected, str(source["model"]))
    check_output_dir(out_dir, force, protected)   # before the fold: nothing changes when the output is refused
    scaled = apply_scales(model, layers, scales, allow_any_scale)
    record = {
        "tool_version": __version__,
        "source_model": source["model"],
        "source_fingerprint": source["fingerprint"],
        "fingerprint": describe(model, layers)["fingerprint"],
        "architecture": source["architecture"],
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "scales_sha256": scales_sha256,
        "mask_sha256": meta.get("mask_sha256"),
        "rule": meta.get("rule"),
        "epsilon": meta.get("epsilon"),
        "neurons_scaled": sum(scaled.values()),
        "neurons_scaled_per_layer": {str(b): n for b, n in scaled.items()},
        "modules": {str(b): source["modules"][b] for b in scaled},
        "total_neurons": sum(source["neurons"]),
        "forget_sha256": meta.get("forget_sha256"),
        "history": previous_records(str(source["model"])),
    }
    save_checkpoint(model, tokenizer, out_dir, record, force, protected)
    return record


def checkpoint_dtype(model: str) -> str | None:
    """The float dtype a local checkpoint directory is stored in (config.json), or None."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    try:
        with open(config, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    dtype = data.get("dtype", data.get("torch_dtype"))
    return dtype if dtype in ("float32", "bfloat16", "float16") else None
