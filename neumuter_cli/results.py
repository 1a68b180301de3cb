"""Measured results as data: the keys of a record's numbers, how a record is named, the result
of one `measure` run, and the files earlier runs saved, read back (eq. 17 thresholds, a
reference model's scores). Plain Python, no torch: the writers (render.py), the verdicts
(mia.py) and the figures (plots.py) read these without loading a model."""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from . import NeumuterError
from .errors import SettingsMessage, escape
from .records import finite_number, json_problem, loads_json


def el_key(n: int) -> str:
    """The key of EL_n in a measured record and a summary."""
    return f"el_{n}"


def record_label(record: dict, position: int) -> str:
    """How a record is named in messages and tables: its id (escaped: a newline or an escape
    sequence in it is shown, never written raw), else its line position."""
    value = record.get("id")
    return escape(value) if value is not None else f"#{position + 1}"


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    return math.fsum(values) / len(values) if values else None


@dataclass
class MeasureResult:
    """The measured records (input keys kept, metrics added) and the summary. With a holdout,
    ``mia_scores`` holds every text's membership scores (``mia.MIA_SCORES``, higher = more
    member-like): ``{"records": [...], "holdout": [...]}`` under the model, plus
    ``"ref_records"`` and ``"ref_holdout"`` under a reference model (not from saved scores);
    the ROC curves are drawn from them (``plots.plot_measure``)."""

    records: list[dict]
    summary: dict
    el_ns: tuple[int, ...]
    mia_scores: dict | None = None

    @property
    def judged(self) -> bool:
        """Whether the records carry a verdict (``forgotten``)."""
        return bool(self.records) and "forgotten" in self.records[0]

    @property
    def not_forgotten(self) -> list[str]:
        return [record_label(r, k) for k, r in enumerate(self.records) if not r.get("forgotten")]

    @property
    def over_forgotten(self) -> list[str]:
        return [record_label(r, k) for k, r in enumerate(self.records) if r.get("over_forgotten")]


# ---------------------------------------------------------------- files saved by earlier runs

