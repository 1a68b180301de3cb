"""Issue 26: nothing lost, no false pass. The third round of hostile input, each case with the
exact line and exit status a user now gets:

1. an output folder is replaced only by an operation that cannot lose it (the destination is
   resolved once, the old folder restored or kept whenever the new one is not in place);
2. every yardstick (thresholds, reference scores, a reference model's numbers) is checked
   for its range and for the --el-n set of the verdict before it is used;
3. a holdout (and eq. 17's texts never seen) is disjoint from the records;
4. --trust-remote-code is the model's only: a reference model or masked LM needs its own flag;
5. every byte of user data that reaches stderr is escaped;
6. every option has its effect or is refused with status 2, out-of-range integers included;
7. every input reader has a bound;
8. temporaries an earlier, killed run left beside an output are named on the next run."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import PEOPLE, save_tiny, train_memorizer
from neumuter_cli.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(result, status=3):
    """Exit ``status``, no traceback, and exactly one "Error: " line, the last on stderr."""
    assert result.exit_code == status, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("Error: ")] == lines[-1:], lines
    return lines[-1]


def raw_controls(text: str) -> list[str]:
    """The control characters in ``text`` other than the line breaks between lines."""
    return [ch for ch in text if (ord(ch) < 32 and ch != "\n") or 0x7f <= ord(ch) < 0xa0]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """M, a tiny GPT-Neo that memorised the people texts (MA 0.97-1.0 on them); R, an untrained
    model with its tokenizer; the forget texts; a scales file made for M."""
    from test_select_apply import write_mask

    from neumuter_cli.models import load_model

    root = tmp_path_factory.mktemp("hostile3")
    _, tokenizer = train_memorizer(root / "M", steps=60)
    save_tiny(root / "R", "gpt_neo", seed=1, tokenizer=tokenizer, vocab_size=len(tokenizer), hidden=64, ffn=256)
    forget = write_jsonl(root / "forget.jsonl", [{"id": f"p{k}", "text": t} for k, t in enumerate(PEOPLE[:3])])
    write_mask(root / "mask.st", load_model(str(root / "M"), device="cpu")[0])
    assert run("select", root / "mask.st", "-o", root / "scales.st").exit_code == 0
    return {"root": root, "M": root / "M", "R": root / "R", "forget": forget, "scales": root / "scales.st"}


def scores(world, name, *options):
    """``measure forget --model NAME --format json`` saved once per set of options."""
    path = world["root"] / f"{name}-scores{''.join(options).replace('-', '_')}.json"
    if not path.exists():
        result = run("measure", world["forget"], "-m", world[name], "--format", "json", "-o", path, "--device", "cpu",
                     *options)
        assert result.exit_code == 0, result.output
    return path


# ---------------------------------------------------------------- 1. no checkpoint is lost

def checkpoint(world, folder):
    assert run("apply", world["scales"], "-m", world["M"], "-o", folder, "--device", "cpu").exit_code == 0
    return sorted(os.listdir(folder)), (folder / "neumuter.json").read_bytes()


@pytest.mark.parametrize("command", ["apply", "relearn"])
def test_an_output_path_through_the_folder_it_replaces_loses_nothing(world, tmp_path, monkeypatch, command):
    """`-o muted/../muted --force` moved muted aside, then renamed the new checkpoint to a path
    that ran through the moved folder: "No such file or directory", muted gone, .old and .tmp
    left behind."""
    monkeypatch.chdir(tmp_path)
    before = checkpoint(world, tmp_path / "muted")
    args = {"apply": [world["scales"]], "relearn": [world["forget"], "--steps", 1]}[command]
    for through in ("muted/../muted", "muted/./../muted", str(tmp_path / "muted" / ".." / "muted")):
        result = run(command, *args, "-m", world["M"], "-o", through, "--force", "--device", "cpu")
        assert result.exit_code == 0, result.output
        assert result.stderr.splitlines()[-1].endswith(f"checkpoint written to {through}")
        assert sorted(os.listdir(tmp_path)) == ["muted"]          # nothing beside it
        record = json.loads((tmp_path / "muted" / "neumuter.json").read_text())
        assert record.get("stage", "apply") == command
    assert before[0] == sorted(os.listdir(tmp_path / "muted")) or command == "relearn"
    # a path that names a folder by '..' is never replaced (the old rename failed only at the end)
    (tmp_path / "sub").mkdir()
    checkpoint(world, tmp_path / "sub" / "muted")
    result = run(command, *args, "-m", world["M"], "-o", "sub/muted/..", "--force", "--device", "cpu")
    assert error_line(result) == ("Error: cannot write sub/muted/..: it names a folder by '.' or '..' (or the root), "
                                  "which is not replaced: give the folder's own name")
    assert "loading" not in result.stderr and os.listdir(tmp_path / "sub") == ["muted"]


def test_an_old_folder_that_cannot_be_put_back_is_kept_and_named(tmp_path, monkeypatch):
    """The new folder cannot be renamed into place and the old one cannot be renamed back: the
    old one is kept where it was moved, and the error says where."""
    from neumuter_cli import NeumuterError
    from neumuter_cli import records

    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("old")
    calls = []
    real = os.replace

    def failing(source, target):
        calls.append((Path(source).name, Path(target).name))
        if len(calls) > 1:                 # the move aside works, the two renames after it fail
            raise OSError(28, "No space left on device")
        return real(source, target)
    monkeypatch.setattr(records.os, "replace", failing)
    with pytest.raises(NeumuterError) as error:
        with records.atomic_directory(str(out), force=True) as tmp:
            (tmp / "weights").write_text("new")
    [old] = [name for name in os.listdir(tmp_path) if name.endswith(".old")]
    assert str(error.value) == (f"cannot write {out}: No space left on device; the previous content of {out} is "
                                f"kept in {tmp_path / old}")
    assert (tmp_path / old / "weights").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == [old]                  # the new one is removed
    # one failure only (the rename into place): the old folder is put back
    monkeypatch.setattr(records.os, "replace", real)
    real(tmp_path / old, out)
    calls.clear()

    def once(source, target):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(source, target)
    monkeypatch.setattr(records.os, "replace", once)
    with pytest.raises(NeumuterError, match=r"^cannot write .*: No space left on device$"):
        with records.atomic_directory(str(out), force=True) as tmp:
            (tmp / "weights").write_text("new")
    assert os.listdir(tmp_path) == ["out"] and (out / "weights").read_text() == "old"


# ---------------------------------------------------------------- 2. no impossible yardstick

NO_MODEL = "no model gives that number, so no verdict is made against it"
SHARE = "outside [0, 1] (MA, EL_n and an AUC are shares, between 0 and 1)"
NEGATIVE = "negative (a loss is a mean negative log-likelihood, never below 0)"


@pytest.mark.parametrize("thresholds,el_n,detail", [
    ({"ma": 5, "el_2": 5, "loss": -3}, "2", f"'ma' is 5, {SHARE}"),        # the issue's: "check passed"
    ({"ma": 0.5, "el_10": 7, "loss": 3}, "10", f"'el_10' is 7, {SHARE}"),
    ({"ma": -3, "el_10": 0.5, "loss": 3}, "10", f"'ma' is -3, {SHARE}"),
    ({"ma": 0.5, "el_10": 0.5, "loss": -0.5}, "10", f"'loss' is -0.5, {NEGATIVE}"),
    ({"ma": 1.01, "el_10": 0.5, "loss": 3}, "10", f"'ma' is 1.01, {SHARE}"),
])
def test_thresholds_out_of_range_are_refused(world, tmp_path, thresholds, el_n, detail):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(thresholds))
    out = tmp_path / "out.jsonl"
    result = run("measure", world["forget"], "-m", world["M"], "--thresholds", path, "--el-n", el_n, "--check",
                 "-o", out, "--device", "cpu")
    assert error_line(result) == f"Error: {path}: {detail}: {NO_MODEL}"
    assert "check passed" not in result.stderr and "loading" not in result.stderr and not out.exists()


def test_thresholds_in_range_still_judge(world, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"ma": 0.5, "el_10": 0.5, "loss": 3.0, "records": 20}))
    result = run("measure", world["forget"], "-m", world["M"], "--thresholds", path, "--check", "--device", "cpu",
                 "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 1 and "check failed: 3 of 3 records are not forgotten" in result.stderr
    path.write_text(json.dumps({"ma": 0.5, "el_10": 0.5, "loss": 3.0, "records": "\x1b]0;t\x07"}))
    result = run("measure", world["forget"], "-m", world["M"], "--thresholds", path, "--device", "cpu")
    assert error_line(result) == f'Error: {path}: "records" is not a count of reference records'


@pytest.mark.parametrize("edit,detail", [
    ({"ma": 1.01, "loss": -0.5}, f"'ma' is 1.01, {SHARE}"),                  # the issue's: "check passed"
    ({"loss": -0.5}, f"'loss' is -0.5, {NEGATIVE}"),
    ({"el_10": -0.1}, f"'el_10' is -0.1, {SHARE}"),
])
def test_reference_scores_out_of_range_are_refused(world, tmp_path, edit, detail):
    data = json.loads(scores(world, "R").read_text())
    data["records"][0].update(edit)
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(data))
    result = run("measure", world["forget"], "-m", world["M"], "--reference-scores", path, "--check",
                 "--allow-over-forgotten", "--device", "cpu")
    assert error_line(result) == f"Error: {path}: record 1: {detail}: {NO_MODEL}"
    assert "loading" not in result.stderr


def test_a_yardstick_of_other_el_sizes_is_refused(world, tmp_path):
    """Scores measured at --el-n 2 judged a run with --el-n 0 by MA alone (with --el-n 3 they
    were refused); a thresholds file the same."""
    two = scores(world, "R", "--el-n", "2")
    result = run("measure", world["forget"], "-m", world["M"], "--reference-scores", two, "--el-n", "0", "--check",
                 "--device", "cpu")
    assert error_line(result) == (f"Error: {two}: record 1 holds 'el_2', but this run's --el-n is 0: measure the "
                                  "reference with the same --el-n")
    result = run("measure", world["forget"], "-m", world["M"], "--reference-scores", two, "--el-n", "2,10",
                 "--device", "cpu")
    assert error_line(result) == (f"Error: {two}: record 1 has no 'el_10' (measure the reference with the same "
                                  "--el-n)")
    thresholds = tmp_path / "t.json"
    thresholds.write_text(json.dumps({"ma": 0.5, "el_2": 0.5, "el_10": 0.5, "loss": 3}))
    result = run("measure", world["forget"], "-m", world["M"], "--thresholds", thresholds, "--check", "--device", "cpu")
    assert error_line(result) == (f"Error: {thresholds} holds 'el_2', but this run's --el-n is 10: measure the "
                                  "reference set with the same --el-n")


def test_saved_reference_aucs_and_token_counts_are_checked(world, tmp_path):
    holdout = write_jsonl(tmp_path / "holdout.jsonl", [{"id": f"h{k}", "text": t} for k, t in enumerate(PEOPLE[3:])])
    saved = tmp_path / "R.json"
    result = run("measure", world["forget"], "-m", world["R"], "--holdout", holdout, "--format", "json", "-o", saved,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads(saved.read_text())
    data["summary"]["auc_mink_40"] = 7
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    result = run("measure", world["forget"], "-m", world["M"], "--reference-scores", edited, "--holdout", holdout,
                 "--device", "cpu", "-o", tmp_path / "out.jsonl")
    assert error_line(result) == f"Error: {edited}: summary: 'auc_mink_40' is 7, {SHARE}: {NO_MODEL}"
    data = json.loads(saved.read_text())
    data["records"][0]["tokens"] = True
    edited.write_text(json.dumps(data))
    result = run("measure", world["forget"], "-m", world["M"], "--reference-scores", edited, "--device", "cpu")
    assert error_line(result) == (f'Error: {edited}: record 1: "tokens" is not a number of tokens (at least 2): it '
                                  "must be the output of `neumuter measure` on the same records, in the same order")


def test_the_yardstick_rule_covers_a_reference_model_s_numbers():
    from neumuter_cli import NeumuterError
    from neumuter_cli.results import check_yardstick

    check_yardstick({"ma": 0.0, "el_10": None, "loss": 0.0, "tokens": -1, "auc_loss": 1}, "fine")
    for values, detail in (({"ma": float("nan")}, "'ma' is nan, not a finite number"),
                           ({"loss": float("inf")}, "'loss' is inf, not a finite number"),
                           ({"el_5": True}, "'el_5' is True, not a finite number")):
        with pytest.raises(NeumuterError) as error:
            check_yardstick(values, "reference model R: record p0")
        assert str(error.value) == f"reference model R: record p0: {detail}: {NO_MODEL}"


# ---------------------------------------------------------------- 3. a holdout is not the records

HOLDOUT_WHY = ("a holdout must be texts neither model trained on: scored against the records themselves every "
               "membership AUC is 0.5 and PrivLeak 0, whatever the model remembers")
UNSEEN_WHY = "the thresholds must come from texts the model never saw: the records themselves set the bar at their own mean"


def test_a_holdout_that_is_the_records_is_refused(world, tmp_path):
    """Every AUC 0.5 and PrivLeak 0.0, "leaks like the reference", for the memoriser."""
    forget = world["forget"]
    for extra in ([], ["--reference-model", world["R"]]):
        result = run("measure", forget, "-m", world["M"], "--holdout", forget, *extra, "--device", "cpu")
        assert error_line(result) == f"Error: {forget}: 3 of its 3 texts are records of {forget} (p0, p1, p2): {HOLDOUT_WHY}"
        assert "loading" not in result.stderr
    overlap = write_jsonl(tmp_path / "overlap.jsonl", [{"text": PEOPLE[4]}, {"text": PEOPLE[1]}, {"text": PEOPLE[5]}])
    result = run("measure", forget, "-m", world["M"], "--holdout", overlap, "--device", "cpu")
    assert error_line(result) == f"Error: {overlap}: 1 of its 3 texts are records of {forget} (p1): {HOLDOUT_WHY}"
    # texts that differ only past the --max-length cut are the same text to every score
    longer = write_jsonl(tmp_path / "longer.jsonl", [{"text": t + " And so on."} for t in PEOPLE[:2]])
    result = run("measure", forget, "-m", world["M"], "--holdout", longer, "--max-length", 8, "--device", "cpu")
    assert error_line(result) == (f"Error: {longer}: 2 of its 2 texts are records of {forget} in their first "
                                  f"--max-length tokens (p0, p1): {HOLDOUT_WHY}")
    assert run("measure", forget, "-m", world["M"], "--holdout", longer, "--device", "cpu").exit_code == 0


def test_texts_never_seen_that_are_the_records_are_refused(world, tmp_path):
    forget = world["forget"]
    result = run("measure", forget, "-m", world["M"], "--reference", forget, "--check", "--device", "cpu")
    assert error_line(result) == f"Error: {forget}: 3 of its 3 texts are records of {forget} (p0, p1, p2): {UNSEEN_WHY}"
    nb = write_jsonl(tmp_path / "nb.jsonl", [{"id": "n0", "text": PEOPLE[0], "neighbors": [PEOPLE[5]]}])
    result = run("localize", nb, "-m", world["M"], "--reference", forget, "-o", tmp_path / "mask.st", "--device", "cpu")
    assert error_line(result) == f"Error: {forget}: 1 of its 3 texts are records of {nb} (n0): {UNSEEN_WHY}"
    assert "loading" not in result.stderr


# ---------------------------------------------------------------- 4. trust is per model

EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import {config}, {model}
class EvilConfig({config}):
    model_type = {kind!r}
class EvilModel({model}):
    config_class = EvilConfig
"""


