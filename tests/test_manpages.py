"""Man pages: the committed man/ pages are what the generator makes from the --help texts now,
one page per command; roff escaping; click's \\b paragraphs; groff renders them (when present)."""
import shutil
import subprocess
from pathlib import Path

import click
import pytest

from neumuter_cli import manpages
from neumuter_cli.cli import cli

MAN_DIR = Path(__file__).resolve().parents[1] / "man"
REGENERATE = "python -m neumuter_cli.manpages man/"


@pytest.fixture(scope="module")
def pages():
    return manpages.generate()


def test_committed_pages_match_the_help_texts(pages):
    found = manpages.differences(MAN_DIR, pages)
    if found:
        pytest.fail("the man pages are out of date with the --help texts:\n  " + "\n  ".join(found)
                    + f"\nregenerate them (from the repository root): {REGENERATE}", pytrace=False)


def test_one_page_per_registered_command(pages):
    assert set(pages) == {"neumuter.1"} | {f"neumuter-{name}.1" for name in cli.commands}
    top = pages["neumuter.1"]
    for name in cli.commands:
        assert rf"\fB\%neumuter\-{name}\fR(1)" in top          # in COMMANDS and SEE ALSO
        assert f".TH NEUMUTER\\-{name.upper()} 1 " in pages[f"neumuter-{name}.1"]


def test_every_option_and_its_help_is_on_its_page(pages):
    root = click.Context(cli, info_name="neumuter", **cli.context_settings)
    for name, command in cli.commands.items():
        page = pages[f"neumuter-{name}.1"]
        ctx = click.Context(command, info_name=name, parent=root)
        assert rf"\fBneumuter {name}\fR " + manpages.escape(" ".join(command.collect_usage_pieces(ctx))) in page
        for param in command.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is None:
                continue
            for opt in param.opts:
                assert manpages.bold(opt) in page, (name, opt)
            words = " ".join(record[1].split())
            assert manpages.escape(words) in page, (name, param.name)


def test_escape_roff_specials():
    assert manpages.escape(".hidden") == r"\&.hidden"
    assert manpages.escape("'quoted") == r"\(aqquoted"
    assert manpages.escape(r"a\b") == r"a\eb"
    assert manpages.escape("--model x-y") == r"\-\-model x\-y"
    assert manpages.escape("`inspect`") == r"\(gainspect\(ga"
    assert manpages.escape("mid.dle") == "mid.dle"


def _toy():
    @click.command()
    @click.option("--mode", type=click.Choice(["fast", "slow"]), default="fast", show_default=True,
                  help="How to go.\n\n.starts with a dot")
    @click.option("--path", "-p", metavar="FILE|-", required=True, help=r"C:\dir or -.")
    @click.option("--hidden-one", hidden=True, help="not shown")
    def toy(mode, path, hidden_one):
        """Do a toy thing.

        A filled paragraph
        over two lines.

        \b
          keep   this
            layout
        .dot line

        'quote line.
        \f
        Not for --help.
        """
    return toy


def test_page_structure_of_a_toy_command():
    toy = _toy()
    ctx = click.Context(toy, info_name="toy", parent=click.Context(click.Group("neumuter"), info_name="neumuter"))
    page = manpages.render_page(toy, ctx, ["neumuter"]).splitlines()
    assert page[page.index(".SH NAME") + 1] == r"neumuter\-toy \- Do a toy thing"
    assert r"\fBneumuter toy\fR [OPTIONS]" in page
    desc = page[page.index(".SH DESCRIPTION"):page.index(".SH OPTIONS")]
    assert "A filled paragraph over two lines." in desc
    start = desc.index(".nf")
    assert desc[start:start + 5] == [".nf", "  keep   this", "    layout", r"\&.dot line", ".fi"]
    assert r"\(aqquote line." in desc
    assert not any("Not for" in line for line in page)                     # cut at \f, as --help does
    options = page[page.index(".SH OPTIONS"):page.index(".SH SEE ALSO")]
    assert r"\fB\-\-mode\fR \fI[fast|slow]\fR" in options
    assert "How to go." in options and r"\&.starts with a dot [default: fast]" in options
    assert r"\fB\-p\fR, \fB\-\-path\fR \fIFILE|\-\fR" in options
    assert r"C:\edir or \-. [required]" in options
    assert not any("hidden" in line for line in options)
    assert page[-1] == r"\fB\%neumuter\fR(1)"
    assert not any(line.startswith(("'", ".\\&")) for line in page)


def test_write_check_and_stale_pages(tmp_path, capsys):
    assert manpages.main([str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(manpages.generate())                             # no temp files left
    assert manpages.main(["--check", str(tmp_path)]) == 0
    page = tmp_path / "neumuter-select.1"
    page.write_text(page.read_text().replace("Choose", "Pick"))
    (tmp_path / "neumuter-gone.1").write_text(".TH GONE 1\n")
    capsys.readouterr()
    assert manpages.main(["--check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "neumuter-select.1: differs" in err and "neumuter-gone.1: no such command" in err
    assert f"python -m neumuter_cli.manpages {tmp_path}" in err
    assert manpages.main([str(tmp_path)]) == 0
    assert not (tmp_path / "neumuter-gone.1").exists()
    assert manpages.differences(tmp_path) == []
    assert manpages.main([str(tmp_path / "missing")]) == 1


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_groff_renders_the_pages_without_warnings(pages, tmp_path):
    rendered = {}
    for name, text in pages.items():
        run = subprocess.run(["groff", "-man", "-Tascii", "-P-cbou", "-ww", "-rLL=200n"], input=text,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and run.stderr == "", (name, run.stderr)
        rendered[name] = run.stdout
    top = rendered["neumuter.1"]
    assert "neumuter localize nb.jsonl --model LM --base BASE > mask.safetensors" in top   # \b block, '-' as typed
    assert "Data goes to stdout or -o; progress and summaries go to stderr." in top
    assert "neumuter-select(1)" in top
    toy = _toy()
    ctx = click.Context(toy, info_name="toy", parent=click.Context(click.Group("neumuter"), info_name="neumuter"))
    run = subprocess.run(["groff", "-man", "-Tascii", "-P-cbou", "-ww", "-rLL=200n"],
                         input=manpages.render_page(toy, ctx, []), capture_output=True, text=True, timeout=60)
    assert run.stderr == ""
    for literal in [".dot line", "'quote line.", r"C:\dir or -.", "-p, --path FILE|-", "  keep   this"]:
        assert literal in run.stdout, literal
