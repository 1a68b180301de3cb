"""Records (JSONL) in and out, output checks, atomic file and directory writes, hashes."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Iterable, Iterator

from . import NeumuterError


class EmptyInput(NeumuterError):
    """An input that holds no record at all (an empty file, or only blank lines)."""


def display_name(path: str) -> str:
    return "<stdin>" if path == "-" else str(path)


def is_terminal(stream) -> bool:
    """Whether ``stream`` (sys.stdin, sys.stdout) is an open terminal; a closed one (a command
    started with ``>&-`` or ``<&-``, where Python sets it to None) is not."""
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError, OSError):   # closed, or not a real file
        return False


def standard_output():
    """sys.stdout, or a NeumuterError when the command was started with stdout closed."""
    if sys.stdout is None:
        raise NeumuterError("cannot write to stdout: it is closed (write to a file instead)")
    return sys.stdout


class _BadValue(ValueError):
    """A JSON value that parses but cannot be carried through faithfully."""


def _json_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _BadValue(f"an integer of {len(text.lstrip('-'))} digits (at most {sys.get_int_max_str_digits()} "
                        "are read)") from None


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadValue(f"the number {text[:24]}{'...' if len(text) > 24 else ''} is out of range")
    return value


def _json_constant(text: str):
    raise _BadValue(f"{text} is not a JSON value")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def loads_json(text: str):
    """``json.loads`` that refuses what a record line refuses too: NaN and Infinity, numbers a
    double cannot hold, integers too long to read, nesting too deep to follow. Raises
    ValueError (its message says why, see :func:`json_problem`)."""
    try:
        return json.loads(text, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except RecursionError:
        raise _BadValue("nested too deeply") from None


def json_problem(exc: ValueError) -> str:
    """Why :func:`loads_json` refused a text, in a few words."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg.removesuffix(' at')} at line {exc.lineno} column {exc.colno}"
    return str(exc)


def finite_number(value) -> bool:
    """A JSON number that is a finite double: not a bool, not NaN or infinite, not an integer
    too large for a double (math.isfinite raises OverflowError on those)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class _LineError(ValueError):
    """Why one line is refused (the file and line are added by :func:`iter_records`)."""


_UNDECODABLE = re.compile("[\udc80-\udcff]")   # what surrogateescape makes of a byte that is not UTF-8


def strict_loads(line: str):
    """One JSONL line → a Python value; the ``loads`` of the ``jsonlines`` reader. Refused besides
    malformed JSON: bytes that are not UTF-8 (the input is decoded with surrogateescape, so that
    a bad byte is reported on its own line), NaN/Infinity, numbers a double cannot hold,
    integers too long to read, nesting deeper than the interpreter can follow, and lone
    surrogates (not Unicode: they could not be written back as UTF-8). Raises a ValueError
    whose text is the reason."""
    line = line.removesuffix("\n")
    bad = _UNDECODABLE.search(line)
    if bad:
        column = len(line[:bad.start()].encode("utf-8", "surrogateescape")) + 1
        raise _LineError(f"not UTF-8 text (byte 0x{ord(bad.group()) - 0xdc00:02x} at column {column})")
    try:
        value = json.loads(line, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except json.JSONDecodeError as exc:
        raise _LineError(f"invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})") from None
    except _BadValue as exc:
        raise _LineError(f"invalid JSON ({exc})") from None
    except RecursionError:
        raise _LineError("invalid JSON (nested too deeply)") from None
    if _SURROGATE_ESCAPE.search(line):    # an escaped surrogate: fine in a pair, not alone
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = exc.object[exc.start]
            raise _LineError(f"invalid JSON (a lone surrogate \\u{ord(bad):04x} is not Unicode text)") from None
    return value


#: the longest line a JSONL reader takes, in characters (a record's text may be a whole book;
#: /dev/zero or a file without line breaks is refused at this length, not read until memory ends)
MAX_LINE = 1 << 26
#: the most a JSON file read whole may hold (thresholds, reference scores, a mask or scales file)
MAX_FILE = 1 << 28
#: the most a small file neumuter reads inside a checkpoint folder may hold (neumuter.json, a config)
MAX_SMALL_FILE = 1 << 26


def size_text(count: int) -> str:
    """A size in bytes (or characters) as a message shows it: 64 Mi, 256 Mi, 1,000."""
    for shift, unit in ((30, "Gi"), (20, "Mi"), (10, "Ki")):
        if count >= 1 << shift and count % (1 << shift) == 0:
            return f"{count >> shift} {unit}"
    return f"{count:,}"


def read_bounded(path: str, limit: int = MAX_FILE, stream: IO[bytes] | None = None) -> bytes:
    """The bytes of the file ``path`` (or of ``stream``), refused when it holds more than
    ``limit``: at most ``limit + 1`` bytes are read, so /dev/zero or a pipe that never ends
    gives one clear line instead of a process killed for memory. OSError is the caller's."""
    if stream is not None:
        data = stream.read(limit + 1)
    else:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    if len(data) > limit:
        raise NeumuterError(f"{display_name(path)}: larger than {size_text(limit)}B, the most neumuter reads of such a "
                            "file")
    return data


