"""The `neumuter` command line: one thin command per stage. Options, streams, exit codes."""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
import threading

import click
from tabulate import tabulate

from . import NeumuterError, __version__, distributed
# torch-free: the options and --help are built from these defaults; the stages themselves (and
# torch, transformers) are imported inside the commands, so that --help and completion are instant
from .config import (ROLLBACK_DEFAULTS, ATTRIBUTION_SCORES, FORGET_TERMS, LOCALIZE_METHODS, MAX_NEIGHBORS, OPTIMIZERS, QUANT_TYPES,
                     SEED_RANGE, LoadOptions, LocalizeConfig, MeasureConfig, NeighborsConfig, RelearnConfig, StopRule)
from .errors import ConflictingSettings, DeviceUnavailable, NonFiniteLoss, SettingError, SettingsMessage, escape
from .progress import Reporter
from .records import is_terminal

DEFAULTS = LocalizeConfig()
STOP_DEFAULTS = StopRule()
NEIGHBORS = NeighborsConfig()
RELEARN_DEFAULTS = RelearnConfig()
MEASURE_DEFAULTS = MeasureConfig(model="")
LOAD_DEFAULTS = LoadOptions()


# exit status: 1 is the verdict of `measure --check` (some record is not forgotten) and nothing
# else, 2 a usage error (click's, and a library SettingError: an option whose value cannot work),
# 3 any other error, 130 Ctrl-C (SIGINT), 143 SIGTERM; the same for every command
EXIT_ERROR = 3
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM


class CommandError(click.ClickException):
    """An error reported as one "Error: ..." line on stderr, with exit status 3."""

    exit_code = EXIT_ERROR


#: the commands that split their work over the processes of a launcher (torchrun, accelerate
#: launch: see docs/distributed.md); under a launcher every other command runs on rank 0 alone
DATA_PARALLEL = ("localize", "measure", "neighbors", "relearn")


def _shown_by_rank_0(exc: click.ClickException) -> None:
    """Under a launcher every process parses the same command line: rank 0 alone shows a
    usage error found while parsing."""
    if not distributed.launched().main:
        exc.show = lambda file=None: None


class ParseErrorsOnRankZero:
    """A command-line parse error is shown by rank 0 alone under a launcher."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.ClickException as exc:
            _shown_by_rank_0(exc)
            raise


class NeumuterCommand(ParseErrorsOnRankZero, click.Command):
    """Words the library's errors with this command's flags: a SettingError or a SettingsMessage
    names a library parameter (``top_k``), the user gave an option (``--top-k``). A SettingError
    or ConflictingSettings is a usage error (exit status 2), except a device this machine does
    not have (3); any other SettingsMessage is an error (3)."""

    def __init__(self, *args, sections: tuple[tuple[str, tuple[str, ...]], ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.sections = sections
        for param in self.params:
            one_metavar_style(param)
            default_as_written(param)

    def option_sections(self, ctx) -> list[tuple[str, list[tuple[click.Option, str, str]]]]:
        """--help's options under their headings: [(heading, [(option, names, help)])]. A command
        without ``sections`` has one, "Options"; options no section names go under "Other options",
        and --quiet and --help last, under "General"."""
        records = [(param, *record) for param in self.get_params(ctx)
                   if isinstance(param, click.Option) and (record := param.get_help_record(ctx)) is not None]
        if not self.sections:
            return [("Options", records)]
        place = {name: (heading, k) for heading, names in self.sections for k, name in enumerate(names)}
        found: dict[str, list] = {heading: [] for heading, _ in self.sections}
        found.update({"Other options": [], "General": []})
        for record in sorted(records, key=lambda record: place.get(record[0].name, ("", 0))[1]):
            general = record[0].name == "quiet" or "--help" in record[0].opts
            found["General" if general else place.get(record[0].name, ("Other options",))[0]].append(record)
        return [(heading, rows) for heading, rows in found.items() if rows]

    def format_options(self, ctx, formatter):
        for heading, rows in self.option_sections(ctx):
            with formatter.section(heading):
                formatter.write_dl([(names, help_) for _, names, help_ in rows])

    def invoke(self, ctx):
        if self.name in DATA_PARALLEL:
            distributed.enable()
        elif not distributed.launched().main:
            return None
        try:
            refuse_options_without_effect(self, ctx)
            warn_stale_temporaries(ctx)
            return super().invoke(ctx)
        except SettingError as exc:
            flag = self.flag(exc.setting)
            message = f"{flag} {exc.problem}" if flag else str(exc)
            if isinstance(exc, DeviceUnavailable):
                raise NeumuterError(message) from None
            raise click.UsageError(message, ctx) from None
        except ConflictingSettings as exc:
            raise click.UsageError(exc.worded(self.word), ctx) from None
        except SettingsMessage as exc:
            raise NeumuterError(exc.worded(self.word)) from None
        except NonFiniteLoss as exc:
            lr, dtype = self.flag("lr"), self.flag("dtype")
            raise NeumuterError(f"{exc}; try a smaller {lr} or {dtype} float32" if lr and dtype else str(exc)) from None

    def flag(self, setting: str) -> str | None:
        """The option that sets the library parameter ``setting`` (its long form), if any."""
        for param in self.params:
            if isinstance(param, click.Option) and param.name == setting.replace("-", "_"):
                return next((opt for opt in param.opts if opt.startswith("--")), param.opts[0])
        return None

    def word(self, setting: str) -> str:
        """How a message names the library parameter ``setting``: its flag, else its own name."""
        return self.flag(setting) or setting


#: click's own names of a value's type: every option names its value instead (N, X, FILE...)
CLICK_METAVARS = ("INTEGER", "INTEGER RANGE", "FLOAT", "FLOAT RANGE", "TEXT", "PATH", "FILENAME", "FINITE")


def one_metavar_style(param: click.Parameter) -> None:
    """One metavar style for every command: a number option that names no metavar of its own
    shows N (an integer) or X (a real number), never click's INTEGER RANGE or FLOAT."""
    if not isinstance(param, click.Option) or param.is_flag or param.metavar is not None:
        return
    if isinstance(param.type, (click.types.IntParamType, click.IntRange)):
        param.metavar = "N"
    elif isinstance(param.type, (click.types.FloatParamType, click.FloatRange)):
        param.metavar = "X"


def default_as_written(param: click.Parameter) -> None:
    """An option whose ``show_default`` is a string (``"1/3"``) shows it as written, not in
    click's parentheses."""
    if not isinstance(param, click.Option) or not isinstance(param.show_default, str):
        return
    extra = param.get_help_extra

    def written(ctx):
        return {**extra(ctx), "default": param.show_default}
    param.get_help_extra = written


#: the options that name a file or folder a command writes
OUTPUTS = ("output", "plot_path")


def _attribution(params: dict) -> bool:
    return params.get("method") == "attribution"


#: options that have an effect only beside others, per command: (option, what it needs, whether
#: the command line gives that); given without it, an option is refused (status 2), never ignored
_GATES = "--method gates (the attribution method trains no gates)"
NEEDS = {
    "measure": [
        ("tolerance", "--reference-model or --reference-scores",
         lambda p: p["reference_model"] or p["reference_scores_path"]),
        ("ppl_window", "--ppl", lambda p: p["ppl_path"]),
        ("ppl_stride", "--ppl", lambda p: p["ppl_path"]),
        # (without a reference model, measure_config says that it needs one)
        ("allow_over_forgotten", "--check", lambda p: p["check"] or not (p["reference_model"]
                                                                         or p["reference_scores_path"])),
        ("el_ns", "a --max-length above each n (EL_n needs a text of more than n tokens)",
         lambda p: not p["max_length"] or all(n < p["max_length"] for n in p["el_ns"])),
        ("prefix_tokens", "--generations N (N > 0)", lambda p: p["generations"]),
        ("new_tokens", "--generations N (N > 0)", lambda p: p["generations"]),
    ],
    "localize": [
        ("tolerance", "--reference-model or --base", lambda p: p["reference_model"] or p["base"]),
        ("trust_remote_code_reference", "--reference-model or --base", lambda p: p["reference_model"] or p["base"]),
        ("reference_limit", "--reference (without --stop-ma)", lambda p: p["reference_path"] and p["stop_ma"] is None),
        ("max_forget_loss", "--forget-term bounded", lambda p: p["forget_term"] == "bounded" and not _attribution(p)),
        ("margin", "--forget-term hinge", lambda p: p["forget_term"] == "hinge" and not _attribution(p)),
        ("target_ma", "--forget-term hinge", lambda p: p["forget_term"] == "hinge" and not _attribution(p)),
        *[(name, "--method attribution", _attribution) for name in ("max_per_text", "contrast", "score",
                                                                      "shrink_rounds")],
        ("complete", "--base", lambda p: p["base"]),
        ("patience", "--base and --complete", lambda p: p["base"] and p["complete"]),
        *[(name, "--base, --reference-model, --reference or --stop-ma (no check runs without a stopping point)",
           lambda p: p["base"] or p["reference_model"] or p["reference_path"] or p["stop_ma"] is not None)
          for name in ("check_every", "prune")],
        *[(name, _GATES, lambda p: not _attribution(p))
          for name in ("epochs", "lr", "kl_weight", "l0_weight", "beta", "forget_term", "kl_top_k", "check_every",
                       "optimizer", "prune", "batch_size", "seed")],
    ],
    "neighbors": [("top_k", "--temperature above 0 (top-k limits sampling; 0 is the argmax)",
                   lambda p: p["temperature"] > 0)],
}