def with_own_code(source, folder, marker, kind="evil_neo", config="GPTNeoConfig", model="GPTNeoForCausalLM",
                  auto="AutoModelForCausalLM"):
    """A copy of the checkpoint ``source`` whose config names code of its own (an unknown model
    type with an auto_map), code that writes ``marker`` when it runs."""
    import shutil

    shutil.copytree(source, folder)
    (folder / "evil_model.py").write_text(EVIL.format(marker=str(marker), config=config, model=model, kind=kind))
    settings = json.loads((folder / "config.json").read_text())
    settings.update(model_type=kind, auto_map={"AutoConfig": "evil_model.EvilConfig", auto: "evil_model.EvilModel"})
    (folder / "config.json").write_text(json.dumps(settings))
    return folder


OWN_CODE = 'runs code of its own to load (its config.json names it in "auto_map")'


@pytest.mark.parametrize("command", ["measure", "localize"])
def test_the_model_s_trust_does_not_run_the_reference_model_s_code(world, tmp_path, command):
    marker = tmp_path / "RAN"
    evil = with_own_code(world["R"], tmp_path / "evil", marker)
    records = world["forget"]
    if command == "localize":
        records = write_jsonl(tmp_path / "nb.jsonl", [{"id": "n0", "text": PEOPLE[0], "neighbors": [PEOPLE[5]]}])
    result = run(command, records, "-m", world["M"], "--reference-model", evil, "--trust-remote-code",
                 "-o", tmp_path / "out", "--device", "cpu")
    assert error_line(result, 2) == (f"Error: reference model {evil} {OWN_CODE}: --trust-remote-code is for --model "
                                     "only; give --trust-remote-code-reference to let it run")
    assert not marker.exists() and not (tmp_path / "out").exists()
    result = run(command, records, "-m", world["M"], "--trust-remote-code-reference", "-o", tmp_path / "out",
                 "--device", "cpu")
    needs = "--reference-model or --base" if command == "localize" else "--reference-model"
    assert error_line(result, 2) == f"Error: --trust-remote-code-reference needs {needs}"


