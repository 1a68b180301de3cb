"""The files neumuter writes and reads back: mask and scales files (safetensors with a metadata
map) and checkpoint folders (written by `apply`, `quantize` and `relearn`, each with the
neumuter.json record of how it was made and from what).

This module owns their kinds and format version, reads a file once (keeping its sha256), checks
the kind and version in one place, writes byte-reproducible files, and says which folder a
checkpoint may be written to (and which it may replace).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import NeumuterError
from .errors import SettingsMessage
from .records import (atomic_directory, atomic_output, check_folder_writable, destination, display_name, dumps_json,
                      is_terminal, loads_json, read_bounded, read_small_file, sha256_bytes)

MASK_KIND = "neumuter-mask"
SCALES_KIND = "neumuter-scales"
CHECKPOINT_KIND = "neumuter-checkpoint"
CHECKPOINT_RECORD = "neumuter.json"      # the record `apply` writes into a checkpoint folder
KINDS = (MASK_KIND, SCALES_KIND)

# 2: the model fingerprint covers every tensor of the model (1: three rows of each FFN
# down-projection only, so a file of version 1 cannot be checked against a model any more)
FORMAT_VERSION = 2


@dataclass
class Artifact:
    """A mask or scales file as read: its tensors, its metadata (values JSON-decoded where they
    read as JSON), the sha256 of its bytes and the name to use in messages."""

    tensors: dict[str, torch.Tensor]
    metadata: dict
    sha256: str
    name: str


# ---------------------------------------------------------------- reading

def read_artifact(path: str, kind: str | None = None) -> Artifact:
    """Read a safetensors artifact (``-`` = stdin) once: tensors, metadata and sha256.

    With ``kind``, refuse a file of another kind or of another format version
    (:func:`check_kind`). NaN or infinite tensors are refused."""
    name = display_name(path)
    try:
        if path == "-":
            if sys.stdin is None or is_terminal(sys.stdin):
                raise NeumuterError("no input: give a file or pipe one into stdin")
            data = read_bounded(path, stream=sys.stdin.buffer)
        else:
            data = read_bounded(path)
    except OSError as exc:
        raise NeumuterError(f"cannot read {name}: {exc.strerror or exc}") from None
    if not data:
        raise NeumuterError(f"{name}: empty input")
    try:
        tensors = st_load(data)
        raw_meta = _header(data).get("__metadata__") or {}
        if not isinstance(raw_meta, dict):
            raise ValueError("its __metadata__ is not a map")
    except Exception as exc:  # safetensors raises its own error types
        raise NeumuterError(f"{name}: not a safetensors file ({str(exc).splitlines()[0][:120]})") from None
    meta = {}
    for key, value in raw_meta.items():
        try:      # read as records are: "NaN" or a 5000-digit number stay strings (and are refused below)
            meta[key] = loads_json(value) if isinstance(value, str) else value
        except ValueError:
            meta[key] = value
    if kind is not None:
        check_kind(meta, kind, name)
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NeumuterError(f"{name}: tensor {key} holds NaN or infinite values")
    return Artifact(tensors, meta, sha256_bytes(data), name)


def load_artifact(path: str, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """:func:`read_artifact` without the hash: (tensors, metadata)."""
    artifact = read_artifact(path, kind)
    return artifact.tensors, artifact.metadata


def check_kind(meta: dict, kind: str, name: str) -> None:
    """Refuse metadata of another kind (a scales file where a mask is expected) or of a format
    version this tool does not read; a file of an older version says what to do."""
    found = meta.get("kind")
    if found != kind:
        if found is None:
            raise NeumuterError(f"{name}: not a {kind} file (its metadata names no neumuter kind)")
        raise NeumuterError(f"{name}: this is a {_short(str(found))} file, not a {kind} file")
    version = meta.get("format_version")
    if version == FORMAT_VERSION:
        return
    if isinstance(version, int) and not isinstance(version, bool) and version < FORMAT_VERSION:
        raise NeumuterError(
            f"{name}: made by an older neumuter (format version {version}, this one reads {FORMAT_VERSION}): "
            "its model fingerprint cannot be checked any more; run localize and select again")
    raise NeumuterError(f"{name}: format_version {_short(repr(version))} is not supported (this neumuter reads "
                        f"{FORMAT_VERSION})")


def _short(text: str, limit: int = 40) -> str:
    """A metadata value as shown in a message, cut to ``limit`` characters."""
    return text if len(text) <= limit else text[:limit] + "..."


def _header(data: bytes) -> dict:
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header


# ---------------------------------------------------------------- writing

def save_artifact(tensors: dict[str, torch.Tensor], metadata: dict, path: str) -> None:
    """Write tensors plus a metadata map to a safetensors file (``-`` = stdout), atomically.

    Metadata values are stored as JSON, except strings that do not read as JSON (kept as they
    are). The bytes depend only on the tensors and the metadata: the metadata keys are written
    in sorted order (safetensors itself writes them in a random order), so the same result
    gives the same file and the same sha256. NaN/inf tensors are written (reading refuses them)."""
    meta = {key: _metadata_value(value) for key, value in metadata.items()}
    data = st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=meta)
    with atomic_output(path, "wb", binary_to_terminal_ok=False) as out:
        out.write(canonical_safetensors(data))


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its header in one canonical form: ``__metadata__`` first
    with its keys sorted, then the tensors in the order of their data, compact JSON padded
    with spaces to a multiple of 8 bytes (as safetensors pads it). The data is not touched:
    its offsets are relative to the end of the header."""
    length = int.from_bytes(data[:8], "little")
    header = _header(data)
    canonical = {}
    if "__metadata__" in header:
        canonical["__metadata__"] = dict(sorted((header.pop("__metadata__") or {}).items()))
    for name, info in sorted(header.items(), key=lambda item: (tuple(item[1]["data_offsets"]), item[0])):
        canonical[name] = info
    text = dumps_json(canonical, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + length:]