def read_small_file(path: str, limit: int = MAX_SMALL_FILE) -> bytes | None:
    """A small file inside a model or checkpoint folder (neumuter.json, config.json): None when
    it is not a regular file (missing, a folder, a named pipe that would block the read);
    refused beyond ``limit`` bytes."""
    if not os.path.isfile(path):
        return None
    return read_bounded(path, limit)


class _LongLine(ValueError):
    """A line longer than MAX_LINE: (its number, the bound)."""


def _bounded_lines(lines, limit: int):
    """The lines of a text stream, each read with a bound: a line longer than ``limit``
    characters raises :class:`_LongLine` once ``limit`` are read, not after the whole of it."""
    readline = getattr(lines, "readline", None)
    if readline is None:
        yield from lines
        return
    number = 0
    while True:
        line = readline(limit + 1)
        number += 1
        if not line:
            return
        if len(line) > limit:
            raise _LongLine(number, limit)
        yield line


def _text_lines(stream):
    """``stream`` as text lines for the reader: a binary stream is decoded as UTF-8 whatever the
    locale, with a leading byte-order mark dropped and undecodable bytes kept for
    :func:`strict_loads` to report; \\n, \\r\\n and a lone \\r all end a line (a raw CR cannot
    occur inside a JSON string). Each line is read with the bound MAX_LINE. Returns (lines, the
    wrapper to detach afterwards or None)."""
    if isinstance(stream, io.TextIOBase) or not hasattr(stream, "readable"):
        return _bounded_lines(stream, MAX_LINE), None
    wrapper = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline=None)
    return _bounded_lines(wrapper, MAX_LINE), wrapper


def iter_records(path: str, require: Iterable[str] = ("text",), stream: IO | None = None) -> Iterator[dict]:
    """Yield the JSON objects of a JSONL file (``-`` = stdin), one per non-blank line.

    Every record must be an object whose ``text`` is a non-empty string; each key in
    ``require`` other than ``text`` must be present. Errors name the file and the line.
    The input is read as UTF-8 whatever the locale, through a ``jsonlines.Reader`` with
    :func:`strict_loads`. An input with no record at all raises :class:`EmptyInput`. Whatever
    the bytes, the only error raised is a NeumuterError.
    """
    import jsonlines

    name = display_name(path)
    require = tuple(require)
    owned = stream is None and path != "-"   # close only what is opened here
    if stream is None:
        if path == "-":
            if sys.stdin is None:
                raise NeumuterError("no input: stdin is closed")
            stream = getattr(sys.stdin, "buffer", sys.stdin)   # bytes: decoded as UTF-8 below
        else:
            try:
                stream = open(path, "rb")
            except OSError as exc:
                raise NeumuterError(f"cannot read {name}: {exc.strerror or exc}") from None
    lines, wrapper = _text_lines(stream)
    reader = jsonlines.Reader(lines, loads=functools.partial(_record_loads, require=require))
    count = 0
    try:
        for record in reader.iter(skip_empty=True):
            count += 1
            yield record
    except jsonlines.InvalidLineError as exc:
        raise NeumuterError(f"{name}:{exc.lineno}: {exc.__cause__}") from None
    except _LongLine as exc:
        number, limit = exc.args
        raise NeumuterError(f"{name}:{number}: a line longer than {size_text(limit)} characters (a JSONL line holds "
                            "one record)") from None
    except OSError as exc:
        raise NeumuterError(f"cannot read {name}: {exc.strerror or exc}") from None
    finally:
        if wrapper is not None:
            wrapper.detach()                 # the caller's stream (stdin) stays open
        if owned:
            stream.close()
    if count == 0:
        raise EmptyInput(f"{name}: no records (empty input)")


def _record_loads(line: str, require: tuple[str, ...]) -> dict:
    """:func:`strict_loads`, then the record checks: inside the reader's ``loads``, so that the
    reader reports the line of a record that parses but is invalid too."""
    record = strict_loads(line)
    problem = record_problem(record, require)
    if problem:
        raise _LineError(problem)
    return record


def record_problem(record, require: Iterable[str] = ("text",)) -> str | None:
    """Why ``record`` is not a valid input record (None when it is)."""
    if not isinstance(record, dict):
        return "a record must be a JSON object"
    text = record.get("text")
    if "text" not in record:
        return 'record has no "text"'
    if not isinstance(text, str) or not text.strip():
        return '"text" must be a non-empty string'
    for key in require:
        if key == "text":
            continue
        if key not in record:
            return f'record has no "{key}"'
        if key == "neighbors":
            nb = record[key]
            if not isinstance(nb, list) or not nb or not all(isinstance(t, str) and t.strip() for t in nb):
                return '"neighbors" must be a non-empty list of non-empty strings'
    return None