def refuse_options_without_effect(command: "NeumuterCommand", ctx) -> None:
    """An option given on the command line that would have no effect (it needs another that is
    not given) is a usage error, not silently ignored."""
    from click.core import ParameterSource

    for name, needs, given in NEEDS.get(command.name, ()):
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE and not given(ctx.params):
            param = next(p for p in command.params if p.name == name)
            pair = [opt for opt in param.secondary_opts if opt.startswith("--")]      # --prune/--no-prune
            raise click.UsageError("/".join([command.flag(name), *pair]) + f" needs {needs}", ctx)


def warn_stale_temporaries(ctx) -> None:
    """Name the temporaries of neumuter's own naming that an earlier run left beside this run's
    outputs (it was killed before it could remove them); they are not removed: one may hold
    the previous checkpoint, and another run may still be writing one."""
    from .records import stale_temporaries

    for output in (ctx.params.get(name) for name in OUTPUTS):
        if not isinstance(output, str):
            continue
        for left, kind in stale_temporaries(output):
            shown, out = escape(left), escape(output)
            if kind == "old":
                progress(f"warning: {shown} was left by an earlier run that was killed while it replaced {out}: "
                         f"it holds what {out} held before; move it back if {out} is missing, else remove it")
            else:
                what = "a file it was writing" if kind == "tmp" and os.path.isfile(left) else (
                    "a folder it was writing" if kind == "tmp" else "a probe of the folder")
                progress(f"warning: {shown} was left by an earlier run that was killed while it wrote {out} "
                         f"({what}); neumuter does not remove it: remove it")


class Terminated(SystemExit):
    """SIGTERM, as the SystemExit(143) that :func:`_terminate` raises (not a verdict)."""


def _terminate(signum, frame):
    raise Terminated(EXIT_SIGTERM)


class NeumuterGroup(ParseErrorsOnRankZero, click.Group):
    """Turns NeumuterError, and an OSError nothing below caught, into one clear line on stderr
    and exit status 3 (1 is the verdict of `measure --check`, 2 a usage error); Ctrl-C into
    exit status 130 and SIGTERM into 143, after the outputs being written are removed."""

    command_class = NeumuterCommand

    def main(self, *args, **kwargs):
        # SIGTERM raises SystemExit(143) for the whole run, so that every `finally` (the
        # temporary outputs) runs as it does for Ctrl-C; only from the main thread, and only
        # when nobody else handles SIGTERM. The handler is put back afterwards.
        install = (threading.current_thread() is threading.main_thread()
                   and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
        if install:
            signal.signal(signal.SIGTERM, _terminate)
        try:
            return super().main(*args, **kwargs)
        finally:
            if install:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def invoke(self, ctx):
        # under a launcher, a failure on any process stops them all: the lowest failed rank
        # shows its error, the others exit quietly with the same status
        try:
            return self._invoke(ctx)
        except distributed.PeerFailed as peer:
            raise SystemExit(peer.exit_code) from None
        except click.exceptions.Exit:
            raise
        except click.ClickException as exc:
            # the one way out of every error line: whatever user data it holds (an id, a text, a
            # path) reaches the terminal escaped, never as a control character
            exc.message = _report_failure(escape(exc.message), exc.exit_code)
            raise
        except KeyboardInterrupt:
            _report_failure("interrupted (Ctrl-C)", EXIT_SIGINT)
            click.echo("\nAborted!", err=True)
            raise click.exceptions.Exit(EXIT_SIGINT) from None
        except Terminated:
            _report_failure("terminated (SIGTERM)", EXIT_SIGTERM)
            raise
        except SystemExit:
            raise
        except BaseException as exc:
            _report_failure(f"{type(exc).__name__}: {exc}", EXIT_ERROR)
            raise
        finally:
            distributed.close()

    def _invoke(self, ctx):
        try:
            result = super().invoke(ctx)
        except Terminated:
            raise
        except SystemExit:           # `measure --check`'s verdict, the same on every process
            with contextlib.suppress(NeumuterError):
                distributed.finish()
            raise
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort,
                distributed.PeerFailed):
            raise
        except NeumuterError as exc:
            raise CommandError(str(exc)) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise CommandError(f"{where}{exc.strerror or exc}") from None
        except Exception as exc:
            # a bug: still one line and status 3, never the 1 of a `measure --check` verdict
            text = " ".join(str(exc).split())[:200] or "no message"
            raise CommandError(f"internal error: {type(exc).__name__}: {text} (a bug in neumuter: please report "
                               "it with the command that caused it)") from None
        finally:
            left = ctx.meta.get(REPORTER)
            if left is not None:
                left.close()                  # a bar an error cut short ends before the error line
        try:
            distributed.finish()
        except NeumuterError as exc:
            raise CommandError(str(exc)) from None
        return result


def _report_failure(message: str, exit_code: int) -> str:
    try:
        return distributed.report_failure(message, exit_code)
    except distributed.PeerFailed as peer:
        raise SystemExit(peer.exit_code) from None


class FiniteFloat(click.FloatRange):
    """A float option that must be a finite number (not nan or inf) within a range; either end
    may be open or absent."""

    name = "float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        if self.min is None and self.max is None:
            return "finite"
        return super()._describe_range()


#: a seed: what torch's generators take (and the same range for every command)
SEED = click.IntRange(SEED_RANGE[0], SEED_RANGE[1])

REPORTER, QUIET = "neumuter.reporter", "neumuter.quiet"    # keys of click's ctx.meta


def _set_quiet(ctx, param, value):
    if value:
        ctx.meta[QUIET] = True                # meta is shared by the group and the command


def quiet_option(func):
    """--quiet, on the group and on every command (either place works)."""
    return click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=_set_quiet,
                        help="No progress on stderr: no bars, no progress or summary lines "
                             "(warnings and errors are still shown).")(func)


@click.group(cls=NeumuterGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="neumuter")
@quiet_option
def cli():
    """Make a fine-tuned causal language model forget specific training texts, and measure it.

    localize finds FFN neurons that carry the forget texts (NeuMuter: one trainable
    Hard-Concrete gate per neuron); select and apply then roll them back to the model before
    your fine-tune (--base) or, with no such model, scale them as the paper does, folded into
    the weights: the result is an ordinary checkpoint. On the models measured so far the
    neurons found also carry texts that were not to be forgotten: measure the cost before you
    rely on it (docs/results.md). measure, relearn and quantize check any causal LM, whatever
    removed the memory. The stages read and write plain files and pipe into each other:

    \b
      neumuter neighbors forget.jsonl --mlm MLM > nb.jsonl
      neumuter localize nb.jsonl --model LM --base BASE > mask.safetensors
      neumuter select mask.safetensors > scales.safetensors
      neumuter apply scales.safetensors --model LM --base BASE -o muted/
      neumuter measure forget.jsonl --model muted/ --reference-model BASE --check

    BASE is the model LM was fine-tuned from: it never saw the forget texts, and forgotten
    means "no better remembered than by BASE". Without an ancestor, leave --base out and give
    localize --reference-model REF, any model that never saw the texts; without any such
    model, --reference unseen.jsonl uses the paper's generic threshold (eq. 17). MA, EL_n,
    forgotten, over-forgotten, forget quality, MIA AUC and PrivLeak: docs/glossary.md.

    Data goes to stdout or -o; progress and summaries go to stderr. Outputs are written
    atomically: an error or an interrupt leaves no partial file behind.

    Progress is a bar (rate, time left) when stderr is a terminal and log lines otherwise;
    with --quiet (before or after the command) only warnings and errors are shown.

    Under torchrun or accelerate launch (the same command line), localize, measure,
    neighbors and relearn split their records over the processes and rank 0 writes what
    one process would; the other commands run on rank 0 alone (docs/distributed.md):

    \b
      torchrun --nproc-per-node 4 -m neumuter_cli localize nb.jsonl --model LM \\
        --batch-size 32 -o mask.safetensors

    \b
    Exit status, the same for every command:
      0    success
      1    `measure --check`: some record is not forgotten (and nothing else)
      2    usage error: a bad option, argument or combination of them
      3    any other error (bad input, wrong model, unwritable output, I/O),
           reported as one "Error: ..." line on stderr
      130  interrupted (Ctrl-C); 143: terminated (SIGTERM); either way
           the outputs being written are removed
    """


