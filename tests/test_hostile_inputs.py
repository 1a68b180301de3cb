"""Hostile inputs generated, not listed: seeded property tests (hypothesis, derandomized) over
the readers a user's files go through: JSONL records, reference scores (measure's own JSON or
JSONL output), mask/scales files (safetensors with a metadata header) and a checkpoint's
model.safetensors header. Whatever the bytes, the command ends with a documented exit status,
exactly one "Error: ..." line (the last on stderr; only progress lines before it), no
traceback, and no output or temporary file left behind. Thresholds and reference scores get
past their reader only with numbers a model can give; ids and paths with control characters
reach stderr escaped."""
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from safetensors.torch import save as st_save
import torch

from helpers import PEOPLE, save_tiny
from neumuter_cli.cli import cli

SETTINGS = settings(max_examples=60, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def check_outcome(result, folder: Path, before: set, allowed=(3,), output=None):
    """A documented status; on an error exactly one "Error: " line, the last one, after
    progress lines only (no other error or warning); no traceback; nothing new in ``folder``."""
    assert result.exit_code in allowed, (result.exit_code, result.output)
    assert isinstance(result.exception, (SystemExit, type(None))), repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        return
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith("Error: ") and not lines[-1].startswith("Error: internal error"), lines
    assert not any(line.startswith(("Error", "Warning", "warning")) for line in lines[:-1]), lines
    assert set(os.listdir(folder)) == before, sorted(set(os.listdir(folder)) - before)
    if output is not None:
        assert not os.path.exists(output)


# ---------------------------------------------------------------- JSONL records

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=5), inner,
                                                                                 max_size=3)), max_leaves=8)
RECORD = st.fixed_dictionaries({"text": st.one_of(st.sampled_from(PEOPLE), st.text(max_size=20), JSON_SCALARS)},
                               optional={"id": JSON_SCALARS, "neighbors": JSON_VALUES})
ODD_LINES = st.sampled_from([
    '{"text": NaN}', '{"text": "x", "v": Infinity}', '{"text": "x", "v": -Infinity}', '{"text": "x", "v": 1e999}',
    '{"text": "x", "v": ' + "9" * 5000 + "}", "[" * 5000 + "]" * 5000, '{"text": "\\ud800"}',
    '{"text": "a\\ud83d\\ude00b"}', "\ufeff" + json.dumps({"text": PEOPLE[0]}), "{", "", "   ", "null", "[]",
    '{"text": "x"} trailing', '{"text": "x", "text": 5}',
])
LINE = st.one_of(RECORD.map(json.dumps), JSON_VALUES.map(json.dumps), ODD_LINES, st.text(max_size=30))
LINE_END = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def jsonl_bytes(draw):
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    # half the files hold only records, most of them good, so that they get past the reader
    good = st.fixed_dictionaries({"text": st.sampled_from(PEOPLE)}, optional={"id": JSON_SCALARS, "neighbors": st.one_of(
        st.lists(st.sampled_from(PEOPLE), min_size=1, max_size=2), JSON_VALUES)}).map(json.dumps)
    line = st.one_of(good, good, good, RECORD.map(json.dumps)) if kind > 4 else LINE
    lines = draw(st.lists(st.tuples(line, LINE_END), min_size=kind > 4, max_size=6))
    data = "".join(line + end for line, end in lines).encode("utf-8", "surrogatepass")
    if draw(st.booleans()) and data:                  # a stray byte that is not UTF-8
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])) + data[at:]
    return data


@SETTINGS
@given(data=jsonl_bytes(), command=st.sampled_from(["measure", "relearn", "localize"]))
def test_any_records_file_ends_in_one_line(data, command):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        source = folder / "in.jsonl"
        source.write_bytes(data)
        out = folder / "out"
        before = set(os.listdir(folder))
        # no model: a records file that reads well ends in "model not found", read before the load
        result = CliRunner().invoke(cli, [command, str(source), "-m", str(folder / "no-model"), "-o", str(out),
                                          "--device", "cpu"])
        check_outcome(result, folder, before, output=out)


# ---------------------------------------------------------------- reference scores

NUMBERISH = st.one_of(st.floats(), st.integers(), st.booleans(), st.none(), st.text(max_size=4),
                      st.lists(st.floats(), max_size=2), st.sampled_from([float("nan"), float("inf"), 10 ** 400]))
FINGERPRINT = st.one_of(st.text("0123456789abcdef", min_size=32, max_size=32), st.text(max_size=40), NUMBERISH)


