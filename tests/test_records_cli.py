"""Bad input, across the commands that read JSONL and directly on records.py: malformed JSON
(with its line number), missing or empty "text", empty input, unreadable paths, missing
models → exit 3, one "Error: ..." line on stderr, no traceback, and no output or temporary
file left behind. Also the atomic writers, the safetensors artifacts and `inspect`."""
import hashlib
import io
import json
import os
import stat

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save as st_save

from helpers import save_tiny
from test_neighbors import save_mlm
from neumuter_cli import NeumuterError
from neumuter_cli.cli import cli
from neumuter_cli.artifacts import FORMAT_VERSION, load_artifact, read_artifact, save_artifact
from neumuter_cli.records import EmptyInput, atomic_directory, atomic_output, dumps_record, iter_records, read_records

GOOD = json.dumps({"id": "a", "text": "hello there world", "neighbors": ["hi there world"]}) + "\n"

# (file content, the part of the message that must be there)
BAD_INPUTS = {
    "malformed": (GOOD + '{"text": "unclosed}\n', "in.jsonl:2: invalid JSON"),
    "malformed-later": (GOOD * 3 + "\n" + "not json\n", "in.jsonl:5: invalid JSON"),
    "no-text": (GOOD + "\n" + '{"id": 3, "neighbors": ["x"]}\n', 'in.jsonl:3: record has no "text"'),
    "empty-text": ('{"text": "", "neighbors": ["x"]}\n', 'in.jsonl:1: "text" must be a non-empty string'),
    "blank-text": ('{"text": " \\n\\t", "neighbors": ["x"]}\n', 'in.jsonl:1: "text" must be a non-empty string'),
    "text-not-string": ('{"text": 42, "neighbors": ["x"]}\n', 'in.jsonl:1: "text" must be a non-empty string'),
    "not-an-object": ('["hello there world"]\n', "in.jsonl:1: a record must be a JSON object"),
    "empty-file": ("", "in.jsonl: no records (empty input)"),
    "blank-lines": ("\n   \n\n", "in.jsonl: no records (empty input)"),
    "not-utf8": (b'{"text": "caf\xe9 au lait"}\n', "in.jsonl:1: not UTF-8 text"),
}
# bad records after a good first one: `neighbors` streams, so it has loaded its MLM by then
AFTER_THE_FIRST = {"malformed", "malformed-later", "no-text"}


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    return save_mlm(tmp_path_factory.mktemp("mlm"))


def write_input(folder, content):
    path = folder / "in.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def assert_clean_failure(result, message, out_dir=None, progress=False):
    """Exit 3, exactly one line on stderr: 'Error: ...' holding ``message`` (with ``progress``,
    after progress lines); nothing on stdout; no traceback (the exception was turned into
    click's exit); ``out_dir`` left empty."""
    assert result.exit_code == 3, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), repr(result.exception)   # not an uncaught error
    lines = result.stderr.splitlines()
    if progress:
        assert [line for line in lines if "Error" in line] == lines[-1:], lines
        lines = lines[-1:]
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""
    if out_dir is not None:
        assert os.listdir(out_dir) == [], os.listdir(out_dir)


def command_line(command, source, out, model, mlm):
    if command == "measure":
        return ["measure", str(source), "-m", model, "--device", "cpu", "-o", str(out / "m.jsonl")]
    if command == "localize":
        return ["localize", str(source), "-m", model, "--device", "cpu", "--epochs", "1", "-o",
                str(out / "mask.safetensors")]
    return ["neighbors", str(source), "--mlm", mlm, "--device", "cpu", "-o", str(out / "nb.jsonl")]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("command", ["measure", "localize", "neighbors"])
def test_bad_records_fail_cleanly(command, case, tiny_neo_dir, mlm_dir, tmp_path):
    content, message = BAD_INPUTS[case]
    source = write_input(tmp_path, content)
    out = tmp_path / "out"
    out.mkdir()
    # neighbors checks its first record before it loads the MLM: no MLM is needed to fail on it
    mlm = mlm_dir if case in AFTER_THE_FIRST else str(tmp_path / "no-mlm-needed")
    result = CliRunner().invoke(cli, command_line(command, source, out, tiny_neo_dir, mlm))
    assert_clean_failure(result, message, out, progress=command == "neighbors" and case in AFTER_THE_FIRST)