def model_options(func):
    """--model and the options that say how to load it, shared by every command that loads an LM."""
    @click.option("--model", "-m", "model", required=True, metavar="NAME_OR_PATH",
                  help="Causal LM: a local checkpoint directory, a hub name, or a .gguf file.")
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default=LOAD_DEFAULTS.device,
                  show_default=True, help="Where to run (auto: cuda, then mps, then cpu).")
    @click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=LOAD_DEFAULTS.dtype,
                  show_default=True, help="Weight dtype (auto: float32 on CPU, the checkpoint's own on a GPU).")
    @click.option("--device-map", type=click.Choice(["auto"]), default=LOAD_DEFAULTS.device_map,
                  help="Spread a model too large for one GPU over all GPUs (needs accelerate).")
    @click.option("--max-memory", default=None, metavar="DEVICE=SIZE[,..]", callback=_max_memory,
                  help="With --device-map auto: the most of the model each device may hold, e.g. "
                       "0=70GiB,1=70GiB,cpu=200GiB (GPU numbers, cpu, mps; sizes in B, KB, MB, GB, KiB, MiB, "
                       "GiB...). What does not fit is offloaded to the CPU or, beyond it, to disk (a safetensors "
                       "checkpoint is read in place) and brought in for each forward pass: slower, same results.")
    @click.option("--trust-remote-code", is_flag=True, default=LOAD_DEFAULTS.trust_remote_code,
                  help="Allow model code from the checkpoint's repository to run.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        load = LoadOptions(**{name: kwargs.pop(name) for name in
                              ("device", "dtype", "device_map", "max_memory", "trust_remote_code")})
        if load.max_memory is not None and load.device_map is None:
            raise click.UsageError("--max-memory needs --device-map auto")
        if load.device_map is not None and distributed.world().size > 1:
            raise click.UsageError(f"--device-map auto spreads one copy of the model over every GPU, but each of the "
                                   f"{distributed.world().size} processes of the launcher holds its own: run one "
                                   "process, or give each its own GPU (--device cuda)")
        return func(*args, load=load, **kwargs)
    return wrapper


def _max_memory(ctx, param, value):
    if value is None:
        return None
    from .offload import parse_max_memory

    try:
        return parse_max_memory(value)
    except NeumuterError as exc:
        raise click.BadParameter(str(exc)) from None


def load_lm(model: str, load: LoadOptions):
    from dataclasses import asdict

    from .models import load_model

    progress(f"loading {escape(model)}")
    follow_transformers()
    return load_model(model, **asdict(load))


def follow_transformers() -> None:
    """transformers' own bars (loading weights) follow this command's progress rule."""
    from .progress import follow_in_transformers

    follow_in_transformers(reporter())


def reporter() -> Reporter:
    """This command's progress: bars on a terminal, lines otherwise, nothing with --quiet; under
    a launcher, rank 0's alone (the other processes take the same steps and reach the same checks)."""
    ctx = click.get_current_context()
    found = ctx.meta.get(REPORTER)
    if found is None:
        found = ctx.meta[REPORTER] = Reporter(quiet=bool(ctx.meta.get(QUIET)), silent=not distributed.is_main())
    return found


def progress(message: str) -> None:
    if distributed.is_main():
        reporter()(message)


@cli.command()
@model_options
@click.option("--base", default=None, metavar="NAME_OR_PATH",
              help="The checkpoint the model was fine-tuned from: show, per block, how many FFN neurons the "
                   "fine-tune changed and by how much (the neurons `localize --base` can roll back).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table: for reading; json: one object with every number, for scripts.")
@quiet_option
def inspect(model, load, base, fmt):
    """Show each decoder block's FFN down-projection and its neuron count.

    Use the block numbers with `localize --layers`. With --base, also where the fine-tune
    changed the model: per block, the FFN neurons whose weights (input rows or down-projection
    column) differ from BASE's, their share, and the size of each neuron's change relative to
    its weights in BASE (median and largest).
    """
    from .inspection import inspect_rows, run_inspect

    follow_transformers()
    report = run_inspect(model, load, base, reporter())
    if fmt == "json":
        click.echo(json.dumps(report, indent=2))
        return
    rows, headers = inspect_rows(report)
    click.echo(tabulate(rows, headers=headers))
    line = f"\n{len(rows)} blocks, {report['total_neurons']} FFN neurons ({report['architecture']}, {report['dtype']})"
    if base is not None:
        changed = report["changed_neurons"]
        line += (f"; {changed} ({100 * changed / report['total_neurons']:.1f} %) changed since {base} "
                 f"(weights {report['base']['distance']:.3f} apart)")
    click.echo(line)


@cli.command("select")
@click.argument("mask", default="-", metavar="[MASK|-]")
@click.option("--output", "-o", default="-", show_default=True, metavar="SCALES|-",
              help="Where to write the scales file (safetensors); - is stdout.")
@click.option("--energy", type=FiniteFloat(0, 1, min_open=True), default=None, metavar="F",
              help="Energy rule (the default, F = 0.05): sort all gate values ascending, "
                   "accumulate |m|; eps = the first value at which the sum reaches F of the total; "
                   "select the neurons with m < eps.")
@click.option("--threshold", type=FiniteFloat(0, min_open=True), default=None, metavar="X",
              help="Select the neurons whose gate value is below X (the public code's cut: 0.15).")
@click.option("--top-fraction", type=FiniteFloat(0, 1, min_open=True), default=None, metavar="F",
              help="Select the floor(F x N) lowest gate values of all N masked neurons "
                   "(ties broken by block, then neuron index).")
@quiet_option
def select_cmd(mask, output, energy, threshold, top_fraction):
    """Choose the neurons to mute from a mask file and write their scale factors.

    Reads MASK (from `localize`; - or nothing: stdin), computes each neuron's deterministic
    gate value m (sigmoid of log_alpha, stretched and clamped to [0, 1]) and selects with one
    rule over all masked blocks together. A selected neuron's scale is m, every other
    neuron's is 1.0. A gate at exactly 1.0 is untouched and never selected, whatever the rule.

    \b
    Energy rule, exactly: with v_1 <= ... <= v_N the sorted gate values and
    C_k = |v_1| + ... + |v_k|, eps = v_k for the first k with C_k >= F * C_N;
    the selected neurons are those with m < eps (strictly: values tied with
    eps are all left out, so the selection holds less than F of the energy).

    A per-block summary goes to stderr.
    """
    from .artifacts import MASK_KIND, read_artifact, save_artifact
    from .records import check_output
    from .select import DEFAULT_RULE, check_rule, select_from_mask, summary_rows

    given = [(name, value) for name, value in
             (("energy", energy), ("threshold", threshold), ("top-fraction", top_fraction)) if value is not None]
    if len(given) > 1:
        raise click.UsageError("give at most one of --energy, --threshold, --top-fraction")
    check_output(output, inputs=(mask,))
    rule, value = given[0] if given else DEFAULT_RULE
    check_rule(rule, value)
    artifact = read_artifact(mask, kind=MASK_KIND)
    scales, metadata = select_from_mask(artifact.tensors, artifact.metadata, rule, value,
                                        mask_sha256=artifact.sha256, name=artifact.name)
    save_artifact(scales, metadata, output)
    progress(tabulate(summary_rows(metadata), headers=["block", "down-projection", "neurons", "selected", "%"]))
    epsilon = metadata["epsilon"]
    cut = "none selected" if epsilon is None else f"eps = {epsilon:.6g}"
    progress(f"rule {rule} {value:g}: {cut}; {metadata['selected']} of {metadata['total_neurons']} "
             f"masked neurons selected ({100 * metadata['selected'] / metadata['total_neurons']:.2f} %)")