@st.composite
def scores_file(draw):
    """measure's JSON or JSONL output for PEOPLE[:3], mutated: fields missing, of the wrong
    type, non-finite (as the NaN/Infinity literals Python's json writes), texts that differ,
    fingerprints absent, malformed or disagreeing."""
    texts = PEOPLE[:3]
    rows = []
    for k in range(draw(st.sampled_from([3, 3, 3, 3, 0, 2, 4]))):
        def value(good):                 # mostly a good value, now and then anything
            return draw(good if draw(st.integers(0, 5)) else NUMBERISH)
        row = {"text": texts[k] if k < 3 and draw(st.integers(0, 8)) else draw(st.text(max_size=10)),
               "tokens": value(st.integers(0, 40)), "ma": value(st.floats(0, 1)), "el_10": value(st.floats(0, 1)),
               "loss": value(st.floats(0, 10)),
               "model_fingerprint": value(st.text("0123456789abcdef", min_size=32, max_size=32))}
        if not draw(st.integers(0, 4)):  # now and then a field missing
            for key in draw(st.lists(st.sampled_from(sorted(row)), max_size=2, unique=True)):
                del row[key]
        rows.append(row)
    choice = draw(st.sampled_from([2, 2, 1, 1, 3, 0, 4]))
    if choice == 0:
        return draw(st.binary(max_size=100))
    if choice == 1:                                     # JSONL
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    summary = draw(st.one_of(st.none(), st.fixed_dictionaries({"model": st.fixed_dictionaries(
        {"fingerprint": FINGERPRINT})}), JSON_VALUES))
    return json.dumps({"records": rows if choice != 4 else draw(JSON_VALUES), "summary": summary}).encode()


def _scores(**changes):
    rows = [{"text": t, "tokens": 16, "ma": 0.5, "el_10": 0.1, "loss": 2.0, "model_fingerprint": "0" * 32}
            for t in PEOPLE[:3]]
    rows[0].update(changes)
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@SETTINGS
@given(data=scores_file())
@example(data=_scores(loss=10 ** 400))                 # OverflowError in math.isfinite: a traceback, status 1
@example(data=_scores(ma=float("nan")))                # Python's json writes and reads NaN
@example(data=b'{"records": ' + b"[" * 5000 + b"]" * 5000 + b"}")    # RecursionError
def test_any_reference_scores_end_in_one_line(data):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        records = folder / "records.jsonl"
        records.write_text("".join(json.dumps({"id": f"p{k}", "text": t}) + "\n" for k, t in enumerate(PEOPLE[:3])))
        scores = folder / "scores.json"
        scores.write_bytes(data)
        out = folder / "out.jsonl"
        before = set(os.listdir(folder))
        result = CliRunner().invoke(cli, ["measure", str(records), "-m", str(folder / "no-model"), "--reference-scores",
                                          str(scores), "--check", "-o", str(out), "--device", "cpu"])
        check_outcome(result, folder, before, output=out)


# ---------------------------------------------------------------- yardstick values: never an impossible one

def in_range(key, value) -> bool:
    """Whether ``value`` is a number a model can give for the yardstick ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        finite = math.isfinite(value)
    except OverflowError:
        return False
    return finite and (0 <= value <= 1 if key != "loss" else value >= 0)


YARDSTICK = st.one_of(st.floats(-2, 2), st.floats(0, 1), st.floats(0, 20), st.integers(-3, 3),
                      st.sampled_from([1.0000001, -1e-12, 1 + 1e-12, 5, -3, 7, 1e308, -0.0, 0, 1, 10 ** 400]),
                      st.booleans(), st.none(), st.text(max_size=3))


@SETTINGS
@given(values=st.fixed_dictionaries({"ma": YARDSTICK, "el_10": YARDSTICK, "loss": YARDSTICK}),
       extra=st.one_of(st.just({}), st.fixed_dictionaries({"el_2": YARDSTICK})))
@example(values={"ma": 5, "el_10": 5, "loss": -3}, extra={})          # the issue's: "check passed"
@example(values={"ma": 0.5, "el_10": 0.5, "loss": 3}, extra={"el_2": 0.5})
def test_any_thresholds_file_is_range_checked_before_it_is_used(values, extra):
    """A thresholds file gets past its reader (to "model not found") only when every number
    is one a model can give, for exactly the --el-n sizes of the run."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        records = folder / "records.jsonl"
        records.write_text(json.dumps({"id": "p0", "text": PEOPLE[0]}) + "\n")
        thresholds = folder / "thresholds.json"
        thresholds.write_text(json.dumps({**values, **extra}))
        before = set(os.listdir(folder))
        result = CliRunner().invoke(cli, ["measure", str(records), "-m", str(folder / "no-model"), "--thresholds",
                                          str(thresholds), "--check", "--device", "cpu"])
        check_outcome(result, folder, before)
        read = all(in_range(key, value) for key, value in values.items()) and not extra
        assert result.stderr.splitlines()[-1].startswith("Error: model not found") == read, result.stderr


