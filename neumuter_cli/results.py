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
from .records import finite_number, json_problem, loads_json, read_bounded


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


# ---------------------------------------------------------------- yardsticks

_EL_KEY = re.compile(r"el_(\d+)")
_SHARE = "MA, EL_n and an AUC are shares, between 0 and 1"


def _range_problem(key: str, value) -> str | None:
    """Why ``value`` cannot be the yardstick ``key`` (None when it can, or ``key`` is no yardstick)."""
    share = key == "ma" or _EL_KEY.fullmatch(key) or key.startswith("auc_")
    if not share and key != "loss":
        return None
    if value is None and _EL_KEY.fullmatch(key):
        return None                             # EL_n is undefined for a text of n tokens or fewer
    if not finite_number(value):
        return "not a finite number"
    if share and not 0 <= value <= 1:
        return f"outside [0, 1] ({_SHARE})"
    if key == "loss" and value < 0:
        return "negative (a loss is a mean negative log-likelihood, never below 0)"
    return None


def check_yardstick(values: dict, where: str) -> None:
    """The rule for every number a verdict is made against (eq. 17's thresholds, a reference
    model's scores, saved or measured, and its AUCs): MA, EL_n and AUCs in [0, 1], a loss at
    least 0, each finite. No model gives another number, and a verdict against one would be
    false (an MA threshold of 5 passes every record): refused, naming the number."""
    for key, value in values.items():
        problem = _range_problem(key, value)
        if problem is not None:
            raise NeumuterError(f"{where}: {key!r} is {escape(repr(value))[:40]}, {problem}: no model gives that "
                                "number, so no verdict is made against it")


def check_el_sizes(keys: Iterable[str], el_ns: Sequence[int], where: str, what: str) -> None:
    """Refuse a yardstick measured with EL sizes the verdict does not use: the verdict would come
    from fewer numbers than the yardstick gives (reference scores with EL_2, a run with
    --el-n 0: MA alone)."""
    extra = sorted({int(m.group(1)) for m in map(_EL_KEY.fullmatch, keys) if m} - set(el_ns))
    if extra:
        raise SettingsMessage("{where} holds {key!r}, but this run's {el_ns} is {given}: measure {what} with the same "
                              "{el_ns}", where=where, key=el_key(extra[0]), given=",".join(map(str, el_ns)) or "0",
                              what=what)


# ---------------------------------------------------------------- sets that must not share a text

#: why a holdout, and eq. 17's texts never seen, hold none of the records
HOLDOUT_WHY = ("a holdout must be texts neither model trained on: scored against the records themselves every "
               "membership AUC is 0.5 and PrivLeak 0, whatever the model remembers")
UNSEEN_WHY = ("the thresholds must come from texts the model never saw: the records themselves set the bar at "
              "their own mean")


def check_disjoint(records: Sequence[dict], keys: Sequence, other_keys: Sequence, name: str, other_name: str,
                   why: str, tokens: bool = False) -> None:
    """Refuse a set of texts that must not hold any of the records (a holdout, eq. 17's texts
    never seen) when it does. ``keys`` / ``other_keys``: what is compared, one per text (the
    texts, or with ``tokens`` the token ids as measured: texts that differ only past the
    --max-length cut are the same text to every score)."""
    own: dict = {}
    for k, key in enumerate(keys):
        own.setdefault(key, k)
    shared = [own[key] for key in other_keys if key in own]
    if shared:
        labels = [record_label(records[k], k) for k in shared]
        raise SettingsMessage("{other}: {count} of its {total} texts are records of {name}"
                              + (" in their first {max_length} tokens" if tokens else "") + " ({shown}): {why}",
                              other=other_name, count=len(shared), total=len(other_keys), name=name, why=why,
                              shown=", ".join(labels[:5]) + (", ..." if len(labels) > 5 else ""))


# ---------------------------------------------------------------- files saved by earlier runs

def read_thresholds(path: str, el_ns: Sequence[int] = (10,)) -> dict:
    """Thresholds saved by an earlier run, so the reference set is measured once: the output of
    ``measure UNSEEN.jsonl --format json`` (its summary means are the thresholds), the output of
    a run with ``--reference`` (its thresholds), or a plain object ``{"ma", "el_N", "loss"}``."""
    try:
        data = loads_json(read_bounded(path).decode("utf-8"))
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
        out[key] = value
    check_yardstick(out, path)
    check_el_sizes(data, el_ns, path, "the reference set")
    out = {key: float(value) for key, value in out.items()}
    records = data.get("records")
    if records is not None and (isinstance(records, bool) or not isinstance(records, int) or records < 1):
        raise NeumuterError(f"{path}: \"records\" is not a count of reference records")
    out["records"] = records
    return out


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _load_json_or_jsonl(path: str):
    """One JSON document, else JSONL; numbers are read as records are (no NaN, no Infinity,
    no number a double cannot hold)."""
    try:
        content = read_bounded(path).decode("utf-8")
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
            entry[key] = row[key]
        for n in el_ns:
            key = el_key(n)
            if key not in row:
                raise SettingsMessage("{where} has no {key!r} (measure the reference with the same {el_ns})",
                                      where=where, key=key)
            if row[key] is not None and not finite_number(row[key]):
                raise NeumuterError(f"{where}: {key!r} is not a number")
            entry[key] = row[key]
        check_yardstick(entry, where)
        check_el_sizes(row, el_ns, where, "the reference")
        entry = {key: None if value is None else float(value) for key, value in entry.items()}
        tokens = row.get("tokens")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2):
            raise NeumuterError(f"{where}: \"tokens\" is not a number of tokens (at least 2): {hint}")
        entry["tokens"] = tokens
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


__all__ = ["el_key", "record_label", "mean", "MeasureResult", "check_yardstick", "check_el_sizes", "HOLDOUT_WHY",
           "UNSEEN_WHY", "check_disjoint", "read_thresholds", "read_reference_scores", "text_sha256"]