@cli.command("apply")
@click.argument("scales", default="-", metavar="[SCALES|-]")
@model_options
@click.option("--output", "-o", required=True, metavar="DIR",
              help="Checkpoint directory to write (save_pretrained + tokenizer + neumuter.json).")
@click.option("--force", is_flag=True, default=False,
              help="Replace DIR when it holds a previous neumuter checkpoint (what apply wrote there, "
                   "and nothing else). A folder holding anything else is never replaced.")
@click.option("--allow-any-scale", is_flag=True, default=False,
              help="Fold scales outside [0, 1] too (above 1 amplifies a neuron, below 0 flips it); "
                   "without it such a scales file is refused (select writes gate values in [0, 1]).")
@click.option("--base", default=None, metavar="NAME_OR_PATH",
              help="The base model the scales were made with (`localize --base`): each selected neuron becomes "
                   "W_base + m (W - W_base), exactly (m = 0: BASE's weights bit for bit). Required for such "
                   "scales, refused for the others.")
@quiet_option
def apply_cmd(scales, model, load, output, force, allow_any_scale, base):
    """Fold a scales file into the model and save an ordinary checkpoint.

    Each selected neuron's scale multiplies its column of the FFN down-projection (a row for
    GPT-2's Conv1D); nothing else changes. The result loads with plain
    AutoModelForCausalLM.from_pretrained and gives the gated model's logits. The scales must
    have been made for this very model (its fingerprint is checked); a muted checkpoint can
    be the --model of a later request. With --dtype auto the checkpoint keeps its stored
    dtype; a .gguf model is written as a float32 checkpoint.

    With --base (for scales from `localize --base`), each selected neuron is moved between
    BASE's weights and the model's instead: W_base + m (W - W_base) on its input-projection
    rows and down-projection column, written with lerp (m = 0: BASE's weights bit for bit).
    BASE must be the one the scales were made with (its fingerprint is checked).

    DIR is written atomically (into a temporary folder beside it, renamed at the end). A
    missing or empty DIR is written; an existing one only with --force, and only when it
    holds a previous neumuter checkpoint. DIR is never the current folder, a folder holding
    it, or a folder holding the model or the scales file. All of this is checked before the
    model loads.
    """
    from .apply import run_apply

    follow_transformers()
    record = run_apply(model, scales, output, force, allow_any_scale, load, reporter(), base=base)
    verb = "scaled" if base is None else "rolled back"
    rows = [[b, record["modules"][b], n] for b, n in record["neurons_scaled_per_layer"].items()]
    progress(tabulate(rows, headers=["block", "down-projection", f"neurons {verb}"]))
    progress(f"{record['neurons_scaled']} of {record['total_neurons']} FFN neurons {verb}"
             f"{'' if base is None else ' toward ' + escape(base)}; checkpoint written to {escape(output)}")


def _el_sizes(ctx, param, values):
    sizes = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                n = int(part)
            except ValueError:
                raise click.BadParameter(f"{part!r} is not an integer (use e.g. 10 or 5,10)") from None
            if n < 0:
                raise click.BadParameter("n must be positive (0 skips EL)")
            if n and n not in sizes:
                sizes.append(n)
    return tuple(sizes)


def _png_path(ctx, param, value):
    if value is not None and (value == "-" or not value.lower().endswith(".png")):
        raise click.BadParameter("give a file name ending in .png")
    return value


#: `measure --help` in sections (NeumuterCommand.option_sections)
MEASURE_SECTIONS = (
    ("The model", ("model", "device", "dtype", "device_map", "max_memory", "trust_remote_code", "quantize")),
    ("Is it forgotten? One yardstick (docs/glossary.md)",
     ("reference_model", "trust_remote_code_reference", "reference_scores_path", "tolerance", "reference_path",
      "thresholds_path", "quantize_reference", "check", "allow_over_forgotten")),
    ("Membership inference", ("holdout_path",)),
    ("What is measured", ("max_length", "el_ns", "ppl_path", "ppl_window", "ppl_stride", "generations",
                          "prefix_tokens", "new_tokens", "batch_size")),
    ("Output", ("output", "fmt", "plot_path")),
)


@cli.command("measure", sections=MEASURE_SECTIONS)
@click.argument("input_path", default=MEASURE_DEFAULTS.input_path, metavar="[INPUT|-]")
@model_options
@click.option("--max-length", type=click.IntRange(2), default=MEASURE_DEFAULTS.max_length, show_default=True,
              help="Cut every text to its first N tokens (the benchmark's sample length).")
@click.option("--el-n", "el_ns", multiple=True, default=tuple(map(str, MEASURE_DEFAULTS.el_ns)), show_default=True,
              callback=_el_sizes,
              metavar="N[,N..]", help="n of EL_n; several allowed (5,10 or repeat the option); 0 skips EL.")
@click.option("--reference", "reference_path", metavar="UNSEEN.jsonl",
              help="Texts the model never saw: their mean MA and EL_n are the thresholds (eq. 17) "
                   "and their mean loss the anchor of the MIA distance (B.3).")
@click.option("--thresholds", "thresholds_path", metavar="FILE.json",
              help="Thresholds measured before, instead of --reference: the output of "
                   "`measure UNSEEN.jsonl --format json` (its summary means are the thresholds), or an "
                   "object with \"ma\", \"el_N\" and \"loss\".")
@click.option("--reference-model", metavar="NAME_OR_PATH",
              help="A model that never saw the records (the base model before the fine-tune, a retrain "
                   "without them; any model --model takes, with the same tokenizer): each record is judged "
                   "against this model's own MA, EL_n and loss on it, instead of eq. 17's thresholds. "
                   "Loaded after the model is measured and freed; it is not quantised.")
@click.option("--trust-remote-code-reference", is_flag=True, default=False,
              help="Allow code from the --reference-model's checkpoint to run (--trust-remote-code is for --model "
                   "only: a reference model that needs its own code is refused without this).")
@click.option("--reference-scores", "reference_scores_path", metavar="FILE",
              help="The reference model's numbers measured before, instead of --reference-model: the JSON "
                   "or JSONL output of `measure INPUT --model REF` (same records in the same order, same "
                   "--max-length and --el-n; checked record by record). For PrivLeak it must be the JSON "
                   "output of a run with the same --holdout.")
@click.option("--tolerance", type=FiniteFloat(0, 1), default=MEASURE_DEFAULTS.tolerance, show_default=True,
              help="With a reference model: a record is forgotten when its MA and every EL_n are at most "
                   "the reference's + this, and over-forgotten when its MA is below the reference's - this.")
@click.option("--holdout", "holdout_path", metavar="HOLDOUT.jsonl",
              help="Texts of the same kind that neither model trained on: the summary gives the AUC of "
                   "membership-inference attacks telling the records from them, and PrivLeak with a "
                   "reference model.")
@click.option("--quantize", "quantize", type=click.Choice(list(QUANT_TYPES), case_sensitive=False),
              default=None, help="Round-trip every linear weight of the decoder blocks (attention and FFN "
                                 "projections; not embeddings, LM head or norms) through this llama.cpp "
                                 "format (gguf package) before measuring: is the text still forgotten once "
                                 "the model is quantised? Rows whose length is not a multiple of the block "
                                 "size are left as they are and listed in the summary.")
@click.option("--quantize-reference", is_flag=True, default=False,
              help="Quantise the --reference-model too (by default it stays as it is: the yardstick of "
                   "a model that never saw the records, as it was released).")
@click.option("--check", is_flag=True, default=False,
              help="Exit 1 unless every record is forgotten (needs --reference, --thresholds, "
                   "--reference-model or --reference-scores). With a reference model an over-forgotten "
                   "record fails the check too: a text predicted far worse than by a model that never saw "
                   "it stands out, itself a membership signal (see --allow-over-forgotten).")
@click.option("--allow-over-forgotten", is_flag=True, default=False,
              help="With --check and a reference model: let over-forgotten records pass.")
@click.option("--ppl", "ppl_path", metavar="CORPUS.jsonl",
              help="Also report the perplexity of these (long) texts, by windows.")
@click.option("--ppl-window", type=click.IntRange(2), default=None, metavar="N",
              help="Tokens per perplexity window [default: the model's context, at most 1024].")