@st.composite
def judged_scores(draw):
    """measure's JSONL output for PEOPLE[:3] with good fingerprints and texts, and numbers of
    any range (now and then an EL size the run does not use)."""
    rows = []
    for text in PEOPLE[:3]:
        row = {"text": text, "tokens": 16, "model_fingerprint": "0" * 32}
        for key in ("ma", "el_10", "loss"):
            row[key] = draw(st.one_of(st.floats(0, 1), st.floats(0, 1), YARDSTICK)) if key != "loss" else draw(
                st.one_of(st.floats(0, 10), YARDSTICK))
        if not draw(st.integers(0, 9)):
            row["el_5"] = draw(st.floats(0, 1))
        rows.append(row)
    return rows


@SETTINGS
@given(rows=judged_scores())
def test_any_reference_scores_are_range_checked_before_they_are_used(rows):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        records = folder / "records.jsonl"
        records.write_text("".join(json.dumps({"id": f"p{k}", "text": t}) + "\n" for k, t in enumerate(PEOPLE[:3])))
        scores = folder / "scores.jsonl"
        scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
        before = set(os.listdir(folder))
        result = CliRunner().invoke(cli, ["measure", str(records), "-m", str(folder / "no-model"), "--reference-scores",
                                          str(scores), "--check", "--device", "cpu"])
        check_outcome(result, folder, before)
        read = all(in_range(key, row[key]) or (key == "el_10" and row[key] is None)
                   for row in rows for key in ("ma", "el_10", "loss")) and not any("el_5" in row for row in rows)
        assert result.stderr.splitlines()[-1].startswith("Error: model not found") == read, result.stderr


# ---------------------------------------------------------------- user data with control characters

CONTROL = st.characters(codec="utf-8", categories=["Cc", "Zl", "Zp", "Cf"])
HOSTILE_TEXT = st.lists(st.one_of(CONTROL, st.sampled_from(["\n", "\r", "\x1b[2J", "\x1b]0;t\x07", "Error: ", "\u202e",
                                                            "\x9b", "a", "é"])),
                        min_size=1, max_size=8).map("".join)


def assert_escaped(stderr: str, shown: str) -> None:
    """No raw control character on stderr but the line ends, and the datum is shown escaped."""
    from neumuter_cli.errors import escape

    raw = [ch for ch in stderr if escape(ch) != ch and ch != "\n"]
    assert not raw, [hex(ord(ch)) for ch in raw]
    assert escape(shown) in stderr.splitlines()[-1], (escape(shown), stderr)


@SETTINGS
@given(name=HOSTILE_TEXT.filter(lambda t: "/" not in t and "\x00" not in t))
def test_any_path_reaches_stderr_escaped(name):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        missing = folder / f"{name}.jsonl"
        result = CliRunner().invoke(cli, ["measure", str(missing), "-m", str(folder / "m"), "--device", "cpu"])
        assert result.exit_code == 3 and result.stderr.splitlines()[-1].startswith("Error: cannot read ")
        assert_escaped(result.stderr, str(missing))
        records = folder / "records.jsonl"
        records.write_text(json.dumps({"text": PEOPLE[0]}) + "\n")
        model = folder / name
        result = CliRunner().invoke(cli, ["measure", str(records), "-m", str(model), "--device", "cpu"])
        assert result.exit_code == 3, result.output
        assert_escaped(result.stderr, str(model))


@settings(SETTINGS, max_examples=20)
@given(identifier=st.one_of(HOSTILE_TEXT, st.text(max_size=6)))
def test_any_record_id_reaches_stderr_escaped(tiny_neo_dir, identifier):
    """A record id in the line that names the record (here a text too short to measure)."""
    with tempfile.TemporaryDirectory() as folder:
        records = Path(folder) / "records.jsonl"
        records.write_text(json.dumps({"id": identifier, "text": "A"}) + "\n")
        result = CliRunner().invoke(cli, ["measure", str(records), "-m", tiny_neo_dir, "--device", "cpu"])
        assert result.exit_code == 3, result.output
        assert result.stderr.splitlines()[-1].endswith("has 1 token(s); at least 2 are needed to measure it")
        assert_escaped(result.stderr, f"record {identifier} has")