def test_the_reference_model_s_own_flag_runs_its_code(world, tmp_path):
    """In a process of its own: the code lands in transformers' module cache, here a temporary one."""
    marker = tmp_path / "RAN"
    evil = with_own_code(world["R"], tmp_path / "evil", marker)
    done = subprocess.run([sys.executable, "-m", "neumuter_cli", "measure", str(world["forget"]), "-m", str(world["M"]),
                           "--reference-model", str(evil), "--trust-remote-code-reference", "--device", "cpu",
                           "-o", os.devnull], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "ran"


def test_a_masked_lm_with_code_of_its_own_needs_its_own_flag(world, tmp_path):
    from test_neighbors import save_mlm

    save_mlm(tmp_path / "mlm")
    marker = tmp_path / "RAN"
    evil = with_own_code(tmp_path / "mlm", tmp_path / "evil", marker, kind="evil_bert", config="BertConfig",
                         model="BertForMaskedLM", auto="AutoModelForMaskedLM")
    result = run("neighbors", world["forget"], "--mlm", evil, "--device", "cpu", "-o", tmp_path / "nb.jsonl")
    assert error_line(result, 2) == (f"Error: the masked LM {evil} {OWN_CODE}: give --trust-remote-code-mlm to let it "
                                     "run")
    assert not marker.exists()
    # and the model's own code: --trust-remote-code names the model's flag
    model = with_own_code(world["M"], tmp_path / "evil-lm", marker)
    result = run("measure", world["forget"], "-m", model, "--device", "cpu")
    assert error_line(result, 2) == f"Error: {model} {OWN_CODE}: give --trust-remote-code to let it run"
    assert not marker.exists()


# ---------------------------------------------------------------- 6. every option has its effect, or status 2

SEED_LINE = "Error: Invalid value for '--seed': {seed} is not in the range 0<=x<=18446744073709551615."


@pytest.mark.parametrize("command", ["localize", "relearn", "neighbors"])
@pytest.mark.parametrize("seed", [2 ** 64, 99999999999999999999999, -1])
def test_a_seed_out_of_range_is_a_usage_error(world, tmp_path, command, seed):
    """localize and relearn said "internal error: ValueError: Overflow" with status 3; neighbors
    took 2**64. The same range everywhere: what torch's generators take."""
    model = ["--mlm", tmp_path / "no-mlm"] if command == "neighbors" else ["-m", world["M"]]
    result = run(command, world["forget"], *model, "--seed", seed, "-o", tmp_path / "out")
    assert error_line(result, 2) == SEED_LINE.format(seed=seed)
    assert run("localize", world["forget"], "-m", tmp_path / "no-model", "--seed", 2 ** 64 - 1).exit_code == 3


@pytest.mark.parametrize("command,args,line", [
    ("measure", ["--tolerance", "0.3"], "--tolerance needs --reference-model or --reference-scores"),
    ("measure", ["--ppl-stride", "3"], "--ppl-stride needs --ppl"),
    ("measure", ["--ppl-window", "8"], "--ppl-window needs --ppl"),
    ("measure", ["--reference-model", "R", "--allow-over-forgotten"], "--allow-over-forgotten needs --check"),
    ("measure", ["--prefix-tokens", "4"], "--prefix-tokens needs --generations N (N > 0)"),
    ("measure", ["--generations", "0", "--new-tokens", "4"], "--new-tokens needs --generations N (N > 0)"),
    ("localize", ["--tolerance", "0.1"], "--tolerance needs --reference-model or --base"),
    ("localize", ["--reference-limit", "3"], "--reference-limit needs --reference (without --stop-ma)"),
    ("localize", ["--method", "attribution", "--stop-ma", "0.3", "--epochs", "3"],
     "--epochs needs --method gates (the attribution method trains no gates)"),
    ("localize", ["--method", "attribution", "--stop-ma", "0.3", "--no-prune"],
     "--prune/--no-prune needs --method gates (the attribution method trains no gates)"),
    ("localize", ["--score", "specific"], "--score needs --method attribution"),
    ("localize", ["--check-every", "3"],
     "--check-every needs --base, --reference-model, --reference or --stop-ma (no check runs without a stopping point)"),
    ("localize", ["--max-forget-loss", "4"], "--max-forget-loss needs --forget-term bounded"),
    ("localize", ["--forget-term", "ascent", "--margin", "2"], "--margin needs --forget-term hinge"),
    ("neighbors", ["--temperature", "0", "--top-k", "3"],
     "--top-k needs --temperature above 0 (top-k limits sampling; 0 is the argmax)"),
    ("neighbors", ["-k", str(10 ** 12)],
     "Invalid value for '-k' / '--count': 1000000000000 is not in the range 1<=x<=1000."),
])
def test_an_option_without_effect_is_a_usage_error(world, tmp_path, command, args, line):
    """--tolerance without a reference and --ppl-stride without --ppl were silently ignored."""
    args = [str(world["R"]) if a == "R" else a for a in args]
    model = ["--mlm", tmp_path / "no-mlm"] if command == "neighbors" else ["-m", world["M"]]
    result = run(command, world["forget"], *model, *args, "-o", tmp_path / "out", "--device", "cpu")
    assert error_line(result, 2) == f"Error: {line}"
    assert "loading" not in result.stderr


def test_an_el_size_no_text_can_have_is_a_usage_error(world):
    """Found trying more: --el-n 300 with texts cut to 200 tokens measured no EL at all, and a
    verdict came from MA alone."""
    for args in (["--el-n", "10,300"], ["--el-n", "10", "--max-length", "10"]):
        result = run("measure", world["forget"], "-m", world["M"], *args, "--device", "cpu")
        assert error_line(result, 2) == ("Error: --el-n needs a --max-length above each n (EL_n needs a text of more "
                                         "than n tokens)")
        assert "loading" not in result.stderr


def test_numbers_out_of_range_are_usage_errors(world, tmp_path):
    """Found trying more: huge values reached torch ("internal error") or were read as
    "bad input" (status 3)."""
    result = run("measure", world["forget"], "-m", world["M"], "--ppl", world["forget"], "--ppl-stride", 2 ** 64,
                 "--device", "cpu")
    assert error_line(result, 2) == ("Error: --ppl-stride (the perplexity stride) must be between 1 and the window "
                                     "(256), not 18446744073709551616")
    # a step size float32 cannot hold: the training stops as on a loss that is not finite
    nb = write_jsonl(tmp_path / "nb.jsonl", [{"text": PEOPLE[0], "neighbors": [PEOPLE[5]]}])
    result = run("localize", nb, "-m", world["M"], "--lr", "1e300", "--epochs", 1, "--device", "cpu",
                 "-o", tmp_path / "mask.st")
    assert error_line(result) == ("Error: epoch 1: the update overflows the float32 weights (a step larger than "
                                  "3.40282e+38); try a smaller --lr or --dtype float32")
    result = run("relearn", world["forget"], "-m", world["M"], "--lr", "3e38", "--steps", 1, "-o", tmp_path / "rl",
                 "--device", "cpu")
    assert error_line(result) == ("Error: step 1: the update overflows the float32 weights (a step larger than "
                                  "3.40282e+38); try a smaller --lr or --dtype float32")
    assert os.listdir(tmp_path) == ["nb.jsonl"]
    result = run("relearn", world["forget"], "-m", world["M"], "--batch-size", 2 ** 64, "-o", tmp_path / "rl",
                 "--device", "cpu")
    assert error_line(result, 2) == ("Error: --batch-size must be at most 65,536 texts (one step computes them at "
                                     "once), not 18446744073709551616")
    assert "loading" not in result.stderr


def test_relearn_steps_are_taken_one_at_a_time():
    """relearn --steps 2**64 built every step's batch before the first: memory grew until killed."""
    from neumuter_cli.relearn import batches, data_order

    assert next(batches(3, 2 ** 64, 4, seed=0)) == data_order(3, 1, 4, seed=0)[0]
    assert list(batches(5, 4, 3, seed=1)) == data_order(5, 4, 3, seed=1)


def test_broken_inputs_that_were_internal_errors(world, tmp_path):
    """A masked LM stored as a pickle torch refuses to unpickle, and a scales file whose metadata
    says layers: 5, said "internal error"."""
    import pickle
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from test_neighbors import save_mlm

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    save_mlm(tmp_path / "mlm")
    os.remove(tmp_path / "mlm" / "model.safetensors")
    (tmp_path / "mlm" / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    result = run("neighbors", world["forget"], "--mlm", tmp_path / "mlm", "--device", "cpu")
    line = error_line(result)
    assert line.startswith(f"Error: cannot load the masked LM {tmp_path / 'mlm'}: Weights only load failed.")
    assert "pwned" not in result.output
    with safe_open(str(world["scales"]), "pt") as handle:
        metadata = handle.metadata()
    scales = tmp_path / "scales.st"
    save_file(load_file(world["scales"]), scales, metadata={**metadata, "layers": "5"})
    result = run("apply", scales, "-m", world["M"], "-o", tmp_path / "out", "--device", "cpu")
    assert error_line(result) == f'Error: {scales}: metadata "layers" is not a list of block numbers'
    shutil.rmtree(tmp_path / "mlm")


def test_sampling_never_draws_from_non_finite_numbers(world, tmp_path):
    """A temperature so small that the logits divided by it overflow gave a softmax of NaN, and
    an arbitrary token, without a word."""
    from test_neighbors import save_mlm

    save_mlm(tmp_path / "mlm")
    result = run("neighbors", world["forget"], "--mlm", tmp_path / "mlm", "--temperature", "1e-320", "--device",
                 "cpu", "-o", tmp_path / "nb.jsonl")
    assert error_line(result, 2) == ("Error: --temperature 9.99989e-321 is so small that the logits divided by it "
                                     "overflow: give a larger one, or 0 for the argmax")
    assert not (tmp_path / "nb.jsonl").exists()


# ---------------------------------------------------------------- 7. every reader has a bound

def test_a_line_without_end_is_refused_at_the_bound(world):
    """measure /dev/zero grew memory until killed."""
    result = run("measure", "/dev/zero", "-m", world["M"], "--device", "cpu")
    assert error_line(result) == "Error: /dev/zero:1: a line longer than 64 Mi characters (a JSONL line holds one record)"


@pytest.mark.parametrize("args", [
    ["measure", "{forget}", "-m", "{M}", "--thresholds", "/dev/zero"],
    ["measure", "{forget}", "-m", "{M}", "--reference-scores", "/dev/zero"],
    ["select", "/dev/zero"],
    ["apply", "/dev/zero", "-m", "{M}", "-o", "{tmp}/out"],
])
def test_a_file_without_end_is_refused_at_the_bound(world, tmp_path, args):
    args = [a.format(forget=world["forget"], M=world["M"], tmp=tmp_path) for a in args]
    result = run(*args, "--device", "cpu") if args[0] != "select" else run(*args, "-o", tmp_path / "s.st")
    assert error_line(result) == "Error: /dev/zero: larger than 256 MiB, the most neumuter reads of such a file"
    assert os.listdir(tmp_path) == []


def test_neighbours_are_bounded_by_count_and_size(world, tmp_path):
    from test_neighbors import save_mlm

    from transformers import AutoTokenizer

    save_mlm(tmp_path / "mlm")
    text = " ".join(["alice"] * 5000)
    tokens = len(AutoTokenizer.from_pretrained(tmp_path / "mlm").tokenize(text))   # the tokenizer is trained anew
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": text}])
    result = run("neighbors", long, "--mlm", tmp_path / "mlm", "-k", 1000, "--device", "cpu")
    assert error_line(result, 2) == (f"Error: --count 1000: record 1 has {tokens:,} tokens for the masked LM, and 1000 "
                                     f"neighbours of it would hold {tokens * 1000:,} tokens at once (at most "
                                     "4,194,304): give fewer neighbours or cut the text")
    assert tokens * 1000 > 4194304


def test_a_named_pipe_in_an_output_folder_does_not_block(world, tmp_path):
    """Found trying more: a neumuter.json that is a named pipe blocked `apply --force` forever."""
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "neumuter.json")
    result = run("apply", world["scales"], "-m", world["M"], "-o", out, "--force", "--device", "cpu")
    assert error_line(result) == (f"Error: {out} exists and is not empty, and is not a neumuter checkpoint (it has no "
                                  "readable neumuter.json); --force only replaces a previous checkpoint: give a new "
                                  "folder")


# ---------------------------------------------------------------- 5. user data reaches stderr escaped

HOSTILE_ID = "x\nError: all good, exit 0\x1b[2K\x1b]0;pwned\x07"
SHOWN_ID = r"x\nError: all good, exit 0\x1b[2K\x1b]0;pwned\x07"


def test_a_record_id_reaches_the_terminal_escaped(world, tmp_path):
    records = write_jsonl(tmp_path / "ids.jsonl", [{"id": HOSTILE_ID, "text": PEOPLE[0]}])
    result = run("measure", records, "-m", world["M"], "--reference-model", world["R"], "--check", "-o",
                 tmp_path / "out.jsonl", "--device", "cpu")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == f"check failed: 1 of 1 records are not forgotten ({SHOWN_ID})"
    assert not raw_controls(result.stderr) and "\nError: all good" not in result.stderr
    # in the table too, and in an error line
    result = run("measure", records, "-m", world["M"], "--format", "table", "--device", "cpu")
    assert result.exit_code == 0 and SHOWN_ID in result.stdout and not raw_controls(result.stdout)
    short = write_jsonl(tmp_path / "short.jsonl", [{"id": HOSTILE_ID, "text": "A"}])
    result = run("measure", short, "-m", world["M"], "--device", "cpu")
    assert error_line(result) == (f"Error: {short}: record {SHOWN_ID} has 1 token(s); at least 2 are needed to "
                                  "measure it")


def test_paths_and_texts_reach_the_terminal_escaped(world, tmp_path):
    path = tmp_path / "a\nError: fake\x1b]0;t\x07\u202e.jsonl"
    shown = str(tmp_path) + r"/a\nError: fake\x1b]0;t\x07\u202e.jsonl"
    result = run("measure", path, "-m", world["M"], "--device", "cpu")
    assert error_line(result) == f"Error: cannot read {shown}: No such file or directory"
    write_jsonl(path, [{"id": "p0", "text": PEOPLE[0]}])
    result = run("measure", path, "-m", world["M"], "--device", "cpu", "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 0 and f"measuring 1 records of {shown} (" in result.stderr
    assert not raw_controls(result.stderr)
    # a model path, in the progress lines and in the error line of a model that is not there
    model = tmp_path / "m\rodel\x1b[31m"
    result = run("measure", path, "-m", model, "--device", "cpu")
    assert error_line(result) == rf"Error: model not found: {tmp_path}/m\rodel\x1b[31m"
    # a text, in relearn's message about a text too short to learn from
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "\x1b"}])
    result = run("relearn", short, "-m", world["M"], "-o", tmp_path / "rl", "--device", "cpu")
    assert error_line(result) == r"Error: text '\x1b' has fewer than 2 tokens: nothing to learn from"


