"""Removal (paper eq. 14): fold a scales file into the FFN down-projections and save an
ordinary checkpoint that loads with plain ``AutoModelForCausalLM.from_pretrained``."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import NeumuterError, __version__
from .artifacts import SCALES_KIND, check_kind, check_output_dir, previous_records, read_artifact, save_checkpoint
from .config import LoadOptions
from .errors import ConflictingSettings, FingerprintMismatch, SettingsMessage, escape
from .models import FFNLayer, describe, find_ffn_layers, fold_scales


def check_fingerprint(meta: dict, model, layers: Sequence[FFNLayer], name: str = "scales") -> dict:
    """Refuse scales made for another model; returns ``describe(model, layers)``."""
    info = describe(model, layers)
    made_for = meta.get("fingerprint")
    if made_for != info["fingerprint"]:
        raise FingerprintMismatch(
            made_for if isinstance(made_for, str) else None, info["fingerprint"],
            "{name} was made for model {made_for_model!s} (fingerprint {made_for}), but {model} {given_model} has "
            "fingerprint {given}: localize and select on the model you apply to",
            name=name, made_for_model=meta.get("model", "?"), made_for=made_for, given_model=info["model"],
            given=info["fingerprint"])
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
            raise SettingsMessage("block {block}: the scale of neuron {neuron} is {scale:g}, outside [0, 1] ({count} "
                                  "such in this block); `select` writes gate values in [0, 1]: use {allow_any_scale} "
                                  "to fold such scales anyway", block=layer.index, neuron=neuron,
                                  scale=float(scale[neuron]), count=len(outside))
    fold_scales(chosen, scales)
    return {layer.index: int((scale != 1.0).sum()) for layer, scale in zip(chosen, scales)}


def check_mode(meta: dict, with_base: bool, name: str = "scales") -> dict | None:
    """Refuse a scales file made in the other mode: rolling back toward a base model (its
    metadata names the base) when no base is given, or scaling when one is. Returns the base's
    record from the metadata."""
    made_toward = meta.get("base")
    if made_toward is not None and not (isinstance(made_toward, dict) and isinstance(made_toward.get("fingerprint"),
                                                                                     str)):
        raise NeumuterError(f"{name}: its \"base\" metadata is not a base model's record")
    if made_toward is not None and not with_base:
        raise ConflictingSettings("{name} rolls neurons back toward the base model {made_for!s}: give it as {base}",
                              name=name, made_for=made_toward.get("model", "?"))
    if made_toward is None and with_base:
        raise ConflictingSettings("{name} scales neurons (it was made without {base}): apply it without {base}, or "
                              "localize and select again with {base}", name=name)
    return made_toward


def check_base(meta: dict, base, name: str = "scales", base_name: str | None = None) -> dict | None:
    """Refuse a scales file made in the other mode (:func:`check_mode`), or toward another base
    model than the loaded ``base`` (None: no base given). Returns the base's record."""
    from .rollback import base_record

    made_toward = check_mode(meta, base is not None, name)
    if base is None:
        return None
    given = base_record(base, base_name or "BASE")
    if made_toward.get("fingerprint") != given["fingerprint"]:
        raise FingerprintMismatch(
            made_toward.get("fingerprint") if isinstance(made_toward.get("fingerprint"), str) else None,
            given["fingerprint"],
            "{name} rolls back toward the base model {made_for_model!s} (fingerprint {made_for}), but {base} "
            "{given_model} has fingerprint {given}: apply with the base model given to localize",
            name=name, made_for_model=made_toward.get("model", "?"), made_for=made_toward.get("fingerprint"),
            given_model=given["model"], given=given["fingerprint"])
    return given