# ---------------------------------------------------------------- safetensors headers

DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "Q4", "", "f32"])
SHAPE = st.lists(st.one_of(st.integers(-2, 70), st.text(max_size=2), st.none()), max_size=3)


@st.composite
def raw_safetensors(draw, names, metadata):
    """A safetensors file built by hand: tensor entries with any dtype, shape and offsets (many
    inconsistent), a metadata map, a header length that may lie, data of any length."""
    header = {}
    for name in draw(st.lists(st.one_of(st.sampled_from(names), st.text(max_size=8)), max_size=4, unique=True)):
        begin = draw(st.integers(0, 300))
        header[name] = {"dtype": draw(DTYPES), "shape": draw(SHAPE),
                        "data_offsets": draw(st.one_of(st.tuples(st.just(begin), st.integers(0, 600)).map(list),
                                                       NUMBERISH))}
        if draw(st.integers(0, 6)) == 0:
            del header[name][draw(st.sampled_from(sorted(header[name])))]   # one key of three
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(metadata, JSON_VALUES))
    text = json.dumps(header).encode()
    if draw(st.integers(0, 5)) == 0:
        text = draw(st.binary(max_size=40))
    length = len(text) if draw(st.integers(0, 4)) else draw(st.integers(0, 1 << 40))
    return struct.pack("<Q", length) + text + draw(st.binary(max_size=700))


TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8,
                torch.bool]


@st.composite
def tensor(draw, shape=None):
    shape = draw(st.lists(st.integers(0, 5), max_size=3)) if shape is None else shape
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    kind = draw(st.sampled_from(["random", "zeros", "nan", "inf"]))
    value = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    if kind == "zeros":
        value = torch.zeros(shape)
    elif kind in ("nan", "inf") and value.numel() and dtype.is_floating_point:
        value.view(-1)[0] = float(kind)
    return value.to(dtype) if dtype.is_floating_point else value.abs().mul(3).to(dtype)


@st.composite
def valid_safetensors(draw, names, metadata):
    """A well-formed safetensors file (safetensors' own writer) of random tensors under real and
    random names, with a metadata map: it gets past the parser to neumuter's own checks."""
    tensors = {name: draw(st.one_of(tensor([4]), tensor())) for name in draw(st.lists(st.one_of(
        st.sampled_from(names), st.text("abcdefgh.0123", min_size=1, max_size=10)), max_size=4, unique=True))}
    meta = draw(metadata)
    data = st_save(tensors, metadata=meta if isinstance(meta, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()) else None)
    cut = draw(st.integers(0, 6))
    if cut == 0 and data:
        data = data[:draw(st.integers(0, len(data) - 1))]     # truncated
    elif cut == 1:
        data += draw(st.binary(min_size=1, max_size=50))      # trailing bytes
    return data


def safetensors_bytes(names, metadata):
    return st.one_of(valid_safetensors(names, metadata), valid_safetensors(names, metadata),
                     raw_safetensors(names, metadata))


ANY_METADATA = st.dictionaries(
    st.sampled_from(["kind", "format_version", "neurons", "layers", "fingerprint", "model", "modules"]),
    st.one_of(st.sampled_from(['"neumuter-mask"', '"neumuter-scales"', "2", "1", "[64, 64]", "[0, 1]", "null"]),
              st.text(max_size=10)), max_size=7)
# mostly the metadata select or apply expects, with one field of another kind or value
GOOD_METADATA = {"kind": '"neumuter-mask"', "format_version": "2", "neurons": "[4, 4]", "layers": "[0, 1]",
                 "fingerprint": '"' + "0" * 32 + '"', "model": '"m"', "modules": '["a", "b"]'}


def metadata(kind):
    good = {**GOOD_METADATA, "kind": f'"{kind}"'}
    edited = st.tuples(st.sampled_from(sorted(good)), st.one_of(st.sampled_from(
        ["2", "[4]", "[4, 4, 4]", "[0]", "[1, 0]", "[-1]", "NaN", "1e999", "[4.5, 4]", '"x"', "null", "{}", "9" * 5000,
         '"neumuter-mask"', '"neumuter-scales"']), st.text(max_size=6))).map(lambda e: {**good, e[0]: e[1]})
    return st.one_of(edited, edited, edited, st.just(good), ANY_METADATA)


