"""The command line starts instantly: --help, --version and shell completion load neither torch
nor transformers (seconds of imports), and `python -m neumuter_cli` is the `neumuter` command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers")

# every --help, --version and a completion, in one fresh interpreter; prints what each wrote and
# which heavy modules were imported by the end
PROBE = r"""
import contextlib, io, json, os, sys
from neumuter_cli.cli import cli

def run(args, env=None):
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # completion writes bytes to stdout.buffer
    os.environ.update(env or {})
    with contextlib.redirect_stdout(out):
        try:
            cli.main(args, prog_name="neumuter")
        except SystemExit:
            pass
    for key in env or {}:
        del os.environ[key]
    out.flush()
    return out.buffer.getvalue().decode("utf-8")

outputs = {"--help": run(["--help"]), "--version": run(["--version"])}
for name in sorted(cli.commands):
    outputs[name + " --help"] = run([name, "--help"])
outputs["complete"] = run([], {"_NEUMUTER_COMPLETE": "bash_complete", "COMP_WORDS": "neumuter localize --e",
                               "COMP_CWORD": "2"})
outputs["commands"] = sorted(cli.commands)
print(json.dumps({"outputs": outputs, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def run_python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120, **kwargs)


def test_help_version_and_completion_import_neither_torch_nor_transformers():
    result = run_python("-c", PROBE)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    outputs = report["outputs"]
    assert report["heavy"] == []
    assert {"neighbors", "localize", "select", "apply", "measure", "inspect"} <= set(outputs["commands"])
    assert "Usage: neumuter [OPTIONS] COMMAND" in outputs["--help"]
    assert "neumuter, version" in outputs["--version"]
    for name in outputs["commands"]:
        assert f"Usage: neumuter {name}" in outputs[name + " --help"], name
    assert "--epochs" in outputs["complete"] and "--eta" in outputs["complete"]


def test_python_dash_m_is_the_neumuter_command(tmp_path):
    helped = run_python("-m", "neumuter_cli", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "Usage: neumuter [OPTIONS] COMMAND" in helped.stdout
    # a real command, with an error: one line, exit status 1
    missing = run_python("-m", "neumuter_cli", "select", str(tmp_path / "no-such-mask.safetensors"), "-o",
                         str(tmp_path / "scales.safetensors"))
    assert missing.returncode == 3
    assert missing.stderr.startswith("Error: ") and "no-such-mask" in missing.stderr
    assert not (tmp_path / "scales.safetensors").exists()