@click.option("--ppl-stride", type=click.IntRange(1), default=None, metavar="N",
              help="How far each window moves [default: the window, i.e. non-overlapping windows that "
                   "score all their tokens but the first]; a smaller stride scores each token once "
                   "with more context.")
@click.option("--generations", "generations", type=click.IntRange(0), default=MEASURE_DEFAULTS.generations,
              show_default=True,
              metavar="N", help="For the first N records, show the greedy continuation of the prefix "
                                "beside the true suffix and where they part (the paper's Table 14).")
@click.option("--prefix-tokens", type=click.IntRange(1), default=MEASURE_DEFAULTS.prefix_tokens, show_default=True,
              help="Prefix length for --generations.")
@click.option("--new-tokens", type=click.IntRange(1), default=MEASURE_DEFAULTS.new_tokens, show_default=True,
              help="Continuation length for --generations.")
@click.option("--batch-size", type=click.IntRange(1), default=MEASURE_DEFAULTS.batch_size, show_default=True,
              help="Sequences per forward pass (teacher forcing and lock-step generation).")
@click.option("--format", "fmt", type=click.Choice(["auto", "table", "jsonl", "json"]), default="auto",
              show_default=True, help="auto: table on a terminal, jsonl otherwise.")
@click.option("--output", "-o", default="-", show_default=True, metavar="FILE|-",
              help="Where the data goes (written atomically); - is stdout.")
@click.option("--plot", "plot_path", metavar="FILE.png", callback=_png_path,
              help="Also draw the result to this PNG (written atomically): each record's MA against its "
                   "reference model's MA on it (or eq. 17's threshold), forgotten / over-forgotten / kept in "
                   "their own colours, and with --holdout the ROC curves of the membership-inference attacks. "
                   "Needs matplotlib: pip install 'neumuter[plot]'.")
@quiet_option
def measure_cmd(allow_over_forgotten, fmt, output, plot_path, **options):
    """Measure how well a model remembers texts: MA, EL_n, loss; is it forgotten; MIA; perplexity.

    Reads records (JSONL with "text"; INPUT or - / nothing: stdin) and, per record, computes on
    its first --max-length tokens: MA (eq. 15, share of greedy next tokens equal to the true
    ones), EL_n (eq. 16, n-gram overlap of the greedy continuation of every prefix with the true
    suffix; exact, with prefix reuse and lock-step batches) and the mean token loss (nats).

    \b
    Is a record forgotten? Two yardsticks, give one:
      --reference / --thresholds (the paper's eq. 17): forgotten when its MA and
        every EL_n are at or below the mean over generic texts the model never
        saw. Adds "mia_distance" = |loss - mean reference loss| (B.3); the
        summary gives the share within 0.5. Measuring the reference set is the
        slow part: save it once with `measure UNSEEN.jsonl --format json -o
        ref.json` and pass --thresholds ref.json afterwards.
      --reference-model / --reference-scores (against a never-seen model): per
        record "ref_ma", "ref_el_N", "ref_loss" under a model that never saw
        the records; "forgotten" when MA <= ref_ma + --tolerance and EL_n <=
        ref_el_N + --tolerance for every n; "over_forgotten" when MA < ref_ma -
        --tolerance (forgotten further than never seen: a membership signal
        too). The summary adds the counts and "forget_quality": TOFU's KS test
        (scipy.stats.ks_2samp) p-value between the per-record losses under the
        model and under the reference model (TOFU tests its truth ratio of
        question/answer pairs; plain texts have none, so the statistic here is
        the loss). p = 1: indistinguishable. Save the reference's numbers once
        with `measure INPUT --model REF --format json -o ref-scores.json` and
        pass --reference-scores ref-scores.json afterwards.

    \b
    --holdout HOLDOUT.jsonl: membership inference. For each score, oriented so
    that higher = more member-like: loss (-loss), zlib (-loss / zlib-compressed
    bytes of the text), mink_20/40 (Min-K% Prob: mean of the lowest 20/40 % token
    log-probs), minkpp_20/40 (Min-K%++: the same over (log p - mu) / sigma, mu and
    sigma of log p over the vocabulary at that position), the summary gives
    "auc_<score>": the ROC AUC of telling the records (members) from the holdout
    texts (scipy.stats.mannwhitneyu U / n1 n2). 1: the records stand out as
    members (memorised); 0.5: indistinguishable. With a reference model it adds
    "ref_auc_<score>", "privleak_<score>" and "privleak" (MUSE's PrivLeak, percent,
    on MUSE's default Min-40%): (A - A_ref) / A_ref * 100 with MUSE's AUC A =
    1 - auc (MUSE labels the forget set 0). 0: leaks like the reference model;
    near -100: memorised; positive: over-unlearned. Holdout texts are cut to
    --max-length too.

    --quantize TYPE measures the model after a round trip of its block weights through a
    llama.cpp format (q8_0, q5_0, q5_1, q4_0, q4_1, mxfp4); the summary lists the weights.

    --ppl adds the perplexity of a corpus (each text cut into windows, see --ppl-window and
    --ppl-stride) to the summary; with --ppl, INPUT may be left out.

    \b
    Output (the data goes to stdout or -o):
      jsonl  one line per record: every input key kept, plus tokens, ma, el_N,
             loss [, mia_distance] [, ref_ma, ref_el_N, ref_loss] [, forgotten]
             [, over_forgotten], model_fingerprint [, generation]; the summary
             goes to stderr as a table (with no records: one summary line)
      json   one object {"records": [...], "summary": {...}}; the summary's
             "model" names the model and its fingerprint
      table  the per-record table, the summary and any generations
      model_fingerprint is the measured model's, before any --quantize: an
      output used as --reference-scores later says which model made it, and
      the scores of the model itself (or of one it was made from) are refused.
    Progress goes to stderr. With --check, exit status 1 unless every record is
    forgotten, and with a reference model none over-forgotten unless
    --allow-over-forgotten (the data is written first).
    """
    from .measure import run_measure
    from .render import summary_table

    config = measure_config(options, output, plot_path, allow_over_forgotten)
    if fmt == "auto":
        fmt = "table" if output == "-" and is_terminal(sys.stdout) else "jsonl"
    follow_transformers()        # measure loads its models itself
    result = run_measure(config, reporter())
    if distributed.is_main():
        write_measured(result, config, fmt, output, plot_path)
    if fmt == "jsonl":
        progress(summary_table(result.summary, config.el_ns))
    if config.check:
        check_verdicts(result, allow_over_forgotten)


def measure_config(options: dict, output: str, plot_path: str | None, allow_over_forgotten: bool) -> MeasureConfig:
    """`measure`'s options as the library's MeasureConfig, with every usage error found before a
    model loads: outputs that are inputs, a --plot without matplotlib, options that need others."""
    from dataclasses import asdict

    from .plots import require_matplotlib
    from .records import check_output

    load = options.pop("load")
    config = MeasureConfig(**{**options, "quantize": options["quantize"] and options["quantize"].lower()},
                           **asdict(load))
    inputs = (config.input_path, config.reference_path, config.thresholds_path, config.ppl_path,
              config.holdout_path, config.reference_scores_path)
    check_output(output, inputs=inputs)
    if plot_path:
        if output != "-" and os.path.abspath(output) == os.path.abspath(plot_path):
            raise click.UsageError("--plot and --output name the same file")
        check_output(plot_path, inputs=inputs)
        require_matplotlib()                 # before the model loads, not after the measurement
    judged = config.reference_path or config.thresholds_path or config.reference_model or config.reference_scores_path
    if config.check and not judged:
        raise click.UsageError("--check needs --reference, --thresholds, --reference-model or --reference-scores "
                               "(the verdicts come from it)")
    if allow_over_forgotten and not (config.reference_model or config.reference_scores_path):
        raise click.UsageError("--allow-over-forgotten needs --reference-model or --reference-scores")
    config.validate()
    if config.input_path == "-" and is_terminal(sys.stdin):
        if not config.ppl_path:
            raise NeumuterError("no input: give a JSONL file or pipe one into stdin")
        config.input_path = None             # perplexity alone: nothing to read on a terminal
        if plot_path:
            raise click.UsageError("--plot draws the records: give INPUT")
    return config