def validate_record(record, name: str, lineno: int, require: Iterable[str] = ("text",)) -> None:
    problem = record_problem(record, require)
    if problem:
        raise NeumuterError(f"{name}:{lineno}: {problem}")


def read_records(path: str, require: Iterable[str] = ("text",)) -> list[dict]:
    return list(iter_records(path, require))


def dumps_json(value, **options) -> str:
    """``json.dumps`` that never writes NaN or Infinity (JSON has no such values, and neumuter
    refuses them as input): a non-finite number is a NeumuterError instead."""
    try:
        return json.dumps(value, allow_nan=False, **options)
    except ValueError:
        raise NeumuterError("refusing to write a non-finite number (NaN or infinity) as JSON") from None


def dumps_record(record: dict) -> str:
    return dumps_json(record, ensure_ascii=False)


def record_writer(out: IO[str], flush: bool = False):
    """A ``jsonlines.Writer`` of records on ``out``, one :func:`dumps_record` line each
    (``flush``: after every line, for a stream read as it is written)."""
    import jsonlines

    return jsonlines.Writer(out, dumps=dumps_record, flush=flush)


# ---------------------------------------------------------------- outputs

def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _special_file(path: str) -> bool:
    """A device, pipe or socket (/dev/null, /dev/stdout, a named pipe): written in place,
    never replaced by a regular file."""
    return os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output(path: str, inputs: Iterable[str | None] = ()) -> None:
    """Refuse, before any work starts, an output that could not be written at the end: its
    folder is missing, is not a folder, or is not writable (probed by creating and removing a
    temporary file there, which also catches read-only file systems); or it is one of the
    command's ``inputs`` (the input would be replaced by the result). ``-`` (stdout) and a
    device or pipe (/dev/null, /dev/stdout) pass."""
    if path == "-":
        standard_output()
        return
    if _special_file(path):
        return
    for source in inputs:
        if source and source != "-" and os.path.isfile(source) and os.path.isfile(path) and _same_file(path, source):
            raise NeumuterError(f"refusing to write {path}: it is an input of this command "
                                "(write the result to another file)")
    target = Path(path)
    if target.is_dir():
        raise NeumuterError(f"cannot write {path}: it is a folder (give a file name)")
    folder = target.parent if str(target.parent) else Path(".")
    check_folder_writable(path, folder)


