"""The demo (`make -C examples`) runs the path the README recommends, and its targets follow the
variables they use. Checked with `make -n` and the stamp rule alone: no model is trained here."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*args: str) -> str:
    run = subprocess.run(["make", "--no-print-directory", "-C", str(EXAMPLES), *args], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


def commands(work: Path) -> list[str]:
    """The demo's neumuter command lines, as `make -n` would run them (continuations joined)."""
    text = make("-n", f"WORK={work}", "NEUMUTER=neumuter").replace("\\\n", " ")
    return [" ".join(line.split()) for line in text.splitlines() if line.startswith("neumuter ")]


def test_the_demo_runs_the_recommended_path(tmp_path):
    lines = commands(tmp_path / "work")
    stages = [line.split()[1] for line in lines]
    for stage in ("inspect", "neighbors", "localize", "select", "apply", "measure", "relearn", "quantize"):
        assert stage in stages, stage
    localize = next(line for line in lines if line.startswith("neumuter localize"))
    assert "--reference-model" in localize or "--base" in localize
    gone = [line for line in lines if line.startswith("neumuter measure") and "--holdout" in line]
    assert gone and all(flag in gone[0] for flag in ("--reference-model", "--plot", "--check"))
    assert stages.count("relearn") == 2 and stages.count("quantize") == 2      # the muted LM and the base model


def test_rollback_is_one_variable(tmp_path):
    work = tmp_path / "work"
    lines = [line for line in commands(work) if line.startswith(("neumuter localize", "neumuter apply"))]
    assert len(lines) == 2 and all(f"--base {work}/base" in line for line in lines)      # the default
    text = make("-n", f"WORK={work}", "NEUMUTER=neumuter", "ROLLBACK=0").replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.startswith(("neumuter localize", "neumuter apply"))]
    assert all("--base" not in line for line in lines) and "--reference-model" in lines[0]


def test_a_variable_stamp_changes_only_with_the_value(tmp_path):
    work = tmp_path / "work"
    stamp = work / "opts" / "LOCALIZE_OPTS"
    make(f"WORK={work}", f"{stamp}", "LOCALIZE_OPTS=--epochs 3")
    assert stamp.read_text() == "--epochs 3\n"
    os.utime(stamp, (1, 1))
    make(f"WORK={work}", f"{stamp}", "LOCALIZE_OPTS=--epochs 3")
    assert stamp.stat().st_mtime == 1                        # the same value: the mask stays up to date
    make(f"WORK={work}", f"{stamp}", "LOCALIZE_OPTS=--epochs 4 --margin 'x'")
    assert stamp.read_text() == "--epochs 4 --margin 'x'\n" and stamp.stat().st_mtime > 1


def test_every_target_that_runs_a_stage_depends_on_its_options():
    text = (EXAMPLES / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    rules = {}
    for line in text.splitlines():
        if line.startswith("$(WORK)/") and ":" in line and "=" not in line.split(":")[0]:
            target, _, prerequisites = line.partition(": ")
            rules[target] = prerequisites
    assert "$(OPTS)/LOCALIZE_OPTS" in rules["$(WORK)/mask.safetensors"]
    assert "$(OPTS)/LOCALIZE_BASE" in rules["$(WORK)/mask.safetensors"]
    assert "$(OPTS)/SELECT_OPTS" in rules["$(WORK)/scales.safetensors"]
    assert "$(OPTS)/RELEARN_OPTS" in rules["$(WORK)/relearn.json"]
    assert "$(OPTS)/QUANT_TYPE" in rules["$(WORK)/quantized.json"]


def test_help_names_every_variable():
    text = make("help")
    for name in ("WORK", "LOCALIZE_OPTS", "LOCALIZE_BASE", "RELEARN_OPTS", "QUANT_TYPE", "KEEP"):
        assert f"  {name} " in text, name
