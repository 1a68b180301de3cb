"""The README's "Try it" commands are what a newcomer runs first: the set-up must install what
the test command needs, and CI must run that very test command."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def try_it_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Try it", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_the_first_command_sets_up_everything_the_second_needs():
    setup, tests = try_it_commands()
    assert "pip install -e '.[test]'" in setup and "make -C examples" in setup
    assert tests.startswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    _, tests = try_it_commands()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert tests in ci
    assert "pip install --quiet -e '.[test]'" in ci