# ---------------------------------------------------------------- 8. leftovers of a killed run

def test_temporaries_a_killed_run_left_are_named_on_the_next_run(world, tmp_path):
    """A SIGKILL while `apply` writes leaves .OUT.*.tmp; the next run names it (and does not
    remove it: another run may still be writing it)."""
    muted = tmp_path / "muted"
    code = ("import os, signal, sys\nfrom neumuter_cli.records import atomic_directory\n"
            "with atomic_directory(sys.argv[1]) as tmp:\n    (tmp / 'config.json').write_text('{}')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", code, str(muted)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert killed.returncode == -9
    [left] = os.listdir(tmp_path)
    assert left.startswith(".muted.") and left.endswith(".tmp")
    result = run("--quiet", "apply", world["scales"], "-m", world["M"], "-o", muted, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"warning: {tmp_path / left} was left by an earlier run that was killed while it wrote {muted} (a folder it "
        "was writing); neumuter does not remove it: remove it"]
    assert sorted(os.listdir(tmp_path)) == sorted([left, "muted"])
    # a folder moved aside to be replaced: it holds the previous checkpoint
    old = Path(tempfile.mkdtemp(prefix=".muted.", suffix=".old", dir=tmp_path))
    out = tmp_path / "out.jsonl"
    stale = Path(tempfile.mkstemp(prefix=".out.jsonl.", suffix=".tmp", dir=tmp_path)[1])
    result = run("measure", world["forget"], "-m", world["M"], "-o", out, "--device", "cpu", "--quiet")
    assert result.stderr.splitlines() == [
        f"warning: {stale} was left by an earlier run that was killed while it wrote {out} (a file it was writing); "
        "neumuter does not remove it: remove it"]
    result = run("--quiet", "apply", world["scales"], "-m", world["M"], "-o", muted, "--force", "--device", "cpu")
    assert result.exit_code == 0
    assert (f"warning: {old} was left by an earlier run that was killed while it replaced {muted}: it holds what "
            f"{muted} held before; move it back if {muted} is missing, else remove it") in result.stderr.splitlines()
    assert len(result.stderr.splitlines()) == 2