def write_measured(result, config: MeasureConfig, fmt: str, output: str, plot_path: str | None) -> None:
    """The measured records and summary to ``output`` in ``fmt``, and the figure to ``plot_path``."""
    from .plots import plot_measure
    from .records import atomic_output
    from .render import write_result

    with atomic_output(output, "w") as out:
        write_result(result, fmt, out, click.style if fmt == "table" and output == "-" and is_terminal(sys.stdout)
                     else None)
    if plot_path:
        source = "<stdin>" if config.input_path == "-" else config.input_path
        plot_measure(result, plot_path, f"{config.model} on {source}"
                     + (f" ({config.quantize} weights)" if config.quantize else ""))
        progress(f"figure written to {escape(plot_path)}")


def check_verdicts(result, allow_over_forgotten: bool) -> None:
    """`measure --check`: exit status 1 unless every record is forgotten (and, with a reference
    model, none over-forgotten unless allowed)."""
    failed = False
    for labels, what in ((result.not_forgotten, "not forgotten"),
                         ([] if allow_over_forgotten else result.over_forgotten, "over-forgotten")):
        if labels:
            shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
            progress(f"check failed: {len(labels)} of {len(result.records)} records are {what} ({shown})")
            failed = True
    if failed:
        sys.exit(1)
    progress(f"check passed: all {len(result.records)} records are forgotten")


@cli.command("neighbors")
@click.argument("input_path", default="-", metavar="[INPUT|-]")
@click.option("--mlm", required=True, metavar="NAME_OR_PATH",
              help="Masked LM (BERT-style) that writes the neighbours: a local directory or a hub name.")
@click.option("-k", "--count", "k", type=click.IntRange(1, MAX_NEIGHBORS), default=NEIGHBORS.k, show_default=True,
              metavar="K",
              help="Neighbours per record.")
@click.option("-r", "--ratio", type=FiniteFloat(0, 1, min_open=True), default=NEIGHBORS.ratio,
              show_default=True, metavar="R",
              help="Proportion of the MLM tokens to rewrite, 0 < R <= 1; 1 rewrites every token.")
@click.option("--temperature", type=FiniteFloat(0), default=NEIGHBORS.temperature, show_default=True,
              metavar="T", help="0: the argmax (greedy; at R = 1 all K neighbours of a record are then the same); "
                                "T > 0: sample from softmax(logits / T).")
@click.option("--top-k", type=click.IntRange(0), default=NEIGHBORS.top_k, show_default=True, metavar="N",
              help="When sampling, draw from the N most likely tokens only; 0: no limit.")
@click.option("--seed", type=SEED, default=NEIGHBORS.seed, show_default=True,
              help="Seed of the position choice and the sampling: same input, options and seed "
                   "give the same output, whatever the batch size.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default=LOAD_DEFAULTS.device,
              show_default=True, help="Where to run the MLM (auto: cuda, then mps, then cpu).")
@click.option("--batch-size", type=click.IntRange(1), default=NEIGHBORS.batch_size, show_default=True,
              metavar="N", help="Sequences (records x neighbours) advanced by one MLM call.")
@click.option("--output", "-o", default="-", show_default=True, metavar="FILE|-",
              help="Where the records go (written atomically); - is stdout.")
@click.option("--trust-remote-code-mlm", is_flag=True, default=False,
              help="Allow code from the --mlm checkpoint to run (an MLM that needs its own code is refused "
                   "without this).")
@quiet_option
def neighbors_cmd(input_path, mlm, k, ratio, temperature, top_k, seed, device, batch_size, output,
                  trust_remote_code_mlm):
    """Add K neighbour texts to every record, written by a masked LM.

    Reads records (JSONL with "text"; INPUT or - / nothing: stdin) and writes each one, in
    input order and as soon as its group is done, with its keys untouched plus
    "neighbors": [K strings].

    For each neighbour, a random proportion R of the text's MLM tokens is visited in
    increasing order; at each visited position the token is masked, the MLM predicts it from
    the current (partly rewritten) text, and the prediction is written back. Special tokens
    are never predicted. Texts longer than the MLM's window are rewritten whole: each
    position is predicted from the window centred on it. Neighbours come out in the MLM
    tokenizer's normal form (e.g. lower-cased for an uncased BERT).

    The defaults (part of the tokens rewritten, each sampled from the likeliest few) were
    chosen by running localize with each kind of neighbour: sampled neighbours keep the
    model's general ability far better than argmax ones, and the tokens kept preserve the
    text's form. The paper's setting is -r 1 --temperature 0 (K 5; the public code K 1).

    Progress goes to stderr.
    """
    import itertools

    from .neighbors import NeighborWriter, load_mlm
    from .progress import follow_in_transformers
    from .records import atomic_output, check_output, iter_records, record_writer

    if input_path == "-" and is_terminal(sys.stdin):
        raise NeumuterError("no input: give a JSONL file or pipe one into stdin")
    check_output(output, inputs=(input_path,))
    config = NeighborsConfig(k=k, ratio=ratio, temperature=temperature, top_k=top_k, batch_size=batch_size,
                             seed=seed)
    records = iter_records(input_path)
    first = next(records)  # a missing or malformed input fails before the MLM is loaded
    # the bar's length: a second, quick read of the file (stdin can only be read once)
    total = sum(1 for _ in iter_records(input_path)) if reporter().bars and input_path != "-" else None
    progress(f"loading {escape(mlm)}")
    follow_in_transformers(reporter())
    writer = NeighborWriter(*load_mlm(mlm, device, trust_remote_code_mlm), config, progress=reporter())
    if temperature == 0 and ratio == 1 and k > 1:
        progress(f"warning: with --temperature 0 and -r 1 the {k} neighbours of a record "
                 "are identical (use --temperature > 0 for distinct ones)")
    rewritten = writer.records(itertools.chain([first], records), total=total)
    if distributed.is_main():
        with atomic_output(output, "w") as out, record_writer(out, flush=True) as lines:
            lines.write_all(rewritten)
    else:
        for _ in rewritten:             # the other processes compute their share and write nothing
            pass
    progress(f"neighbors: {writer.rewrites} tokens rewritten in {writer.calls} MLM calls")


#: `localize --help` in sections (NeumuterCommand.option_sections)
LOCALIZE_SECTIONS = (
    ("Input, output and the model", ("output", "model", "base", "device", "dtype", "device_map", "max_memory",
                                     "trust_remote_code", "layers", "max_length")),
    ("When to stop (recommended: --base or --reference-model)",
     ("reference_model", "trust_remote_code_reference", "tolerance", "reference_path", "reference_limit", "stop_ma",
      "stop_el", "check_every", "epochs", "prune", "complete", "patience")),
    ("Method", ("method",)),
    ("Training the gates (--method gates)",
     ("lr", "kl_weight", "l0_weight", "beta", "forget_term", "max_forget_loss", "margin", "target_ma", "optimizer",
      "batch_size", "kl_top_k", "seed")),
    ("Ranking the neurons (--method attribution)", ("score", "max_per_text", "contrast", "shrink_rounds")),
)


@cli.command("localize", sections=LOCALIZE_SECTIONS)
@click.argument("input_path", default="-", metavar="[INPUT|-]")
@model_options
@click.option("--output", "-o", default="-", show_default=True, metavar="MASK|-",
              help="Mask file to write (safetensors); - writes to stdout (not to a terminal).")
@click.option("--epochs", type=click.IntRange(1), default=DEFAULTS.epochs,
              show_default=f"{DEFAULTS.epochs}; {ROLLBACK_DEFAULTS['epochs']} with --base",
              help="Most epochs to train (fewer when the check stops it early).")
@click.option("--lr", type=FiniteFloat(0, min_open=True), default=DEFAULTS.lr, show_default=True,
              help="Adam learning rate of the gates' log_alpha.")
@click.option("--lambda", "kl_weight", type=FiniteFloat(0), default=DEFAULTS.kl_weight,
              show_default=f"{DEFAULTS.kl_weight:g}; {ROLLBACK_DEFAULTS['kl_weight']:g} with --base",
              help="Weight of the neighbour KL term (eq. 13's lambda).")
@click.option("--eta", "l0_weight", type=FiniteFloat(0), default=DEFAULTS.l0_weight,
              show_default=f"{DEFAULTS.l0_weight:g}; {ROLLBACK_DEFAULTS['l0_weight']:g} with --base",
              help="Weight of the L0 term R(M) (eq. 13's eta).")
@click.option("--beta", type=FiniteFloat(0, min_open=True), default=DEFAULTS.beta,
              show_default="1/3", help="Hard-Concrete temperature.")
@click.option("--forget-term", type=click.Choice(FORGET_TERMS), default=DEFAULTS.forget_term,
              show_default=True,
              help="hinge: push each still-correct forget token below the best other token by "
                   "--margin logits, then stop; bounded: the public code's ascent, bounded by "
                   "--max-forget-loss; ascent: the paper's plain -L_f (no bound).")
