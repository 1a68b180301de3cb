"""Records (JSONL) in and out, atomic file and directory writes, safetensors artifacts."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import NeumuterError


def _display_name(path: str) -> str:
    return "<stdin>" if path == "-" else str(path)


def iter_records(path: str, require: Iterable[str] = ("text",), stream: IO[str] | None = None) -> Iterator[dict]:
    """Yield the JSON objects of a JSONL file (``-`` = stdin), one per non-blank line.

    Every record must be an object whose ``text`` is a non-empty string; each key in
    ``require`` other than ``text`` must be present. Errors name the file and the line.
    An input with no record at all is an error too.
    """
    name = _display_name(path)
    require = tuple(require)
    owned = stream is None and path != "-"   # close only what is opened here
    if stream is None:
        if path == "-":
            stream = sys.stdin
        else:
            try:
                stream = open(path, encoding="utf-8")
            except OSError as exc:
                raise NeumuterError(f"cannot read {name}: {exc.strerror or exc}") from None
    count = 0
    try:
        for lineno, line in enumerate(stream, 1):
            if lineno == 1:
                line = line.removeprefix("\ufeff")   # a byte-order mark some editors write
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise NeumuterError(f"{name}:{lineno}: invalid JSON ({exc.msg})") from None
            validate_record(record, name, lineno, require)
            count += 1
            yield record
    except UnicodeDecodeError:
        raise NeumuterError(f"{name}: not UTF-8 text") from None
    finally:
        if owned:
            stream.close()
    if count == 0:
        raise NeumuterError(f"{name}: no records (empty input)")


def validate_record(record, name: str, lineno: int, require: Iterable[str] = ("text",)) -> None:
    if not isinstance(record, dict):
        raise NeumuterError(f"{name}:{lineno}: a record must be a JSON object")
    text = record.get("text")
    if "text" not in record:
        raise NeumuterError(f"{name}:{lineno}: record has no \"text\"")
    if not isinstance(text, str) or not text.strip():
        raise NeumuterError(f"{name}:{lineno}: \"text\" must be a non-empty string")
    for key in require:
        if key == "text":
            continue
        if key not in record:
            raise NeumuterError(f"{name}:{lineno}: record has no \"{key}\"")
        if key == "neighbors":
            nb = record[key]
            if not isinstance(nb, list) or not nb or not all(isinstance(t, str) and t.strip() for t in nb):
                raise NeumuterError(f"{name}:{lineno}: \"neighbors\" must be a non-empty list of non-empty strings")


def read_records(path: str, require: Iterable[str] = ("text",)) -> list[dict]:
    return list(iter_records(path, require))


def dumps_record(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str, mode: str = "w", binary_to_terminal_ok: bool = True):
    """Open ``path`` for writing under a temporary name in the same folder and rename it into
    place only if the block finishes; ``-`` writes to stdout directly (nothing to clean up)."""
    if path == "-":
        if "b" in mode:
            if not binary_to_terminal_ok and sys.stdout.isatty():
                raise NeumuterError("refusing to write binary output to a terminal: use -o FILE or a pipe")
            out = sys.stdout.buffer
        else:
            out = sys.stdout
        yield out
        out.flush()
        return
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise NeumuterError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes it private; give it a new file's mode
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str, force: bool = False):
    """Yield a temporary directory beside ``path``; on success it replaces ``path``.

    An existing non-empty ``path`` is refused unless ``force``."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise NeumuterError(f"{path} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise NeumuterError(f"{path} exists and is not empty (use --force to replace it)")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise NeumuterError(f"cannot write {path}: folder {parent} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp makes it private; give it a new folder's mode
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_artifact(tensors: dict[str, torch.Tensor], metadata: dict, path: str) -> None:
    """Write tensors plus a metadata map to a safetensors file (``-`` = stdout).

    Metadata values are stored as JSON, except strings that do not read as JSON (kept as they
    are). NaN/inf tensors are written (``load_artifact`` refuses them)."""
    meta = {k: _metadata_value(v) for k, v in metadata.items()}
    data = st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=meta)
    with atomic_output(path, "wb", binary_to_terminal_ok=False) as out:
        out.write(data)


def _metadata_value(value) -> str:
    """A metadata value as stored: a string as it is, unless it would read back as JSON
    (``"1"``, ``"null"``): then, like every other value, as JSON."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value
    return json.dumps(value)


def load_artifact(path: str, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a safetensors artifact (``-`` = stdin); metadata values are JSON-decoded where possible.

    With ``kind``, refuse a file whose metadata ``kind`` differs (a mask where scales are expected)."""
    name = _display_name(path)
    try:
        if path == "-":
            if sys.stdin.isatty():
                raise NeumuterError("no input: give a file or pipe one into stdin")
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as handle:
                data = handle.read()
    except OSError as exc:
        raise NeumuterError(f"cannot read {name}: {exc.strerror or exc}") from None
    if not data:
        raise NeumuterError(f"{name}: empty input")
    try:
        tensors = st_load(data)
        raw_meta = _read_safetensors_metadata(data)
    except Exception as exc:  # safetensors raises its own error types
        raise NeumuterError(f"{name}: not a safetensors file ({str(exc).splitlines()[0][:120]})") from None
    meta = {}
    for key, value in raw_meta.items():
        try:
            meta[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            meta[key] = value
    if kind is not None and meta.get("kind") != kind:
        if "kind" not in meta:
            raise NeumuterError(f"{name}: not a {kind} file (its metadata names no neumuter kind)")
        raise NeumuterError(f"{name}: this is a {meta['kind']} file, not a {kind} file")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NeumuterError(f"{name}: tensor {key} holds NaN or infinite values")
    return tensors, meta


def _read_safetensors_metadata(data: bytes) -> dict:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return header.get("__metadata__", {}) or {}


def sha256_texts(texts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


__all__ = [
    "iter_records", "read_records", "validate_record", "dumps_record", "atomic_output",
    "atomic_directory", "save_artifact", "load_artifact", "sha256_texts", "sha256_file", "sha256_bytes",
]