@SETTINGS
@example(data=("select", st_save({"log_alpha.0": torch.zeros(4)}, metadata={**json.loads(json.dumps(GOOD_METADATA)),
                                                                        "format_version": "9" * 5000})))
@given(data=st.one_of(
    st.tuples(st.just("select"), safetensors_bytes(["log_alpha.0", "log_alpha.1", "log_alpha.2", "scale.0"],
                                                   metadata("neumuter-mask"))),
    st.tuples(st.just("apply"), safetensors_bytes(["scale.0", "scale.1", "scale.7", "log_alpha.0"],
                                                  metadata("neumuter-scales")))))
def test_any_mask_or_scales_file_ends_in_one_line(data):
    command, data = data
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        source = folder / "in.safetensors"
        source.write_bytes(data)
        out = folder / "out"
        before = set(os.listdir(folder))
        extra = ["-m", str(folder / "no-model"), "--device", "cpu"] if command == "apply" else []
        result = CliRunner().invoke(cli, [command, str(source), "-o", str(out), *extra])
        # select: a file that happens to be a valid mask is selected (0)
        check_outcome(result, folder, before, allowed=(0, 3) if command == "select" else (3,),
                      output=None if command == "select" else out)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoint") / "model"
    save_tiny(path, "gpt_neo")
    return path, load_file(path / "model.safetensors")


@st.composite
def checkpoint_bytes(draw, state):
    """The checkpoint's own tensors, edited: one dropped, one of another dtype or shape, one
    NaN, an extra one, the file truncated or padded; or a hand-built header."""
    if draw(st.integers(0, 3)) == 0:
        return draw(raw_safetensors(sorted(state), st.just({"format": "pt"})))
    tensors = {name: value.clone() for name, value in state.items()}
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(tensors)))
        edit = draw(st.sampled_from(["drop", "dtype", "shape", "nan", "extra"]))
        if edit == "drop":
            del tensors[name]
        elif edit == "dtype":
            tensors[name] = draw(tensor(list(tensors[name].shape)))
        elif edit == "shape":
            tensors[name] = draw(tensor())
        elif edit == "nan" and tensors[name].is_floating_point() and tensors[name].numel():
            tensors[name] = tensors[name].clone()
            tensors[name].view(-1)[0] = float("nan")
        else:
            tensors[draw(st.text("abcdefgh.0123", min_size=1, max_size=12))] = draw(tensor())
        if not tensors:
            break
    data = st_save(tensors, metadata={"format": "pt"})
    cut = draw(st.integers(0, 5))
    if cut == 0:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif cut == 1:
        data += draw(st.binary(min_size=1, max_size=50))
    return data


def test_any_checkpoint_ends_in_one_line(tiny_checkpoint):
    """measure on a checkpoint whose model.safetensors is any of these: refused in one line,
    or (a NaN that the records never reach, say) measured; never a traceback, never a file
    left behind."""
    source, state = tiny_checkpoint

    @SETTINGS
    @given(data=checkpoint_bytes(state))
    def check(data):
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            model = folder / "model"
            shutil.copytree(source, model)
            (model / "model.safetensors").write_bytes(data)
            records = folder / "records.jsonl"
            records.write_text(json.dumps({"text": PEOPLE[0]}) + "\n")
            out = folder / "out.jsonl"
            before = set(os.listdir(folder))
            result = CliRunner().invoke(cli, ["measure", str(records), "-m", str(model), "-o", str(out),
                                              "--device", "cpu"])
            check_outcome(result, folder, before, allowed=(0, 3), output=out)
            if result.exit_code == 0:
                assert all(math.isfinite(json.loads(line)["loss"]) for line in out.read_text().splitlines())
    check()


def test_a_bug_is_one_line_and_status_3_never_the_verdict_status(monkeypatch, tmp_path):
    """Whatever escapes the library (a bug) is still one line with exit status 3: status 1
    stays the verdict of `measure --check`, whatever happens."""
    import neumuter_cli.measure

    def broken(config, progress=None):
        raise ZeroDivisionError("division by zero")
    monkeypatch.setattr(neumuter_cli.measure, "run_measure", broken)
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"text": PEOPLE[0]}) + "\n")
    result = CliRunner().invoke(cli, ["measure", str(records), "-m", "x", "--thresholds", str(records), "--check"])
    assert result.exit_code == 3 and isinstance(result.exception, SystemExit)
    assert result.stderr.splitlines() == ["Error: internal error: ZeroDivisionError: division by zero (a bug in "
                                          "neumuter: please report it with the command that caused it)"]