def _metadata_value(value) -> str:
    """A metadata value as stored: a string as it is, unless it would read back as JSON
    (``"1"``, ``"null"``): then, like every other value, as JSON."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value
    return dumps_json(value)


# ---------------------------------------------------------------- checkpoint folders

def _contains(folder: str, path: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (after resolving links)."""
    folder, path = os.path.realpath(folder), os.path.realpath(path)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def previous_checkpoint_problem(folder: str) -> str | None:
    """None when ``folder`` holds a checkpoint written by `neumuter apply` and nothing else:
    a neumuter.json of kind neumuter-checkpoint that lists every entry of the folder (all
    plain files). Otherwise, why not."""
    root = Path(folder)
    try:
        record = json.loads(read_small_file(str(root / CHECKPOINT_RECORD)) or b"")
    except (OSError, ValueError, RecursionError, NeumuterError):
        return f"it has no readable {CHECKPOINT_RECORD}"
    if not isinstance(record, dict) or record.get("kind") != CHECKPOINT_KIND:
        return f"its {CHECKPOINT_RECORD} is not a {CHECKPOINT_KIND} record"
    files = record.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return f"its {CHECKPOINT_RECORD} does not list the files it wrote"
    for entry in sorted(root.iterdir()):
        if entry.name not in files or entry.is_symlink() or not entry.is_file():
            return f"it holds {entry.name!r}, which neumuter did not write there"
    return None


def check_output_dir(path: str, force: bool = False, protected: Iterable[str | None] = ()) -> None:
    """The rule for a checkpoint folder (`apply -o DIR`), checked before any work and again
    before the folder is replaced:

    - DIR is not a symbolic link (it could only be replaced by a folder at the very end);
    - DIR is never the current folder or a folder holding it, nor one of the ``protected``
      paths (the model, the scales file) or a folder holding one: replacing it would delete them;
    - a missing DIR or an empty folder is written;
    - a folder that is not empty is replaced only with ``force``, and only when it holds a
      previous neumuter checkpoint and nothing else (see :func:`previous_checkpoint_problem`);
      any other content is refused, with or without ``force``;
    - the folder DIR goes in must exist and be writable."""
    target = Path(path)
    if target.is_symlink():
        # replacing a link means renaming a folder over it, which the OS refuses only at the end
        raise NeumuterError(f"refusing to write the checkpoint to {path}: it is a symbolic link (to "
                            f"{os.readlink(path)}); give the folder itself, or a new folder")
    if target.exists() and not target.is_dir():
        raise NeumuterError(f"{path} exists and is not a directory")
    if _contains(path, os.getcwd()):
        what = "the current folder" if os.path.realpath(path) == os.getcwd() else "a folder holding the current folder"
        raise NeumuterError(f"refusing to write the checkpoint to {path}: it is {what} (give a new folder)")
    for source in protected:
        if source and source != "-" and os.path.exists(source) and _contains(path, source):
            raise NeumuterError(f"refusing to write the checkpoint to {path}: it would replace {source}, "
                                "an input of this command (give a new folder)")
    destination(path)                  # a name that cannot be replaced ('..'): refused now, not at the end
    if target.is_dir() and any(target.iterdir()):
        problem = previous_checkpoint_problem(path)
        if problem is not None:
            raise SettingsMessage("{path} exists and is not empty, and is not a neumuter checkpoint ({problem}); "
                                  "{force} only replaces a previous checkpoint: give a new folder",
                                  path=path, problem=problem)
        if not force:
            raise SettingsMessage("{path} holds a previous neumuter checkpoint (use {force} to replace it)", path=path)
    parent = target.parent if str(target.parent) else Path(".")
    check_folder_writable(path, parent)


# ---------------------------------------------------------------- checkpoint folders

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
        raise SettingsMessage("this GGUF model keeps its weights packed for quantised kernels; "
                              "load it with {device} cpu to write a float checkpoint")
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
        previous = loads_json((read_small_file(str(path)) or b"").decode("utf-8"))
    except (OSError, ValueError):     # unreadable, not JSON, or a number JSON output cannot carry
        return []
    if not isinstance(previous, dict):
        return []
    history = previous.pop("history", [])
    history = [entry for entry in history if isinstance(entry, dict)] if isinstance(history, list) else []
    previous.pop("files", None)   # that folder's layout, not provenance
    return [*history, previous]


__all__ = [
    "MASK_KIND", "SCALES_KIND", "CHECKPOINT_KIND", "CHECKPOINT_RECORD", "FORMAT_VERSION", "Artifact",
    "read_artifact", "load_artifact", "check_kind", "save_artifact", "canonical_safetensors",
    "previous_checkpoint_problem", "check_output_dir", "save_checkpoint", "previous_records",
]
