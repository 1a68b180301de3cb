"""Progress: a tqdm bar (rate, time left) when stderr is a terminal, the stage's log lines when
it is not, nothing with --quiet (on the group or on the command) but warnings. One helper,
neumuter_cli.progress, behind every stage."""
import io
import json
import re

import pytest
from click.testing import CliRunner

from helpers import PEOPLE, train_memorizer
from neumuter_cli.cli import cli
from neumuter_cli.localize import smallest_passing_set
from neumuter_cli.measure import encode, teacher_forced
from neumuter_cli.models import load_model
from neumuter_cli.progress import Reporter, steps, throttled
from neumuter_cli.relearn import RelearnConfig, relearn

BAR = re.compile(r"100%\|.*\| (\d+)/\1 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(s/)?\w+(/s)?")   # 100%|###| 6/6 [00:00<00:00, 9.1it/s]


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


RECORDS = [{"id": f"p{k}", "text": text} for k, text in enumerate(PEOPLE)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm")
    train_memorizer(path, steps=10)
    return str(path)


@pytest.fixture(scope="module")
def records_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "people.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return str(path)


# ---------------------------------------------------------------- the helper

def test_a_terminal_gets_a_bar_with_rate_and_time_left_and_lines_above_it():
    terminal = FakeTerminal()
    report = Reporter(stream=terminal)
    assert report.bars
    with steps(report, 6, "teacher-forced", "text") as tracker:
        for k in range(3):
            tracker.advance(2, f"teacher-forced: {2 * k + 2}/6 texts", note=f"batch {k}")
            report("  a check: 0 of 6 above")
    out = terminal.getvalue()
    assert "teacher-forced: 100%|" in out and BAR.search(out), out
    assert "text/s" in out and "batch 2" in out
    assert "  a check: 0 of 6 above\n" in out
    assert "teacher-forced: 2/6 texts" not in out            # the bar replaces the log lines
    assert report._bars == []


def test_not_a_terminal_gets_the_lines_and_quiet_gets_nothing_but_warnings():
    for quiet, expected in ((False, "step 1\nstep 2\nloaded\nwarning: careful\n"), (True, "warning: careful\n")):
        stream = io.StringIO()
        report = Reporter(quiet=quiet, stream=stream)
        assert not report.bars
        with steps(report, 2, "relearn") as tracker:
            tracker.advance(1, "step 1", note="loss 1")
            tracker.advance(1, "step 2", note="loss 0.5")
        report("loaded")
        report("warning: careful")
        assert stream.getvalue() == expected


def test_quiet_on_a_terminal_draws_no_bar():
    terminal = FakeTerminal()
    report = Reporter(quiet=True, stream=terminal)
    with steps(report, 3, "x") as tracker:
        tracker.advance(3, "line")
    assert not report.bars and terminal.getvalue() == ""


def test_an_early_stop_ends_the_bar_full_and_an_error_leaves_no_bar_open():
    terminal = FakeTerminal()
    report = Reporter(stream=terminal)
    tracker = steps(report, 100, "localize", "step")
    tracker.advance(40)
    tracker.done(40)
    tracker.close()
    assert "40/40" in terminal.getvalue() and "/100" not in terminal.getvalue().split("\r")[-1]
    steps(report, 10, "cut short").advance(3)      # never closed: the loop raised
    report.close()
    assert report._bars == [] and terminal.getvalue().endswith("\n")


def test_throttled_lines_keep_the_bars():
    stream = io.StringIO()
    lines = throttled(Reporter(stream=stream), every=3600)
    lines("first")
    lines("second")                                 # within the hour: dropped
    assert stream.getvalue() == "first\n"
    terminal = FakeTerminal()
    inner = throttled(Reporter(stream=terminal), every=3600)
    with steps(inner, 2, "greedy generation", "continuation") as tracker:
        tracker.advance(2)
    assert BAR.search(terminal.getvalue())
    plain = []
    say = throttled(plain.append, every=3600)
    say("a")
    say("b")
    assert plain == ["a"]


# ---------------------------------------------------------------- the stages use it

def test_teacher_forced_and_relearn_draw_bars_on_a_terminal(model_dir):
    model, tokenizer = load_model(model_dir, device="cpu")
    terminal = FakeTerminal()
    teacher_forced(model, encode(tokenizer, PEOPLE), batch_size=2, progress=Reporter(stream=terminal))
    assert "teacher-forced: 100%|" in terminal.getvalue() and f"{len(PEOPLE)}/{len(PEOPLE)}" in terminal.getvalue()
    lines = []
    teacher_forced(model, encode(tokenizer, PEOPLE), batch_size=2, progress=lines.append)
    assert lines == [f"teacher-forced: {min(n, len(PEOPLE))}/{len(PEOPLE)} texts" for n in range(2, len(PEOPLE) + 2, 2)]

    terminal = FakeTerminal()
    relearn(model, tokenizer, RECORDS, RelearnConfig(steps=3, batch_size=2, lr=1e-4), progress=Reporter(stream=terminal))
    out = terminal.getvalue()
    assert "relearn: 100%|" in out and "3/3" in out and ("step/s" in out or "s/step" in out)
    assert "loss " in out and "step    1/3" not in out


def test_pruning_probes_are_a_bar_whose_total_is_the_probes_made():
    import torch

    trained = {0: torch.linspace(-6, 1, 200)}
    terminal = FakeTerminal()
    calls = []

    def check(gates):
        calls.append(1)
        return int((gates[0] < 1).sum()) >= 37

    smallest_passing_set(trained, check, progress=Reporter(stream=terminal))
    assert f"{len(calls)}/{len(calls)}" in terminal.getvalue().split("\r")[-1]


# ---------------------------------------------------------------- the commands

def relearn_args(model_dir, records_file, out):
    return ["relearn", records_file, "-m", model_dir, "--device", "cpu", "--steps", "2", "-o", str(out)]


def test_relearn_lines_when_stderr_is_not_a_terminal(model_dir, records_file, tmp_path):
    result = CliRunner().invoke(cli, relearn_args(model_dir, records_file, tmp_path / "a"))
    assert result.exit_code == 0, result.output
    assert re.search(r"^step    1/2  loss \d+\.\d{4}  \(\d+\.\ds\)$", result.stderr, re.M), result.stderr
    assert "%|" not in result.stderr


@pytest.mark.parametrize("where", ["command", "group"])
def test_quiet_silences_progress(where, model_dir, records_file, tmp_path):
    args = relearn_args(model_dir, records_file, tmp_path / "b")
    args = args + ["--quiet"] if where == "command" else ["--quiet"] + args
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and (tmp_path / "b" / "neumuter.json").exists()


def test_quiet_measure_keeps_the_data_and_drops_the_summary(model_dir, records_file):
    result = CliRunner().invoke(cli, ["measure", records_file, "-m", model_dir, "--device", "cpu", "--el-n", "0",
                                      "-q"])
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and len(result.stdout.splitlines()) == len(RECORDS)


def test_a_terminal_gets_bars_from_the_commands(model_dir, records_file, tmp_path, monkeypatch):
    monkeypatch.setattr(Reporter, "bars", property(lambda self: not self.quiet))   # stderr "is" a terminal
    result = CliRunner().invoke(cli, relearn_args(model_dir, records_file, tmp_path / "c"))
    assert result.exit_code == 0, result.output
    assert "relearn: 100%|" in result.stderr and "2/2" in result.stderr
    assert "step    1/2" not in result.stderr
    assert result.stderr.startswith(f"loading {model_dir}\n")          # one-off lines stay lines
    result = CliRunner().invoke(cli, ["measure", records_file, "-m", model_dir, "--device", "cpu", "--el-n", "0",
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    assert "teacher-forced: 100%|" in result.stderr and json.loads(result.stdout)["summary"]["records"] == len(RECORDS)
    result = CliRunner().invoke(cli, relearn_args(model_dir, records_file, tmp_path / "d") + ["-q"])
    assert result.exit_code == 0 and result.stderr == ""


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    from test_neighbors import save_mlm

    return str(save_mlm(tmp_path_factory.mktemp("mlm")))


@pytest.fixture(scope="module")
def neighbours_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("nb") / "nb.jsonl"
    path.write_text("".join(json.dumps({**r, "neighbors": [PEOPLE[-1 - k]]}) + "\n" for k, r in enumerate(RECORDS[:3])))
    return str(path)


def stage_args(stage, model_dir, records_file, neighbours_file, mlm_dir, out):
    if stage == "neighbors":
        return ["neighbors", records_file, "--mlm", mlm_dir, "--device", "cpu", "--batch-size", "2", "-o", str(out)]
    return ["localize", neighbours_file, "-m", model_dir, "--device", "cpu", "--epochs", "2", "--batch-size", "1",
            "-o", str(out)]


@pytest.mark.parametrize("stage, line, bar", [
    ("neighbors", r"^neighbors: \d+ records done", f"neighbors: 100%|.*{len(RECORDS)}/{len(RECORDS)}"),
    ("localize", r"^epoch   2  forget CE", r"localize: 100%\|.*6/6"),        # 2 epochs x 3 batches of 1
])
def test_neighbors_and_localize_lines_bars_and_quiet(stage, line, bar, model_dir, records_file, neighbours_file,
                                                      mlm_dir, tmp_path, monkeypatch):
    def args(name):
        return stage_args(stage, model_dir, records_file, neighbours_file, mlm_dir, tmp_path / name)

    result = CliRunner().invoke(cli, args("lines"))
    assert result.exit_code == 0, result.output
    assert re.search(line, result.stderr, re.M) and "%|" not in result.stderr, result.stderr
    result = CliRunner().invoke(cli, ["-q", *args("quiet")])
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    monkeypatch.setattr(Reporter, "bars", property(lambda self: not self.quiet))
    result = CliRunner().invoke(cli, args("bar"))
    assert result.exit_code == 0, result.output
    assert re.search(bar, result.stderr) and not re.search(line, result.stderr, re.M), result.stderr
    assert (tmp_path / "lines").read_bytes() == (tmp_path / "quiet").read_bytes() == (tmp_path / "bar").read_bytes()