@pytest.mark.parametrize("command", ["measure", "localize", "neighbors"])
def test_bad_records_on_stdin_name_stdin(command, tiny_neo_dir, mlm_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    args = command_line(command, "-", out, tiny_neo_dir, mlm_dir)
    result = CliRunner().invoke(cli, args, input=GOOD + "{oops\n")
    assert_clean_failure(result, "<stdin>:2: invalid JSON", out, progress=command == "neighbors")


@pytest.mark.parametrize("command", ["measure", "localize", "neighbors"])
def test_missing_input_file(command, tiny_neo_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    args = command_line(command, tmp_path / "absent.jsonl", out, tiny_neo_dir, str(tmp_path / "no-mlm-needed"))
    result = CliRunner().invoke(cli, args)
    assert_clean_failure(result, f"cannot read {tmp_path / 'absent.jsonl'}: No such file or directory", out)


def test_bad_reference_file_is_named(tiny_neo_dir, tmp_path):
    source = write_input(tmp_path, GOOD)
    reference = tmp_path / "ref.jsonl"
    reference.write_text(GOOD + '{"id": 9}\n')
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(cli, ["measure", str(source), "-m", tiny_neo_dir, "--reference", str(reference),
                                      "-o", str(out / "m.jsonl")])
    assert_clean_failure(result, f'{reference}:2: record has no "text"', out)


def test_localize_checks_its_reference_before_loading_the_model(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "a b c", "neighbors": ["d e f"]}\n')
    out = tmp_path / "out"
    out.mkdir()
    # the model does not exist either: the reference error must come first
    result = CliRunner().invoke(cli, ["localize", str(source), "-m", str(tmp_path / "no-model"),
                                      "--reference", str(tmp_path / "absent.jsonl"), "-o", str(out / "m")])
    assert_clean_failure(result, f"cannot read {tmp_path / 'absent.jsonl'}: No such file or directory", out)


@pytest.mark.parametrize("command", ["measure", "localize", "inspect"])
@pytest.mark.parametrize("model", ["missing", "empty-dir", "a-file.jsonl"])
def test_missing_model_fails_cleanly(command, model, tmp_path):
    source = write_input(tmp_path, GOOD)
    path = tmp_path / model
    if model == "empty-dir":
        path.mkdir()
    if model == "a-file.jsonl":  # the records given to -m by mistake
        path.write_text(GOOD)
    out = tmp_path / "out"
    out.mkdir()
    args = {"measure": ["measure", str(source), "-o", str(out / "m.jsonl")],
            "localize": ["localize", str(source), "-o", str(out / "mask.safetensors")],
            "inspect": ["inspect"]}[command] + ["-m", str(path), "--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 3 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.splitlines()
    # progress ("loading ...") may come first; the error is the one line that ends the run
    assert [line for line in lines if line.startswith("Error: ")] == lines[-1:], lines
    assert str(path) in lines[-1] and any(why in lines[-1] for why in
                                          ("not found", "not a model directory", "a file, not a model"))
    assert "Traceback" not in result.output and result.stdout == ""
    assert os.listdir(out) == []


@pytest.mark.parametrize("arch,conv1d", [("gpt_neo", False), ("gpt2", True)])
def test_inspect_prints_the_blocks_and_the_total(arch, conv1d, tiny_neo_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tiny_neo_dir if arch == "gpt_neo" else str(tmp_path / arch)
    if arch != "gpt_neo":
        save_tiny(path, arch, layers=3, ffn=48)
    result = CliRunner().invoke(cli, ["inspect", "--model", path, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(path)
    blocks = model.config.num_hidden_layers
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["block", "down-projection", "neurons", "weight"]
    rows = [line.split(None, 3) for line in lines[2:2 + blocks]]
    assert [int(r[0]) for r in rows] == list(range(blocks))
    total = 0
    for index, module_path, neurons, orientation in rows:
        module = model.get_submodule(module_path)
        weight = module.weight
        inputs = weight.shape[0] if conv1d else weight.shape[1]
        assert f".{index}." in module_path and int(neurons) == inputs
        assert orientation == ("Conv1D (in, out)" if conv1d else "Linear (out, in)")
        total += inputs
    assert lines[2 + blocks] == ""
    assert lines[-1] == f"{blocks} blocks, {total} FFN neurons ({model.config.model_type}, float32)"
    assert len(lines) == blocks + 4
    assert result.stderr.startswith("loading ")


# ---------------------------------------------------------------- records.iter_records

@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_iter_records_errors(case, tmp_path):
    content, message = BAD_INPUTS[case]
    source = write_input(tmp_path, content)
    with pytest.raises(NeumuterError) as info:
        list(iter_records(str(source)))
    assert str(info.value).startswith(message.replace("in.jsonl", str(source)))


def test_iter_records_is_lazy_and_keeps_every_key(tmp_path):
    record = {"id": 7, "text": "ünïcode text", "meta": {"nested": [1, 2]}, "neighbors": ["x"]}
    source = write_input(tmp_path, "\ufeff" + json.dumps(record, ensure_ascii=False) + "\n\n" + "{bad\n")
    records = iter_records(str(source))
    assert next(records) == record                     # the first record comes before line 3 is read
    with pytest.raises(NeumuterError, match=r"in\.jsonl:3: invalid JSON"):
        next(records)
    assert json.loads(dumps_record(record)) == record and "ünïcode" in dumps_record(record)


def test_iter_records_required_keys_and_neighbours(tmp_path):
    source = write_input(tmp_path, '{"text": "a b"}\n')
    assert read_records(str(source)) == [{"text": "a b"}]
    with pytest.raises(NeumuterError, match=r':1: record has no "neighbors"'):
        read_records(str(source), require=("text", "neighbors"))
    for bad in ([], [""], ["ok", 3], "a string"):
        write_input(tmp_path, json.dumps({"text": "a b", "neighbors": bad}) + "\n")
        with pytest.raises(NeumuterError, match=r'"neighbors" must be a non-empty list of non-empty strings'):
            read_records(str(source), require=("text", "neighbors"))


def test_iter_records_from_a_stream_leaves_it_open():
    stream = io.StringIO(GOOD + GOOD)
    assert [r["id"] for r in iter_records("-", stream=stream)] == ["a", "a"]
    assert not stream.closed
    stream = io.StringIO(GOOD)
    assert [r["id"] for r in iter_records("named.jsonl", stream=stream)] == ["a"]
    assert not stream.closed                           # the caller's stream is the caller's to close
    with pytest.raises(NeumuterError, match=r"^named\.jsonl:1: invalid JSON"):
        list(iter_records("named.jsonl", stream=io.StringIO("{")))
    stream = io.StringIO("")
    with pytest.raises(NeumuterError, match=r"^<stdin>: no records \(empty input\)$"):
        list(iter_records("-", stream=stream))


def test_iter_records_missing_file(tmp_path):
    with pytest.raises(NeumuterError, match=r"cannot read .*absent\.jsonl: No such file or directory"):
        list(iter_records(str(tmp_path / "absent.jsonl")))
    with pytest.raises(NeumuterError, match=r"cannot read .*: Is a directory"):
        list(iter_records(str(tmp_path)))


# what a by-hand fuzz of the reader found: inputs that gave a traceback (RecursionError,
# ValueError) or were read and then written back as something that is not JSON or not UTF-8
# (1e999 → Infinity, a lone surrogate → UnicodeEncodeError on output)
HOSTILE = {
    "deep-lists": (b'{"text": "a", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}\n",
                   "in.jsonl:1: invalid JSON (nested too deeply)"),
    "deep-record": (b"[" * 100000 + b"\n", "in.jsonl:1: invalid JSON (nested too deeply)"),
    "deep-objects": (b'{"text": "a", "x": ' + b'{"a":' * 50000 + b"1" + b"}" * 50001 + b"\n",
                     "in.jsonl:1: invalid JSON (nested too deeply)"),
    "1e999": (b'{"text": "a"}\n{"text": "a", "x": 1e999}\n', "in.jsonl:2: invalid JSON (the number 1e999 is out of range)"),
    "-1e999": (b'{"text": "a", "x": [-1e999]}\n', "in.jsonl:1: invalid JSON (the number -1e999 is out of range)"),
    "NaN": (b'{"text": "a", "x": NaN}\n', "in.jsonl:1: invalid JSON (NaN is not a JSON value)"),
    "Infinity": (b'{"text": "a", "x": -Infinity}\n', "in.jsonl:1: invalid JSON (-Infinity is not a JSON value)"),
    "10**5000": (b'{"text": "a", "x": 1' + b"0" * 5000 + b"}\n",
                 "in.jsonl:1: invalid JSON (an integer of 5001 digits (at most 4300 are read))"),
    "lone-surrogate-text": (b'{"text": "a \\ud800 b"}\n', "in.jsonl:1: invalid JSON (a lone surrogate \\ud800 is not Unicode text)"),
    "lone-surrogate-key": (b'{"text": "a", "\\udfff": 1}\n', "in.jsonl:1: invalid JSON (a lone surrogate \\udfff is not Unicode text)"),
    "lone-surrogate-deep": (b'{"text": "a", "m": {"k": ["ok", "\\uDC00"]}}\n',
                            "in.jsonl:1: invalid JSON (a lone surrogate \\udc00 is not Unicode text)"),
    "not-utf8-later": (b'{"text": "a"}\n\n{"text": "caf\xe9"}\n', "in.jsonl:3: not UTF-8 text (byte 0xe9 at column 14)"),
    "utf16": ('{"text": "a"}\n'.encode("utf-16"), "in.jsonl:1: not UTF-8 text (byte 0xff at column 1)"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_iter_records_hostile_input_is_one_error(case, tmp_path):
    content, message = HOSTILE[case]
    source = write_input(tmp_path, content)
    with pytest.raises(NeumuterError) as info:
        list(iter_records(str(source)))
    assert str(info.value) == message.replace("in.jsonl", str(source))


def test_iter_records_keeps_what_is_valid(tmp_path):
    source = write_input(tmp_path, b'{"text": "a \\ud83d\\ude00", "big": 1' + b"0" * 4000 + b', "small": 1e-320}\r'
                                   b'{"text": "b\\u2028c"}\r\n')
    records = list(iter_records(str(source)))       # a surrogate pair, 4001 digits, a subnormal; CR line ends
    assert [r["text"] for r in records] == ["a \U0001F600", "b\u2028c"]
    assert records[0]["big"] == 10 ** 4000 and records[0]["small"] == 1e-320
    assert json.loads(dumps_record(records[0])) == records[0]


def test_iter_records_reads_stdin_as_utf8_whatever_the_locale(monkeypatch):
    data = '{"text": "café ünïcode"}\n'.encode("utf-8")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="latin-1"))
    assert [r["text"] for r in iter_records("-")] == ["café ünïcode"]


def test_empty_input_is_its_own_error(tmp_path):
    source = write_input(tmp_path, "\n\n")
    with pytest.raises(EmptyInput, match=r"in\.jsonl: no records \(empty input\)$"):
        list(iter_records(str(source)))
    assert issubclass(EmptyInput, NeumuterError)


# ---------------------------------------------------------------- atomic writers

def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_output_writes_only_on_success(tmp_path):
    target = tmp_path / "out.jsonl"
    with atomic_output(str(target)) as out:
        out.write("one\n")
        assert not target.exists()                     # still under its temporary name
        assert len(os.listdir(tmp_path)) == 1
    assert target.read_text() == "one\n" and os.listdir(tmp_path) == ["out.jsonl"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask()   # not mkstemp's private 0600

    with pytest.raises(RuntimeError):
        with atomic_output(str(target)) as out:
            out.write("half a line")
            raise RuntimeError("interrupted")
    assert target.read_text() == "one\n" and os.listdir(tmp_path) == ["out.jsonl"]

    fresh = tmp_path / "new.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(str(fresh), "wb") as out:
            out.write(b"\0\1")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_atomic_output_errors_and_stdout(tmp_path, capsys, monkeypatch):
    with pytest.raises(NeumuterError, match=r"folder .*missing does not exist"):
        with atomic_output(str(tmp_path / "missing" / "out.jsonl")):
            pass
    with atomic_output("-") as out:
        out.write("to stdout\n")
    assert capsys.readouterr().out == "to stdout\n"
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    with pytest.raises(NeumuterError, match="refusing to write binary output to a terminal"):
        with atomic_output("-", "wb", binary_to_terminal_ok=False):
            pass


def test_atomic_directory(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(str(target)) as folder:
        (folder / "a.txt").write_text("a")
        assert not target.exists()
    assert os.listdir(target) == ["a.txt"] and os.listdir(tmp_path) == ["ckpt"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask()    # not mkdtemp's private 0700

    with pytest.raises(NeumuterError, match=r"exists and is not empty$"):
        with atomic_directory(str(target)):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(str(target), force=True) as folder:
            (folder / "b.txt").write_text("b")
            raise RuntimeError("interrupted")
    assert os.listdir(target) == ["a.txt"] and os.listdir(tmp_path) == ["ckpt"]   # old one kept
    with atomic_directory(str(target), force=True) as folder:
        (folder / "b.txt").write_text("b")
    assert os.listdir(target) == ["b.txt"] and os.listdir(tmp_path) == ["ckpt"]   # no .old left

    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(str(empty)) as folder:
        (folder / "c.txt").write_text("c")
    assert os.listdir(empty) == ["c.txt"]

    (tmp_path / "file").write_text("x")
    with pytest.raises(NeumuterError, match="exists and is not a directory"):
        with atomic_directory(str(tmp_path / "file")):
            pass
    with pytest.raises(NeumuterError, match=r"folder .*nowhere does not exist"):
        with atomic_directory(str(tmp_path / "nowhere" / "ckpt")):
            pass
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "empty", "file"]


# ---------------------------------------------------------------- artifacts

def test_artifact_round_trip(tmp_path):
    tensors = {"log_alpha.0": torch.randn(5), "log_alpha.3": torch.randn(7), "ids": torch.arange(4)}
    metadata = {"kind": "neumuter-mask", "format_version": FORMAT_VERSION, "layers": [0, 3], "config": {"lr": 0.1},
                "model": "models/tiny", "digits": "12345", "word": "null", "flag": True}
    path = tmp_path / "mask.safetensors"
    save_artifact(tensors, metadata, str(path))
    assert os.listdir(tmp_path) == ["mask.safetensors"]
    loaded, meta = load_artifact(str(path), kind="neumuter-mask")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert meta == metadata                            # strings stay strings, even "12345" and "null"


def test_artifact_through_stdout_and_stdin(tmp_path, capsysbinary, monkeypatch):
    metadata = {"kind": "neumuter-mask", "format_version": FORMAT_VERSION}
    save_artifact({"x": torch.ones(3)}, metadata, "-")
    data = capsysbinary.readouterr().out
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
    artifact = read_artifact("-", kind="neumuter-mask")      # stdin is read once: parsed and hashed
    assert torch.equal(artifact.tensors["x"], torch.ones(3)) and artifact.metadata == metadata
    assert artifact.sha256 == hashlib.sha256(data).hexdigest() and artifact.name == "<stdin>"


def test_artifact_errors(tmp_path):
    path = tmp_path / "a.safetensors"
    save_artifact({"scale.0": torch.ones(4)}, {"kind": "neumuter-scales"}, str(path))
    with pytest.raises(NeumuterError) as info:
        load_artifact(str(path), kind="neumuter-mask")
    assert str(info.value) == f"{path}: this is a neumuter-scales file, not a neumuter-mask file"

    save_artifact({"x": torch.ones(4)}, {}, str(path))
    with pytest.raises(NeumuterError) as info:
        load_artifact(str(path), kind="neumuter-mask")
    assert str(info.value) == f"{path}: not a neumuter-mask file (its metadata names no neumuter kind)"

    for bad in (float("nan"), float("inf")):
        path.write_bytes(st_save({"x": torch.tensor([0.0, bad])}))
        with pytest.raises(NeumuterError, match=r"tensor x holds NaN or infinite values"):
            load_artifact(str(path))

    path.write_text('{"text": "not a safetensors file"}\n')
    with pytest.raises(NeumuterError, match=r"a\.safetensors: not a safetensors file \("):
        load_artifact(str(path))
    path.write_bytes(b"")
    with pytest.raises(NeumuterError, match=r"a\.safetensors: empty input"):
        load_artifact(str(path))
    with pytest.raises(NeumuterError, match=r"cannot read .*absent: No such file or directory"):
        load_artifact(str(tmp_path / "absent"))
    with pytest.raises(NeumuterError, match=r"folder .*missing does not exist"):
        save_artifact({"x": torch.ones(1)}, {}, str(tmp_path / "missing" / "a.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]
