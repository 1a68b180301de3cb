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


def test_the_readme_is_a_product_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200, "the long sections belong in docs/"
    for page in ("docs/usage.md", "docs/method.md", "docs/results.md"):
        assert f"]({page}" in readme and (ROOT / page).is_file(), page


def test_every_figure_names_the_command_that_makes_it():
    """Each image in the README and docs/ is followed, within a few lines, by the benchmark
    command that draws it (its --plot is that very file)."""
    figures = 0
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        lines = page.read_text(encoding="utf-8").splitlines()
        for k, line in enumerate(lines):
            for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", line):
                figures += 1
                path = (page.parent / target).resolve().relative_to(ROOT).as_posix()
                after = " ".join(part.lstrip("> ").rstrip("\\") for part in lines[k + 1:k + 16])
                assert re.search(rf"python benchmarks/\w+\.py .*--plot {re.escape(path)}\b", after), (page.name, path)
    assert figures >= 2                                  # the README's results figure, and in docs/results.md