def read_thresholds(path: str, el_ns: Sequence[int] = (10,)) -> dict:
    """Thresholds saved by an earlier run, so the reference set is measured once: the output of
    ``measure UNSEEN.jsonl --format json`` (its summary means are the thresholds), the output of
    a run with ``--reference`` (its thresholds), or a plain object ``{"ma", "el_N", "loss"}``."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = loads_json(handle.read())
    except OSError as exc:
        raise NeumuterError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise NeumuterError(f"{path}: not a JSON file (not UTF-8 text)") from None
    except ValueError as exc:
        raise NeumuterError(f"{path}: not a JSON file ({json_problem(exc)[:100]})") from None
    if isinstance(data, dict) and isinstance(data.get("summary"), dict):
        data = data["summary"]
        if isinstance(data.get("thresholds"), dict):
            data = data["thresholds"]
    if not isinstance(data, dict):
        raise NeumuterError(f"{path}: expected a JSON object with the thresholds")
    out = {}
    for key in ["ma"] + [el_key(n) for n in el_ns] + ["loss"]:
        value = data.get(key)
        if not finite_number(value):
            raise SettingsMessage("{path}: no number for threshold {key!r} (measure the reference set with the "
                                  "same {el_ns})", path=path, key=key)
        out[key] = float(value)
    out["records"] = data.get("records")
    return out


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _load_json_or_jsonl(path: str):
    """One JSON document, else JSONL; numbers are read as records are (no NaN, no Infinity,
    no number a double cannot hold)."""
    try:
        with open(path, encoding="utf-8") as handle:
            content = handle.read()
    except OSError as exc:
        raise NeumuterError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise NeumuterError(f"{path}: not UTF-8 text") from None
    try:
        return loads_json(content)
    except ValueError as exc:
        if not isinstance(exc, json.JSONDecodeError):      # JSON, but a value neumuter refuses
            raise NeumuterError(f"{path}: invalid JSON ({json_problem(exc)})") from None
    import jsonlines

    # lines end at \n, \r\n or \r only: measure writes U+2028 and the like raw inside strings
    reader = jsonlines.Reader(io.StringIO(content, newline=None), loads=loads_json)
    try:
        return list(reader.iter(skip_empty=True, allow_none=True))
    except jsonlines.InvalidLineError as exc:
        raise NeumuterError(f"{path}:{exc.lineno}: invalid JSON "
                            f"({json_problem(exc.__cause__).split(' at line ')[0]})") from None


def read_reference_scores(path: str, texts: Sequence[str], el_ns: Sequence[int]) -> dict:
    """A reference model's numbers saved by ``measure RECORDS --model REF`` (JSON or JSONL
    output), so the reference model is not loaded again: ``{"records": [{"tokens", "ma",
    "el_N", "loss"}], "summary": {...} | None, "path"}``. Matched to ``texts`` by position and
    checked by text (or its sha256 in ``text_sha256``); any mismatch is refused."""
    data = _load_json_or_jsonl(path)
    summary = None
    if isinstance(data, dict) and isinstance(data.get("records"), list):
        rows, summary = data["records"], data.get("summary") if isinstance(data.get("summary"), dict) else None
    elif isinstance(data, dict):
        rows = [data]
    elif isinstance(data, list):
        rows = data
    else:
        raise NeumuterError(f"{path}: expected the JSON or JSONL output of `neumuter measure`")
    hint = "it must be the output of `neumuter measure` on the same records, in the same order"
    if len(rows) != len(texts):
        raise NeumuterError(f"{path}: {len(rows)} records where the input has {len(texts)}: {hint}")
    out = []
    for k, (row, text) in enumerate(zip(rows, texts)):
        where = f"{path}: record {k + 1}"
        if not isinstance(row, dict):
            raise NeumuterError(f"{where} is not a JSON object: {hint}")
        if "text" in row:
            same = row["text"] == text
        elif "text_sha256" in row:
            same = row["text_sha256"] == text_sha256(text)
        else:
            raise NeumuterError(f"{where} has neither \"text\" nor \"text_sha256\" to match it with the input")
        if not same:
            raise NeumuterError(f"{where} is not input record {k + 1} (its text differs): {hint}")
        entry = {}
        for key in ("ma", "loss"):
            if not finite_number(row.get(key)):
                raise NeumuterError(f"{where} has no number {key!r}: {hint}")
            entry[key] = float(row[key])
        for n in el_ns:
            key = el_key(n)
            if key not in row:
                raise SettingsMessage("{where} has no {key!r} (measure the reference with the same {el_ns})",
                                      where=where, key=key)
            if row[key] is not None and not finite_number(row[key]):
                raise NeumuterError(f"{where}: {key!r} is not a number")
            entry[key] = None if row[key] is None else float(row[key])
        entry["tokens"] = row.get("tokens")
        out.append(entry)
    return {"records": out, "summary": summary, "path": path, "fingerprint": _scores_fingerprint(path, rows, summary)}


_FINGERPRINT = re.compile(r"[0-9a-f]{32}")


def _scores_fingerprint(path: str, rows: Sequence[dict], summary: dict | None) -> str:
    """The fingerprint of the model the scores were measured on: the summary's
    ``model.fingerprint`` (JSON output) or every record's ``model_fingerprint`` (JSONL output),
    which must agree. Scores that do not say are refused: without it the model itself could
    pass as its own reference."""
    model = (summary or {}).get("model")
    from_summary = model.get("fingerprint") if isinstance(model, dict) else None
    from_rows = [row.get("model_fingerprint") for row in rows]
    if from_summary is None and (not from_rows or any(value is None for value in from_rows)):
        raise NeumuterError(f"{path}: the scores do not say which model they were measured on (no "
                            "\"model_fingerprint\"): measure the reference model again with this neumuter "
                            "(`neumuter measure RECORDS --model REF --format json`)")
    given = [value for value in [from_summary, *from_rows] if value is not None]
    if not all(isinstance(value, str) and _FINGERPRINT.fullmatch(value) for value in given):
        raise NeumuterError(f"{path}: a model fingerprint in it is not 32 hexadecimal digits")
    found = sorted(set(given))
    if len(found) > 1:
        raise NeumuterError(f"{path}: the scores name {len(found)} different model fingerprints ({found[0]}, "
                            f"{found[1]}, ...): they must all come from one run of `neumuter measure`")
    return found[0]


__all__ = ["el_key", "record_label", "mean", "MeasureResult", "read_thresholds", "read_reference_scores",
           "text_sha256"]
