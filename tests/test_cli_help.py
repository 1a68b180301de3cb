"""One convention for every command's --help, checked by walking them all: -q/--quiet everywhere
(and accepted after the command), defaults printed readably, one metavar style, and the long
option lists of localize and measure under headings."""
import re

import click
import pytest
from click.testing import CliRunner

from neumuter_cli.cli import CLICK_METAVARS, cli
from neumuter_cli.config import LocalizeConfig

ROOT = click.Context(cli, info_name="neumuter", **cli.context_settings)
COMMANDS = sorted(cli.commands)
# an upper-case word naming the value (N, X, DIR, NAME_OR_PATH, SPEC), with a file extension
# (UNSEEN.jsonl), "|-" for stdin/stdout, or a list (N[,N..], DEVICE=SIZE[,..]); or click's
# [a|b|c] for a choice
METAVAR = re.compile(r"[A-Z][A-Z_]*(\.[a-z]+)?(\|-|\[,N\.\.\]|=[A-Z]+\[,\.\.\])?|\[[a-z0-9_|-]+\]")


def help_text(*args: str) -> str:
    result = CliRunner().invoke(cli, [*args, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def value_options(name: str):
    command = cli.commands[name]
    ctx = click.Context(command, info_name=name, parent=ROOT)
    for param in command.get_params(ctx):
        if isinstance(param, click.Option) and not param.is_flag and not param.hidden:
            yield param, param.make_metavar(ctx)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_takes_quiet_after_its_name(name):
    text = help_text(name, "-q")                     # parsed, not refused
    assert re.search(r"^\s+-q, --quiet\b", text, re.M), name


def test_the_group_takes_quiet_before_the_command():
    assert re.search(r"^\s+-q, --quiet\b", help_text(), re.M)
    for name in COMMANDS:
        help_text("-q", name)


@pytest.mark.parametrize("name", [None, *COMMANDS])
def test_no_default_is_printed_with_more_than_four_significant_digits(name):
    text = " ".join(help_text(*([name] if name else [])).split())
    for default in re.findall(r"\[default: ([^\];]+)", text):
        for number in re.findall(r"\d+\.\d+(?:e[-+]?\d+)?|\d+e[-+]?\d+", default):
            mantissa = number.split("e")[0].replace(".", "").lstrip("0")
            assert len(mantissa) <= 4, (name, default)


@pytest.mark.parametrize("name", COMMANDS)
def test_one_metavar_style(name):
    for param, metavar in value_options(name):
        assert metavar not in CLICK_METAVARS and METAVAR.fullmatch(metavar), (name, param.name, metavar)


def test_numbers_are_n_or_x_unless_the_help_names_their_letter():
    metavars = {(name, param.name): metavar for name in COMMANDS for param, metavar in value_options(name)}
    assert metavars[("localize", "epochs")] == metavars[("neighbors", "batch_size")] == "N"
    assert metavars[("localize", "lr")] == metavars[("relearn", "lr")] == "X"
    assert metavars[("localize", "seed")] == metavars[("relearn", "seed")] == "N"


@pytest.mark.parametrize("name", ["localize", "measure"])
def test_the_long_option_lists_come_under_headings(name):
    command = cli.commands[name]
    sections = command.option_sections(click.Context(command, info_name=name, parent=ROOT))
    headings = [heading for heading, _ in sections]
    assert len(headings) >= 4 and "Other options" not in headings, headings
    assert headings[-1] == "General"
    text = help_text(name)
    assert "\nOptions:" not in text
    for heading in headings:
        assert f"\n{heading}:\n" in text


def test_the_help_says_what_the_code_does():
    localize = " ".join(help_text("localize").split())
    assert "[default: specific-smoothed]" in localize and LocalizeConfig().score == "specific-smoothed"
    assert "-dCE/ds at s = 1 and keep" not in localize            # --method no longer speaks for --score
    assert "[default: 1/3; x>0]" in localize
    relearn = " ".join(help_text("relearn").split())
    assert "exists and is not empty" not in relearn and "previous neumuter checkpoint" in relearn