@click.option("--max-forget-loss", type=FiniteFloat(0), default=DEFAULTS.max_forget_loss, show_default=True,
              help="Bound of --forget-term bounded, in nats: ascend below it, descend above it.")
@click.option("--margin", type=FiniteFloat(0), default=DEFAULTS.margin, show_default=True,
              help="Margin of --forget-term hinge, in logits.")
@click.option("--target-ma", type=FiniteFloat(0, 1), default=None,
              help="With --forget-term hinge, a forget text whose MA (under the training gates) is at "
                   "or below this stops pulling, so no more is broken than needed [default: each text's "
                   "reference MA with --reference-model or --base, half the MA threshold with --reference/--stop-ma, "
                   "else 0].")
@click.option("--base", default=None, metavar="NAME_OR_PATH",
              help="The checkpoint the model was fine-tuned from (same architecture and tokenizer). Each gate "
                   "then moves its neuron between BASE's weights and the model's, W(m) = W_base + m (W - W_base) "
                   "(m = 0 reverts it), instead of scaling it: only what the fine-tune added is removed. Only the "
                   "neurons the fine-tune changed get gates, in the blocks it changed unless --layers says; "
                   "BASE is also the reference model unless --reference-model, --reference or --stop-ma is given. "
                   "Apply the result with `apply --base BASE`.")
@click.option("--layers", default=None, metavar="SPEC",
              help="Blocks to gate, e.g. 10-16,21 (default: all; with --base, those the fine-tune changed; see "
                   "`neumuter inspect`).")
@click.option("--max-length", type=click.IntRange(2), default=DEFAULTS.max_length, show_default=True,
              help="Tokens of each text (and neighbour) used.")
@click.option("--batch-size", type=click.IntRange(1), default=DEFAULTS.batch_size, show_default=True,
              help="Forget texts per optimiser step (their neighbours go in the same forward pass); under "
                   "torchrun, the whole step's, split over the processes.")
@click.option("--kl-top-k", type=click.IntRange(0), default=DEFAULTS.kl_top_k, show_default=True,
              help="Keep the original distribution as its top-k log-probs plus one bucket for the "
                   "rest of the vocabulary (0: the full vocabulary).")
@click.option("--seed", type=SEED, default=DEFAULTS.seed, show_default=True, help="Seed of the gate noise.")
@click.option("--reference", "reference_path", default=None, metavar="UNSEEN.jsonl",
              help="Texts the model never saw: their average MA is eq. 17's MA threshold, and "
                   "training stops as soon as every forget text is at or below it with the "
                   "neurons that `select` (default rule) would choose; checked every "
                   "--check-every epochs. Verify EL with `neumuter measure` afterwards.")
@click.option("--reference-limit", type=click.IntRange(1), default=STOP_DEFAULTS.reference_limit, show_default=True,
              help="Reference texts used for the thresholds (the first N).")
@click.option("--reference-model", default=None, metavar="NAME_OR_PATH",
              help="A model that never saw the forget texts (the base model before your fine-tune, a "
                   "checkpoint from before the data arrived; same tokenizer). Its MA on each forget text "
                   "is computed once, before training; training stops as soon as every text is at or "
                   "below its reference MA + --tolerance with the neurons that `select` would choose, and "
                   "the hinge stops pulling a text at its reference MA, so nothing is forgotten further "
                   "than a model that never saw it (over-forgetting is a membership signal too).")
@click.option("--trust-remote-code-reference", is_flag=True, default=False,
              help="Allow code from the --reference-model's (or --base's) checkpoint to run (--trust-remote-code "
                   "is for --model only: a reference model that needs its own code is refused without this).")
@click.option("--tolerance", type=FiniteFloat(0, 1), default=STOP_DEFAULTS.tolerance, show_default=True,
              help="With --reference-model: how far above its reference MA a text may stay.")
@click.option("--stop-ma", type=FiniteFloat(0, 1), default=None, help="MA threshold for the early stop (overrides --reference).")
@click.option("--stop-el", type=FiniteFloat(0, 1), default=None, help="EL_10 threshold for the early stop (overrides --reference).")
@click.option("--check-every", type=click.IntRange(1), default=DEFAULTS.check_every, show_default=True,
              help="Epochs between two early-stop checks.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=DEFAULTS.optimizer, show_default=True,
              help="adam: each gate steps at the learning rate whatever the size of its gradient (the public "
                   "code); shared-adam: one step size for all gates, so gates move in proportion to their "
                   "gradients and only the ones that matter most close.")
@click.option("--method", type=click.Choice(LOCALIZE_METHODS), default=DEFAULTS.method, show_default=True,
              help="gates: train a Hard-Concrete gate per neuron (the paper). attribution: each text ranks the "
                   "neurons by --score and keeps the shortest prefix of its ranking that reaches the stop; the "
                   "mask is the union (needs --reference-model, --reference or --stop-ma; no epochs).")
@click.option("--max-per-text", type=click.IntRange(1), default=DEFAULTS.max_per_text, show_default=True,
              help="attribution: the most neurons one text may take.")
@click.option("--contrast", type=FiniteFloat(0), default=DEFAULTS.contrast, show_default=True,
              help="attribution with --score gradient or both: subtract this times the neighbours' gradient "
                   "from the text's.")
@click.option("--score", type=click.Choice(ATTRIBUTION_SCORES), default=DEFAULTS.score, show_default=True,
              help="attribution: how a text ranks the neurons. specific-smoothed (the best measured, "
                   "docs/results.md): the neuron's mean |activation| on the text over its mean on the other "
                   "forget texts and the neighbours plus its layer's mean there, so neurons silent everywhere "
                   "do not rank high on noise; specific: the same ratio without the layer's mean; gradient: "
                   "-dCE/ds at s = 1 (it ranks neurons every text needs first); both: the positive gradient "
                   "times the specific ratio.")
@click.option("--shrink-rounds", type=click.IntRange(0), default=DEFAULTS.shrink_rounds, show_default=True,
              help="attribution: rounds in which each text's prefix is cut to the shortest that still reaches "
                   "the stop beside the other texts' neurons (the union forgets each text further than its own "
                   "prefix did), while every text still passes.")
@click.option("--prune/--no-prune", default=DEFAULTS.prune, show_default=True,
              help="When the early stop fires, keep only the smallest set of most-closed gates that still "
                   "passes the check (bisection, a pass over the forget texts per probe) and reopen the rest.")
@click.option("--complete/--no-complete", default=DEFAULTS.complete, show_default=True,
              help="With --base, when --epochs run out before every text passes the check: revert, after the "
                   "trained gates, the neurons whose gates stayed open, those the fine-tune changed most first, as "
                   "few as pass (bisection; a full rollback of the changed neurons is the last resort); also when "
                   "training stalls (--patience).")
@click.option("--patience", type=click.IntRange(1), default=DEFAULTS.patience, show_default=True,
              help="With --base and --complete: stop training after N checks in a row that do not shrink the "
                   "forget texts' summed MA above their limits by 1 % of the best check so far, and complete.")