def apply_scales_file(model, tokenizer, tensors: dict[str, torch.Tensor], meta: dict, out_dir: str,
                      scales_sha256: str | None = None, force: bool = False, name: str = "scales",
                      allow_any_scale: bool = False, protected: Sequence[str | None] = (), base=None) -> dict:
    """The stage: check the scales against ``model``, fold them (with ``base``, a loaded base
    model: move each neuron to W_base + m · (W − W_base)), save the checkpoint.
    Returns the record written to ``neumuter.json``."""
    from .select import scales_by_block

    check_kind(meta, SCALES_KIND, name)
    scales = scales_by_block(tensors, meta, name)
    layers = find_ffn_layers(model)
    source = check_fingerprint(meta, model, layers, name)
    if meta.get("neurons") != source["neurons"]:
        raise NeumuterError(f"{name}: neuron counts {meta.get('neurons')} do not match the model's {source['neurons']}")
    base_info = check_base(meta, base, name, getattr(base, "neumuter_source", None))
    protected = (*protected, str(source["model"]))
    check_output_dir(out_dir, force, protected)   # before the fold: nothing changes when the output is refused
    if base is None:
        scaled = apply_scales(model, layers, scales, allow_any_scale)
    else:
        scaled = _roll_back(model, base, layers, scales)
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
        "mode": "scale" if base is None else "rollback",
        "base": base_info,
        "modules": {str(b): source["modules"][b] for b in scaled},
        "total_neurons": sum(source["neurons"]),
        "forget_sha256": meta.get("forget_sha256"),
        "history": previous_records(str(source["model"])),
    }
    save_checkpoint(model, tokenizer, out_dir, record, force, protected)
    return record


def _roll_back(model, base, layers: Sequence[FFNLayer], scales: dict[int, torch.Tensor]) -> dict[int, int]:
    """Check ``base`` is the model's ancestor and every scale is in [0, 1] (an interpolation
    between the two models), then fold."""
    from .rollback import check_ancestor, fold

    check_ancestor(model, base, str(getattr(model, "neumuter_source", "the model")),
                   f"base model {getattr(base, 'neumuter_source', '')}".strip())
    for block, scale in scales.items():
        if not torch.isfinite(scale).all() or ((scale < 0) | (scale > 1)).any():
            raise NeumuterError(f"block {block}: a rollback scale outside [0, 1] (W_base + m (W - W_base) "
                                "interpolates between the two models)")
    return fold(model, base, scales)


def checkpoint_dtype(model: str) -> str | None:
    """The float dtype a local checkpoint directory is stored in (config.json), or None."""
    from .records import read_small_file

    try:
        data = json.loads(read_small_file(str(Path(model) / "config.json")) or b"null")
    except (OSError, ValueError, RecursionError, NeumuterError):
        return None
    if not isinstance(data, dict):
        return None
    dtype = data.get("dtype", data.get("torch_dtype"))
    return dtype if dtype in ("float32", "bfloat16", "float16") else None


def run_apply(model: str, scales_path: str, output: str, force: bool = False, allow_any_scale: bool = False,
              load: LoadOptions | None = None, progress: Callable[[str], None] | None = None,
              base: str | None = None) -> dict:
    """The `apply` stage from paths: check the output folder, read the scales file, load the
    model (with dtype auto, in the dtype its checkpoint is stored in), fold and save. Returns the
    record written to ``neumuter.json``. Scales that do not match a model loaded in another
    dtype than the stored one are refused with the dtype named: rounding changed the weights."""
    from .models import load_model

    load = load or LoadOptions()
    check_output_dir(output, force, protected=(model, scales_path, base))
    artifact = read_artifact(scales_path, kind=SCALES_KIND)
    stored = checkpoint_dtype(model)
    as_loaded = replace(load, dtype=stored or "auto") if load.dtype == "auto" else load
    if progress:
        progress(f"loading {escape(model)}")
    check_mode(artifact.metadata, base is not None, artifact.name)    # before any model loads
    lm, tokenizer = load_model(model, **asdict(as_loaded))
    base_model = None
    if base is not None:
        from .models import check_same_tokenizer

        if progress:
            progress(f"loading {base} (the base model)")
        base_model, base_tokenizer = load_model(base, **asdict(as_loaded))
        check_same_tokenizer(tokenizer, base_tokenizer, model, f"base model {base}")
    try:
        return apply_scales_file(lm, tokenizer, artifact.tensors, artifact.metadata, output,
                                 scales_sha256=artifact.sha256, force=force, name=artifact.name,
                                 allow_any_scale=allow_any_scale, protected=(model, scales_path, base),
                                 base=base_model)
    except FingerprintMismatch as exc:
        asked = load.dtype
        if stored is not None and asked not in ("auto", stored, "float32"):    # float32 holds any half value
            raise FingerprintMismatch(
                exc.expected, exc.found,
                "{dtype} {asked} rounds the {stored} weights of {source}, so they are no longer the weights {name} "
                "was made for (fingerprint {made_for}, rounded {rounded}): apply with {dtype} auto (the stored "
                "{stored}), or localize and select on the model loaded as {asked}",
                asked=asked, stored=stored, source=model, name=artifact.name, made_for=exc.expected, rounded=exc.found,
            ) from None
        raise