def check_folder_writable(path: str, folder: Path) -> None:
    """Refuse a missing, non-folder or unwritable ``folder`` that ``path`` is to be written in."""
    if not folder.exists():
        raise NeumuterError(f"cannot write {path}: folder {folder} does not exist")
    if not folder.is_dir():
        raise NeumuterError(f"cannot write {path}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".neumuter-probe.", dir=folder)
    except OSError as exc:
        raise NeumuterError(f"cannot write {path}: folder {folder} is not writable "
                            f"({exc.strerror or exc})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


@contextlib.contextmanager
def _cleanup_on_sigterm():
    """While a temporary file or folder exists, turn SIGTERM into ``SystemExit(143)`` (the
    status of a process ended by SIGTERM), so that the cleanup below runs as it does for
    Ctrl-C. Only from the main thread, and only when nobody else handles SIGTERM."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_output(path: str, mode: str = "w", binary_to_terminal_ok: bool = True):
    """Open ``path`` for writing under a temporary name in the same folder and rename it into
    place only if the block finishes; ``-`` writes to stdout directly (nothing to clean up).
    The temporary file is removed on an error, Ctrl-C or SIGTERM. A device or pipe
    (/dev/null, /dev/stdout, a named pipe) is written in place: renaming a file over it would
    replace it."""
    if path == "-":
        stdout = standard_output()
        if "b" in mode:
            if not binary_to_terminal_ok and is_terminal(stdout):
                raise NeumuterError("refusing to write binary output to a terminal: use -o FILE or a pipe")
            out = stdout.buffer
        else:
            out = stdout
        yield out
        out.flush()
        return
    if _special_file(path):
        try:
            handle = open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
        except OSError as exc:
            raise NeumuterError(f"cannot write {path}: {exc.strerror or exc}") from None
        with handle:
            yield handle
        return
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise NeumuterError(f"cannot write {path}: folder {folder} does not exist")
    with _cleanup_on_sigterm():
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        except OSError as exc:
            raise NeumuterError(f"cannot write {path}: {exc.strerror or exc}") from None
        try:
            with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
                yield handle
            os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes it private; give it a new file's mode
            os.replace(tmp, target)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise NeumuterError(f"cannot write {path}: {exc.strerror or exc}") from None
            raise


def _follow_umask(folder: Path) -> None:
    """Give every file and folder under ``folder`` (and itself) the mode a new one gets, as
    other outputs do: mkdtemp makes the folder private, and some writers (safetensors) make
    their files 0600."""
    umask = _umask()
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def destination(path: str) -> Path:
    """Where ``path`` is, resolved once, before anything moves: the real path of its folder plus
    its own name. ``muted/../muted`` runs through the folder it names; once that folder is moved
    aside, the path itself no longer leads anywhere, its resolved form still does."""
    target = Path(path)
    if target.name in ("", ".", ".."):       # the current folder, a parent, the root: never replaced
        raise NeumuterError(f"cannot write {path}: it names a folder by '.' or '..' (or the root), which is not "
                            "replaced: give the folder's own name")
    return Path(os.path.realpath(target.parent if str(target.parent) else ".")) / target.name


#: the temporaries atomic_output and atomic_directory make beside an output NAME (tempfile's
#: 8 random characters), and the probe of check_folder_writable
_TEMPORARY = r"\.{name}\.[a-z0-9_]{{8}}\.(tmp|old)"
_PROBE = re.compile(r"\.neumuter-probe\.[a-z0-9_]{8}")


def stale_temporaries(path: str) -> list[tuple[str, str]]:
    """The temporaries of neumuter's own naming beside the output ``path`` that an earlier run
    left (killed before it could remove them), as (path, kind): ``"tmp"`` a file or folder it
    was writing, ``"old"`` a folder it had moved aside to replace it (the previous content of
    ``path``), ``"probe"`` a file it made to see whether the folder is writable."""
    if path == "-" or _special_file(path) or Path(path).name in ("", ".", ".."):
        return []
    target = destination(path)
    pattern = re.compile(_TEMPORARY.format(name=re.escape(target.name)))
    try:
        names = sorted(os.listdir(target.parent))
    except OSError:
        return []
    found = []
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            found.append((os.path.join(os.path.dirname(path), name), match.group(1)))
        elif _PROBE.fullmatch(name):
            found.append((os.path.join(os.path.dirname(path), name), "probe"))
    return found


@contextlib.contextmanager
def atomic_directory(path: str, force: bool = False):
    """Yield a temporary directory beside ``path``; on success it replaces ``path``.

    An existing non-empty ``path`` is replaced only with ``force``: the caller decides what
    may be replaced (for a checkpoint, ``artifacts.check_output_dir``). ``path`` is resolved
    once (:func:`destination`), before anything moves. The old folder is moved aside, the new
    one renamed into place, then the old one removed; on any failure, error, Ctrl-C or SIGTERM,
    ``path`` is left as it was and nothing is left beside it. Should even putting the old folder
    back fail, it is kept where it was moved, and the error says where."""
    target = destination(path)
    if target.exists() and not target.is_dir():
        raise NeumuterError(f"{path} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise NeumuterError(f"{path} exists and is not empty")
    parent = target.parent
    if not parent.is_dir():
        raise NeumuterError(f"cannot write {path}: folder {parent} does not exist")
    with _cleanup_on_sigterm():
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
        except OSError as exc:
            raise NeumuterError(f"cannot write {path}: {exc.strerror or exc}") from None
        old = None
        try:
            yield tmp
            _follow_umask(tmp)
            if target.is_dir() and any(target.iterdir()):
                # a sibling name (no change of parent folder, so no write access to the old
                # folder itself is needed); mkdtemp reserves it, the rename replaces it
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
                os.replace(target, old)
                try:
                    os.replace(tmp, target)
                except BaseException:
                    os.replace(old, target)       # should this fail too, the old folder stays in old
                    old = None
                    raise
            else:
                os.replace(tmp, target)           # a missing or empty target
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = ""
            if old is not None and old.is_dir():
                if any(old.iterdir()):
                    kept = f"; the previous content of {path} is kept in {old}"
                else:
                    with contextlib.suppress(OSError):
                        old.rmdir()
            if isinstance(exc, OSError):
                raise NeumuterError(f"cannot write {path}: {exc.strerror or exc}{kept}") from None
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


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
    "EmptyInput", "display_name", "is_terminal", "standard_output", "iter_records", "read_records",
    "validate_record", "record_problem", "strict_loads", "dumps_json", "dumps_record", "record_writer",
    "loads_json", "json_problem", "finite_number", "MAX_LINE", "MAX_FILE", "MAX_SMALL_FILE", "size_text",
    "read_bounded", "read_small_file",
    "check_output", "check_folder_writable", "atomic_output", "atomic_directory", "destination",
    "stale_temporaries", "sha256_texts",
    "sha256_file", "sha256_bytes",
]