@quiet_option
def localize_cmd(input_path, output, base, layers, reference_path, reference_limit, reference_model, tolerance,
                 stop_ma, stop_el, target_ma, model, load, **training):
    """Train one gate per FFN neuron so that the forget texts become unlikely.

    INPUT holds records with "text" and "neighbors" (from `neumuter neighbors`). Every model
    weight stays frozen; only the gates train. The output is a mask file (log_alpha per
    gated block plus the model fingerprint, every hyper-parameter, the sha256 of the forget
    texts and the final losses) for `neumuter select`. Progress goes to stderr.

    With --base, a gate moves its neuron toward BASE's weights instead of scaling it, only the
    neurons the fine-tune changed get gates, and BASE is the yardstick. When training stalls
    or the epochs run out before every text passes, --complete reverts the neurons the
    fine-tune changed most until they do (docs/method.md).
    """
    from .artifacts import save_artifact
    from .localize import run_localize
    from .records import check_output, display_name, read_records
    from .results import UNSEEN_WHY, check_disjoint

    if output == "-" and is_terminal(sys.stdout):
        raise click.UsageError("refusing to write a binary mask to a terminal: use -o FILE or a pipe")
    if input_path == "-" and is_terminal(sys.stdin):
        raise NeumuterError("no input: give a JSONL file or pipe one into stdin")
    if stop_el is not None and reference_path is None and stop_ma is None:
        raise click.UsageError("--stop-el needs --stop-ma or --reference")
    if reference_model is not None and (reference_path is not None or stop_ma is not None or stop_el is not None):
        raise click.UsageError("give --reference-model or --reference/--stop-ma/--stop-el, not both")
    check_output(output, inputs=(input_path, reference_path))
    records = read_records(input_path, require=("text", "neighbors"))
    # read before the model loads, so that a bad file fails in a second, not after the load
    reference_texts = ([r["text"] for r in read_records(reference_path)]
                       if reference_path is not None and stop_ma is None else None)
    if reference_texts:
        check_disjoint(records, [r["text"] for r in records], reference_texts[:reference_limit],
                       display_name(input_path), reference_path, UNSEEN_WHY)
    stop = StopRule(reference_model, tolerance, reference_texts, reference_limit, stop_ma, stop_el, target_ma, load,
                    trust_remote_code_reference=training.pop("trust_remote_code_reference"))
    if base is not None:            # rollback's own defaults where the command line is silent
        from click.core import ParameterSource

        ctx = click.get_current_context()
        training.update({name: value for name, value in ROLLBACK_DEFAULTS.items()
                         if ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE})
    lm, tokenizer = load_lm(model, load)
    run = run_localize(lm, tokenizer, records, LocalizeConfig(**training), layers, stop, reporter(), base=base)
    if distributed.is_main():
        save_artifact(run.tensors, run.metadata, output)
    report_localized(run)


def report_localized(run) -> None:
    """The last lines of `localize`: how training ended, and a warning when the mask as written
    still leaves forget texts above their stopping point."""
    result, last = run.result, run.last_check
    completed = (result.pruned or {}).get("completed")
    how = "stopped: every forget text below the thresholds" if result.stopped_early else "done"
    if completed is not None or "open" in (result.pruned or {}):
        how = "training stalled" if result.stopped_early else "training ended"
    progress(f"{how} after {result.epochs_run} epochs, {result.seconds:.1f}s")
    if completed:
        progress(f"completed: {completed} more neurons reverted (the most changed of the {result.pruned['open']} whose "
                 "gates stayed open) for every forget text to pass")
    if last and (last["above"] or last["el_above"]):
        progress(f"warning: {last['above'] or last['el_above']} of {last['records']} forget texts are still above "
                 f"the {'MA' if last['above'] else 'EL_10'} threshold at the last check: train longer (--epochs), "
                 "or push harder (--eta 0, --target-ma 0); measure the result before you rely on it")


@cli.command("relearn")
@click.argument("input_path", default="-", metavar="[INPUT|-]")
@model_options
@click.option("--output", "-o", required=True, metavar="DIR",
              help="Checkpoint directory to write (save_pretrained + tokenizer + neumuter.json).")
@click.option("--steps", type=click.IntRange(1), default=RELEARN_DEFAULTS.steps, show_default=True,
              help="Optimiser steps, exactly (the texts are cycled through as often as needed).")
@click.option("--lr", type=FiniteFloat(0, min_open=True), default=RELEARN_DEFAULTS.lr, show_default=True,
              help="Adam learning rate (constant). Relearning attacks in the literature use 1e-5 to 1e-4 "
                   "on 100M-7B models; the default sits between.")
@click.option("--batch-size", type=click.IntRange(1), default=RELEARN_DEFAULTS.batch_size, show_default=True,
              help="Texts per optimiser step; under torchrun, the whole step's, split over the processes.")
@click.option("--layers", default=None, metavar="SPEC",
              help="Train only the weights of these decoder blocks, e.g. 20-29 (as `localize --layers`; "
                   "default: every weight of the model, embeddings included).")
@click.option("--first-halves", is_flag=True, default=False,
              help="Train on the first half (by tokens, of the first --max-length) of each text instead of "
                   "the whole text: the usual attack, which then looks whether the second halves come back.")
@click.option("--max-length", type=click.IntRange(2), default=RELEARN_DEFAULTS.max_length, show_default=True,
              help="Cut every text to its first N tokens.")
@click.option("--seed", type=SEED, default=RELEARN_DEFAULTS.seed, show_default=True,
              help="Seed of the data order: the same seed gives the same weights.")
@click.option("--force", is_flag=True, default=False,
              help="Replace DIR when it holds a previous neumuter checkpoint (and nothing else). A folder "
                   "holding anything else is never replaced.")
@quiet_option
def relearn_cmd(input_path, model, load, output, steps, lr, batch_size, layers, first_halves, max_length, seed,
                force):
    """Fine-tune a model on texts for a few steps: the relearning attack, to red-team your own unlearning.

    Unlearning that only hides a memory is undone by a little fine-tuning on related text, for
    instance the first halves of the forgotten texts: the rest comes back. A model that never
    saw the texts learns them no faster than from scratch. So relearn the muted model and a
    reference model that never saw the texts with the same steps, and compare the forget
    texts' MA afterwards:

    \b
      neumuter relearn forget.jsonl --first-halves --model muted/ --steps 20 -o relearned/
      neumuter measure forget.jsonl --model relearned/ --reference-model REF

    (and the same relearn of REF itself, to see how much a never-seen model gains).

    Reads records (JSONL with "text"; INPUT or - / nothing: stdin) and trains for exactly
    --steps Adam steps (no weight decay, constant learning rate, no warm-up, dropout off) on
    next-token cross-entropy, --batch-size texts per step, taken in a seeded random order that
    is reshuffled at every pass over the records. Half-precision weights are updated through
    float32 master copies. The result is written atomically to DIR as an ordinary checkpoint
    that `measure`, `localize` and `apply` read, with neumuter.json: the steps, learning rate,
    batch size, blocks, seed, every step's loss, the sha256 of the texts trained on and the
    source checkpoint's own records. Progress (step, loss) goes to stderr.

    A step whose loss is not finite stops the run, and so does a model that computes a NaN
    or infinite loss (or holds a non-finite weight) after the last step: nothing is written.
    A text longer than the model's context at --max-length is refused before training.
    """
    from .relearn import run_relearn

    config = RelearnConfig(steps=steps, lr=lr, batch_size=batch_size, layers=layers, max_length=max_length, seed=seed)
    follow_transformers()
    result = run_relearn(model, input_path, output, config, first_halves, force, load, reporter())
    progress(f"{result.steps} steps in {result.seconds:.1f}s: loss {result.losses[0]:.4f} -> "
             f"{result.losses[-1]:.4f} (first and last batch); checkpoint written to {escape(output)}")


@cli.command("quantize")
@model_options
@click.option("--type", "qtype", type=click.Choice(list(QUANT_TYPES), case_sensitive=False), required=True,
              help="The llama.cpp block format every linear weight of the decoder blocks goes through.")
@click.option("--output", "-o", required=True, metavar="DIR",
              help="Checkpoint directory to write (save_pretrained + tokenizer + neumuter.json).")
@click.option("--force", is_flag=True, default=False,
              help="Replace DIR if it holds a previous neumuter checkpoint (and nothing else).")
@quiet_option
def quantize_cmd(model, load, qtype, output, force):
    """Write the model as llama.cpp would run it: every block weight quantised and back.

    Each linear weight inside the decoder blocks (attention and FFN projections; not the
    embeddings, the LM head or the norms) goes through the --type block format and back with
    the gguf package's own quantisers, exactly as `measure --quantize` does, and the result is
    saved as an ordinary float checkpoint. Use it to see what you deploy, or to unlearn on the
    weights you will deploy when quantising brings forgotten text back:

    \b
      neumuter quantize -m LM --type q4_0 -o lm-q4/
      neumuter localize nb.jsonl -m lm-q4/ --reference-model REF -o mask.safetensors
      neumuter select mask.safetensors | neumuter apply -m lm-q4/ -o muted/
      neumuter measure forget.jsonl -m muted/ --reference-model REF --quantize q4_0
    """
    from .quantize import run_quantize

    follow_transformers()
    summary = run_quantize(model, qtype, output, force, load, reporter())
    progress(f"{summary['weights']} block weights ({summary['elements']:,} values) through {summary['type']}"
             + (f", {len(summary['skipped'])} left as they are" if summary["skipped"] else "")
             + f"; checkpoint written to {escape(output)}")


def main():
    """The console entry (`neumuter`, `python -m neumuter_cli`)."""
    cli(prog_name="neumuter")


if __name__ == "__main__":
    main()
