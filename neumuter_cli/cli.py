"""The `neumuter` command line: one thin command per stage. Options, streams, exit codes."""
from __future__ import annotations

import functools
import sys

import click
from tabulate import tabulate

from . import NeumuterError, __version__
# torch-free: the options and --help are built from these defaults; the stages themselves (and
# torch, transformers) are imported inside the commands, so that --help and completion are instant
from .config import FORGET_TERMS, LocalizeConfig, NeighborsConfig
from .errors import NonFiniteLoss, SettingError

DEFAULTS = LocalizeConfig()
NEIGHBORS = NeighborsConfig()


class NeumuterCommand(click.Command):
    """Words the library's errors with this command's flags: a SettingError names a library
    parameter (``top_k``), the user gave an option (``--top-k``)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SettingError as exc:
            flag = self.flag(exc.setting)
            raise NeumuterError(f"{flag} {exc.problem}" if flag else str(exc)) from None
        except NonFiniteLoss as exc:
            lr, dtype = self.flag("lr"), self.flag("dtype")
            raise NeumuterError(f"{exc}; try a smaller {lr} or {dtype} float32" if lr and dtype else str(exc)) from None

    def flag(self, setting: str) -> str | None:
        """The option that sets the library parameter ``setting`` (its long form), if any."""
        for param in self.params:
            if isinstance(param, click.Option) and param.name == setting.replace("-", "_"):
                return next((opt for opt in param.opts if opt.startswith("--")), param.opts[0])
        return None


class NeumuterGroup(click.Group):
    """Turns NeumuterError into one clear line on stderr and exit status 1."""

    command_class = NeumuterCommand

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NeumuterError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=NeumuterGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="neumuter")
def cli():
    """Make a causal language model forget specific training texts.

    NeuMuter trains one Hard-Concrete gate per FFN neuron to find the few neurons that hold
    the memory of the forget texts, then scales exactly those neurons, folded into the
    weights. The stages read and write plain files and pipe into each other:

    \b
      neumuter neighbors forget.jsonl --mlm MLM > nb.jsonl
      neumuter localize nb.jsonl --model LM > mask.safetensors
      neumuter select mask.safetensors > scales.safetensors
      neumuter apply scales.safetensors --model LM -o muted/
      neumuter measure forget.jsonl --model muted/ --reference unseen.jsonl

    Data goes to stdout or -o; progress and summaries go to stderr.
    """


def model_options(func):
    """--model and the options that say how to load it, shared by every command that loads an LM."""
    @click.option("--model", "-m", "model", required=True, metavar="NAME_OR_PATH",
                  help="Causal LM: a local checkpoint directory, a hub name, or a .gguf file.")
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto",
                  show_default=True, help="Where to run (auto: cuda, then mps, then cpu).")
    @click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                  show_default=True, help="Weight dtype (auto: float32 on CPU, the checkpoint's own on a GPU).")
    @click.option("--device-map", type=click.Choice(["auto"]), default=None,
                  help="Spread a model too large for one GPU over all GPUs (needs accelerate).")
    @click.option("--trust-remote-code", is_flag=True, default=False,
                  help="Allow model code from the checkpoint's repository to run.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)
    return wrapper


def load_lm(model, device, dtype, device_map, trust_remote_code):
    from .models import load_model

    progress(f"loading {model}")
    return load_model(model, device=device, dtype=dtype, device_map=device_map,
                      trust_remote_code=trust_remote_code)


def progress(message: str) -> None:
    click.echo(message, err=True)


@cli.command()
@model_options
def inspect(model, device, dtype, device_map, trust_remote_code):
    """Show each decoder block's FFN down-projection and its neuron count.

    Use the block numbers with `localize --layers`.
    """
    from .models import find_ffn_layers

    lm, _ = load_lm(model, device, dtype, device_map, trust_remote_code)
    layers = find_ffn_layers(lm)
    rows = [[layer.index, layer.path, layer.neurons, layer.orientation] for layer in layers]
    total = sum(layer.neurons for layer in layers)
    click.echo(tabulate(rows, headers=["block", "down-projection", "neurons", "weight"]))
    click.echo(f"\n{len(layers)} blocks, {total} FFN neurons ({lm.config.model_type}, "
               f"{str(next(lm.parameters()).dtype).replace('torch.', '')})")


@cli.command("select")
@click.argument("mask", default="-", metavar="[MASK|-]")
@click.option("--output", "-o", default="-", show_default=True, metavar="SCALES|-",
              help="Where to write the scales file (safetensors); - is stdout.")
@click.option("--energy", type=float, default=None, metavar="F",
              help="Energy rule (the default, F = 0.05): sort all gate values ascending, "
                   "accumulate |m|; eps = the first value at which the sum reaches F of the total; "
                   "select the neurons with m < eps.")
@click.option("--threshold", type=float, default=None, metavar="X",
              help="Select the neurons whose gate value is below X (the public code's cut: 0.15).")
@click.option("--top-fraction", type=float, default=None, metavar="F",
              help="Select the floor(F x N) lowest gate values of all N masked neurons "
                   "(ties broken by block, then neuron index).")
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
    from .select import DEFAULT_RULE, MASK_KIND, check_rule, read_artifact, select_from_mask, summary_rows
    from .records import save_artifact

    given = [(name, value) for name, value in
             (("energy", energy), ("threshold", threshold), ("top-fraction", top_fraction)) if value is not None]
    if len(given) > 1:
        raise click.UsageError("give at most one of --energy, --threshold, --top-fraction")
    rule, value = given[0] if given else DEFAULT_RULE
    check_rule(rule, value)
    tensors, meta, digest = read_artifact(mask, kind=MASK_KIND)
    name = "<stdin>" if mask == "-" else mask
    scales, metadata = select_from_mask(tensors, meta, rule, value, mask_sha256=digest, name=name)
    save_artifact(scales, metadata, output)
    click.echo(tabulate(summary_rows(metadata), headers=["block", "down-projection", "neurons", "selected", "%"]),
               err=True)
    epsilon = metadata["epsilon"]
    cut = "none selected" if epsilon is None else f"eps = {epsilon:.6g}"
    progress(f"rule {rule} {value:g}: {cut}; {metadata['selected']} of {metadata['total_neurons']} "
             f"masked neurons selected ({100 * metadata['selected'] / metadata['total_neurons']:.2f} %)")


@cli.command("apply")
@click.argument("scales", default="-", metavar="[SCALES|-]")
@model_options
@click.option("--output", "-o", required=True, metavar="DIR",
              help="Checkpoint directory to write (save_pretrained + tokenizer + neumuter.json).")
@click.option("--force", is_flag=True, default=False, help="Replace DIR if it exists and is not empty.")
def apply_cmd(scales, model, device, dtype, device_map, trust_remote_code, output, force):
    """Fold a scales file into the model and save an ordinary checkpoint.

    Each selected neuron's scale multiplies its column of the FFN down-projection (a row for
    GPT-2's Conv1D); nothing else changes. The result loads with plain
    AutoModelForCausalLM.from_pretrained and gives the gated model's logits. The scales must
    have been made for this very model (its fingerprint is checked); a muted checkpoint can
    be the --model of a later request. With --dtype auto the checkpoint keeps its stored
    dtype; a .gguf model is written as a float32 checkpoint. DIR is written atomically.
    """
    from .apply import apply_scales_file, check_output_dir, checkpoint_dtype
    from .select import SCALES_KIND, read_artifact

    check_output_dir(output, force)
    tensors, meta, digest = read_artifact(scales, kind=SCALES_KIND)
    if dtype == "auto":
        dtype = checkpoint_dtype(model) or "auto"
    lm, tokenizer = load_lm(model, device, dtype, device_map, trust_remote_code)
    name = "<stdin>" if scales == "-" else scales
    record = apply_scales_file(lm, tokenizer, tensors, meta, output, scales_sha256=digest, force=force, name=name)
    rows = [[b, record["modules"][b], n] for b, n in record["neurons_scaled_per_layer"].items()]
    click.echo(tabulate(rows, headers=["block", "down-projection", "neurons scaled"]), err=True)
    progress(f"{record['neurons_scaled']} of {record['total_neurons']} FFN neurons scaled; "
             f"checkpoint written to {output}")


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


def _records_or_none(path):
    from .records import read_records

    try:
        return read_records(path)
    except NeumuterError as exc:
        if str(exc).endswith("no records (empty input)"):
            return []
        raise


@cli.command("measure")
@click.argument("input_path", default="-", metavar="[INPUT|-]")
@model_options
@click.option("--max-length", type=click.IntRange(2), default=200, show_default=True,
              help="Cut every text to its first N tokens (the benchmark's sample length).")
@click.option("--el-n", "el_ns", multiple=True, default=("10",), show_default=True, callback=_el_sizes,
              metavar="N[,N..]", help="n of EL_n; several allowed (5,10 or repeat the option); 0 skips EL.")
@click.option("--reference", metavar="UNSEEN.jsonl",
              help="Texts the model never saw: their mean MA and EL_n are the thresholds (eq. 17) "
                   "and their mean loss the anchor of the MIA distance (B.3).")
@click.option("--thresholds", "thresholds_path", metavar="FILE.json",
              help="Thresholds measured before, instead of --reference: the output of "
                   "`measure UNSEEN.jsonl --format json` (its summary means are the thresholds), or an "
                   "object with \"ma\", \"el_N\" and \"loss\".")
@click.option("--check", is_flag=True, default=False,
              help="Exit 1 unless every record is forgotten (needs --reference or --thresholds).")
@click.option("--ppl", "ppl_path", metavar="CORPUS.jsonl",
              help="Also report the perplexity of these (long) texts, by windows.")
@click.option("--ppl-window", type=click.IntRange(2), default=None, metavar="N",
              help="Tokens per perplexity window [default: the model's context, at most 1024].")
@click.option("--ppl-stride", type=click.IntRange(1), default=None, metavar="N",
              help="How far each window moves [default: the window, i.e. non-overlapping windows that "
                   "score all their tokens but the first]; a smaller stride scores each token once "
                   "with more context.")
@click.option("--generations", "n_generations", type=click.IntRange(0), default=0, show_default=True,
              metavar="N", help="For the first N records, show the greedy continuation of the prefix "
                                "beside the true suffix and where they part (the paper's Table 14).")
@click.option("--prefix-tokens", type=click.IntRange(1), default=100, show_default=True,
              help="Prefix length for --generations.")
@click.option("--new-tokens", type=click.IntRange(1), default=100, show_default=True,
              help="Continuation length for --generations.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True,
              help="Sequences per forward pass (teacher forcing and lock-step generation).")
@click.option("--format", "fmt", type=click.Choice(["auto", "table", "jsonl", "json"]), default="auto",
              show_default=True, help="auto: table on a terminal, jsonl otherwise.")
@click.option("--output", "-o", default="-", show_default=True, metavar="FILE|-",
              help="Where the data goes (written atomically); - is stdout.")
def measure_cmd(input_path, model, device, dtype, device_map, trust_remote_code, max_length, el_ns,
                reference, thresholds_path, check, ppl_path, ppl_window, ppl_stride, n_generations, prefix_tokens,
                new_tokens, batch_size, fmt, output):
    """Measure how well a model remembers texts: MA, EL_n, loss; thresholds; MIA; perplexity.

    Reads records (JSONL with "text"; INPUT or - / nothing: stdin) and, per record, computes on
    its first --max-length tokens: MA (eq. 15, share of greedy next tokens equal to the true
    ones), EL_n (eq. 16, n-gram overlap of the greedy continuation of every prefix with the true
    suffix; exact, with prefix reuse and lock-step batches) and the mean token loss (nats).

    With --reference, the thresholds are the reference texts' mean MA and EL_n (eq. 17); a record
    is "forgotten" when its MA and every EL_n are at or below them. Its "mia_distance" is
    |loss - mean reference loss| (B.3); the summary gives the share within 0.5. Measuring the
    reference set is the slow part (the model never saw it, so nearly every prefix needs a real
    generation): save it once with `measure UNSEEN.jsonl --format json -o ref.json` and pass
    --thresholds ref.json afterwards.

    --ppl adds the perplexity of a corpus (each text cut into windows, see --ppl-window and
    --ppl-stride) to the summary; with --ppl, INPUT may be left out.

    \b
    Output (the data goes to stdout or -o):
      jsonl  one line per record: every input key kept, plus tokens, ma, el_N,
             loss [, mia_distance, forgotten] [, generation]; the summary
             goes to stderr as a table (with no records: one summary line)
      json   one object {"records": [...], "summary": {...}}
      table  the per-record table, the summary and any generations
    Progress goes to stderr. With --check, exit status 1 unless every record is
    forgotten (the data is written first).
    """
    import json
    import time

    from .measure import (generation_lines, generations, mark, measure_ids, perplexity, read_thresholds,
                          record_label, results_table, summary_table, summarize, thresholds)
    from .records import atomic_output, dumps_record, read_records

    if reference and thresholds_path:
        raise click.UsageError("give --reference or --thresholds, not both")
    if check and not (reference or thresholds_path):
        raise click.UsageError("--check needs --reference or --thresholds (the thresholds come from it)")
    if fmt == "auto":
        fmt = "table" if output == "-" and sys.stdout.isatty() else "jsonl"
    if input_path == "-" and sys.stdin.isatty() and not ppl_path:
        raise NeumuterError("no input: give a JSONL file or pipe one into stdin")
    if input_path == "-" and ppl_path:   # perplexity alone: no records on stdin is fine
        records = [] if sys.stdin.isatty() else _records_or_none(input_path)
    else:
        records = read_records(input_path)
    if check and not records:
        raise NeumuterError("--check: no records to check")
    ref_records = read_records(reference) if reference else None
    limits = read_thresholds(thresholds_path, el_ns) if thresholds_path else None
    ppl_texts = [r["text"] for r in read_records(ppl_path)] if ppl_path else None

    last = [0.0]

    def throttled(message):
        now = time.monotonic()
        if now - last[0] >= 2.0:
            last[0] = now
            progress(message)

    lm, tokenizer = load_lm(model, device, dtype, device_map, trust_remote_code)

    def measure_set(recs, name):
        from .measure import encode

        ids = encode(tokenizer, [r["text"] for r in recs], max_length)
        for k, (r, x) in enumerate(zip(recs, ids)):
            if len(x) < 2:
                raise NeumuterError(f"{name}: record {record_label(r, k)} has {len(x)} token(s); "
                                    "at least 2 are needed to measure it")
        progress(f"measuring {len(recs)} records of {name} ({sum(map(len, ids))} tokens)")
        return measure_ids(lm, ids, el_ns, batch_size, throttled)

    results = measure_set(records, "<stdin>" if input_path == "-" else input_path) if records else []
    if ref_records is not None:
        limits = thresholds(measure_set(ref_records, reference), el_ns)
    if limits is not None:
        mark(results, limits, el_ns)
    out_records = [{**record, **result} for record, result in zip(records, results)]
    if n_generations and records:
        progress(f"generating {min(n_generations, len(records))} continuations")
        gens = generations(lm, tokenizer, [r["text"] for r in records[:n_generations]],
                           prefix_tokens, new_tokens, batch_size)
        for record, gen in zip(out_records, gens):
            record["generation"] = gen
    summary = summarize(results, el_ns, limits) if results else {}
    if ppl_texts is not None:
        summary["perplexity"] = perplexity(lm, tokenizer, ppl_texts, ppl_window, ppl_stride, batch_size, throttled)

    with atomic_output(output, "w") as out:
        if fmt == "jsonl":
            for record in out_records:
                out.write(dumps_record(record) + "\n")
            if not out_records:                 # --ppl alone: the summary is the data
                out.write(json.dumps({"summary": summary}) + "\n")
        elif fmt == "json":
            out.write(json.dumps({"records": out_records, "summary": summary}, ensure_ascii=False, indent=2) + "\n")
        else:
            parts = [results_table(out_records, el_ns)] if out_records else []
            parts.append(summary_table(summary, el_ns))
            styled = output == "-" and sys.stdout.isatty()
            lines = generation_lines(out_records, click.style if styled else None)
            if lines:
                parts.append("\n".join(lines))
            out.write("\n\n".join(parts) + "\n")
    if fmt == "jsonl":
        click.echo(summary_table(summary, el_ns), err=True)
    if check:
        missed = [record_label(r, k) for k, r in enumerate(out_records) if not r["forgotten"]]
        if missed:
            shown = ", ".join(missed[:10]) + (", ..." if len(missed) > 10 else "")
            click.echo(f"check failed: {len(missed)} of {len(out_records)} records are not forgotten ({shown})",
                       err=True)
            sys.exit(1)
        progress(f"check passed: all {len(out_records)} records are forgotten")


@cli.command("neighbors")
@click.argument("input_path", default="-", metavar="[INPUT|-]")
@click.option("--mlm", required=True, metavar="NAME_OR_PATH",
              help="Masked LM (BERT-style) that writes the neighbours: a local directory or a hub name.")
@click.option("-k", "--count", "k", type=click.IntRange(1), default=NEIGHBORS.k, show_default=True, metavar="K",
              help="Neighbours per record.")
@click.option("-r", "--ratio", type=click.FloatRange(0, 1, min_open=True), default=NEIGHBORS.ratio,
              show_default=True, metavar="R",
              help="Proportion of the MLM tokens to rewrite, 0 < R <= 1; 1 rewrites every token.")
@click.option("--temperature", type=click.FloatRange(0), default=NEIGHBORS.temperature, show_default=True,
              metavar="T", help="0: the argmax (greedy; at R = 1 all K neighbours of a record are then the same); "
                                "T > 0: sample from softmax(logits / T).")
@click.option("--top-k", type=click.IntRange(0), default=NEIGHBORS.top_k, show_default=True, metavar="N",
              help="When sampling, draw from the N most likely tokens only; 0: no limit.")
@click.option("--seed", type=int, default=NEIGHBORS.seed, show_default=True,
              help="Seed of the position choice and the sampling: same input, options and seed "
                   "give the same output, whatever the batch size.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto",
              show_default=True, help="Where to run the MLM (auto: cuda, then mps, then cpu).")
@click.option("--batch-size", type=click.IntRange(1), default=NEIGHBORS.batch_size, show_default=True,
              metavar="N", help="Sequences (records x neighbours) advanced by one MLM call.")
@click.option("--output", "-o", default="-", show_default=True, metavar="FILE|-",
              help="Where the records go (written atomically); - is stdout.")
def neighbors_cmd(input_path, mlm, k, ratio, temperature, top_k, seed, device, batch_size, output):
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
    from .records import atomic_output, dumps_record, iter_records

    if input_path == "-" and sys.stdin.isatty():
        raise NeumuterError("no input: give a JSONL file or pipe one into stdin")
    config = NeighborsConfig(k=k, ratio=ratio, temperature=temperature, top_k=top_k, batch_size=batch_size,
                             seed=seed)
    records = iter_records(input_path)
    first = next(records)  # a missing or malformed input fails before the MLM is loaded
    progress(f"loading {mlm}")
    writer = NeighborWriter(*load_mlm(mlm, device), config, progress=progress)
    if temperature == 0 and ratio == 1 and k > 1:
        progress(f"warning: with --temperature 0 and -r 1 the {k} neighbours of a record "
                 "are identical (use --temperature > 0 for distinct ones)")
    with atomic_output(output, "w") as out:
        for record in writer.records(itertools.chain([first], records)):
            out.write(dumps_record(record) + "\n")
            out.flush()
    progress(f"neighbors: {writer.rewrites} tokens rewritten in {writer.calls} MLM calls")


@cli.command("localize")
@click.argument("input_path", default="-", metavar="[INPUT|-]")
@model_options
@click.option("--output", "-o", default="-", show_default=True, metavar="MASK|-",
              help="Mask file to write (safetensors); - writes to stdout (not to a terminal).")
@click.option("--epochs", type=click.IntRange(1), default=DEFAULTS.epochs, show_default=True,
              help="Most epochs to train (fewer when --reference stops it early).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.lr, show_default=True,
              help="Adam learning rate of the gates' log_alpha.")
@click.option("--lambda", "kl_weight", type=click.FloatRange(min=0), default=DEFAULTS.kl_weight,
              show_default=True, help="Weight of the neighbour KL term (eq. 13's lambda).")
@click.option("--eta", "l0_weight", type=click.FloatRange(min=0), default=DEFAULTS.l0_weight,
              show_default=True, help="Weight of the L0 term R(M) (eq. 13's eta).")
@click.option("--beta", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.beta,
              show_default=True, help="Hard-Concrete temperature.")
@click.option("--forget-term", type=click.Choice(FORGET_TERMS), default=DEFAULTS.forget_term,
              show_default=True,
              help="hinge: push each still-correct forget token below the best other token by "
                   "--margin logits, then stop; bounded: the public code's ascent, bounded by "
                   "--max-forget-loss; ascent: the paper's plain -L_f (no bound).")
@click.option("--max-forget-loss", type=float, default=DEFAULTS.max_forget_loss, show_default=True,
              help="Bound of --forget-term bounded, in nats: ascend below it, descend above it.")
@click.option("--margin", type=float, default=DEFAULTS.margin, show_default=True,
              help="Margin of --forget-term hinge, in logits.")
@click.option("--target-ma", type=click.FloatRange(0, 1), default=None,
              help="With --forget-term hinge, a forget text whose MA (under the training gates) is at "
                   "or below this stops pulling, so no more is broken than needed [default: half the "
                   "MA threshold with --reference/--stop-ma, else 0].")
@click.option("--layers", default=None, metavar="SPEC",
              help="Blocks to gate, e.g. 10-16,21 (default: all; see `neumuter inspect`).")
@click.option("--max-length", type=click.IntRange(2), default=DEFAULTS.max_length, show_default=True,
              help="Tokens of each text (and neighbour) used.")
@click.option("--batch-size", type=click.IntRange(1), default=DEFAULTS.batch_size, show_default=True,
              help="Forget texts per optimiser step (their neighbours go in the same forward pass).")
@click.option("--kl-top-k", type=click.IntRange(0), default=DEFAULTS.kl_top_k, show_default=True,
              help="Keep the original distribution as its top-k log-probs plus one bucket for the "
                   "rest of the vocabulary (0: the full vocabulary).")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True, help="Seed of the gate noise.")
@click.option("--reference", "reference_path", default=None, metavar="JSONL",
              help="Texts the model never saw: their average MA is eq. 17's MA threshold, and "
                   "training stops as soon as every forget text is at or below it with the "
                   "neurons that `select` (default rule) would choose; checked every "
                   "--check-every epochs. Verify EL with `neumuter measure` afterwards.")
@click.option("--reference-limit", type=click.IntRange(1), default=200, show_default=True,
              help="Reference texts used for the thresholds (the first N).")
@click.option("--stop-ma", type=float, default=None, help="MA threshold for the early stop (overrides --reference).")
@click.option("--stop-el", type=float, default=None, help="EL_10 threshold for the early stop (overrides --reference).")
@click.option("--check-every", type=click.IntRange(1), default=DEFAULTS.check_every, show_default=True,
              help="Epochs between two early-stop checks.")
def localize_cmd(input_path, model, device, dtype, device_map, trust_remote_code, output, epochs, lr,
                 kl_weight, l0_weight, beta, forget_term, max_forget_loss, margin, target_ma, layers, max_length,
                 batch_size, kl_top_k, seed, reference_path, reference_limit, stop_ma, stop_el, check_every):
    """Train one gate per FFN neuron so that the forget texts become unlikely.

    INPUT holds records with "text" and "neighbors" (from `neumuter neighbors`). Every model
    weight stays frozen; only the gates train. The output is a mask file (log_alpha per
    gated block plus the model fingerprint, every hyper-parameter, the sha256 of the forget
    texts and the final losses) for `neumuter select`. Progress goes to stderr.
    """
    import torch

    from .localize import LocalizeConfig, forgetting_check, localize, mask_artifact
    from .models import find_ffn_layers, parse_layers
    from .records import read_records, save_artifact

    if output == "-" and sys.stdout.isatty():
        raise click.UsageError("refusing to write a binary mask to a terminal: use -o FILE or a pipe")
    records = read_records(input_path, require=("text", "neighbors"))
    if stop_el is not None and reference_path is None and stop_ma is None:
        raise click.UsageError("--stop-el needs --stop-ma or --reference")
    # read before the model loads, so that a bad file fails in a second, not after the load
    reference_texts = None
    if reference_path is not None and stop_ma is None:
        reference_texts = [r["text"] for r in read_records(reference_path)][:reference_limit]
    config = LocalizeConfig(epochs=epochs, lr=lr, kl_weight=kl_weight, l0_weight=l0_weight, beta=beta,
                            forget_term=forget_term, max_forget_loss=max_forget_loss, margin=margin,
                            max_length=max_length, batch_size=batch_size, kl_top_k=kl_top_k, seed=seed,
                            check_every=check_every)
    torch.manual_seed(seed)
    lm, tokenizer = load_lm(model, device, dtype, device_map, trust_remote_code)
    layers_all = find_ffn_layers(lm)
    chosen = [layers_all[i] for i in parse_layers(layers, len(layers_all))]
    limits = _stop_limits(lm, tokenizer, reference_texts, stop_ma, stop_el, max_length)
    if target_ma is not None:
        config.target_ma = target_ma
    elif limits is not None:
        config.target_ma = limits["ma"] / 2
    check = None
    if limits is not None:
        check = forgetting_check(lm, tokenizer, records, layers_all, limits, max_length, progress=progress)
    progress(f"localize: {len(records)} forget texts, "
             f"{sum(len(r['neighbors']) for r in records)} neighbours, "
             f"{sum(layer.neurons for layer in chosen)} gates in {len(chosen)} blocks")
    result = localize(lm, tokenizer, records, chosen, config, check=check, progress=progress)
    tensors, metadata = mask_artifact(lm, layers_all, result, config, records, stop=limits)
    save_artifact(tensors, metadata, output)
    how = "stopped: every forget text below the thresholds" if result.stopped_early else "done"
    progress(f"{how} after {result.epochs_run} epochs, {result.seconds:.1f}s")
    last = check.last if check is not None else None
    if last and (last["above"] or last["el_above"]):
        still = last["above"] or last["el_above"]
        progress(f"warning: {still} of {last['records']} forget texts are still above the "
                 f"{'MA' if last['above'] else 'EL_10'} threshold at the last check: train longer (--epochs), "
                 "or push harder (--eta 0, --target-ma 0); measure the result before you rely on it")


def _stop_limits(lm, tokenizer, reference_texts, stop_ma, stop_el, max_length):
    """Thresholds for the early stop: --stop-ma/--stop-el, else the MA threshold measured on
    the --reference texts (teacher-forced, cheap; EL_10 is only checked when --stop-el gives it)."""
    if reference_texts is None and stop_ma is None:
        return None
    limits = {}
    if stop_ma is None:
        from .measure import encode, memorization_accuracy

        texts = reference_texts
        values = memorization_accuracy(lm, encode(tokenizer, texts, max_length))
        limits["ma"] = sum(values) / len(values)
        progress(f"MA threshold {limits['ma']:.4f} (mean over {len(texts)} reference texts)")
    else:
        limits["ma"] = stop_ma
    if stop_el is not None:
        limits["el_10"] = stop_el
    progress(f"early stop when every forget text has MA <= {limits['ma']:.4f}"
             + (f" and EL_10 <= {stop_el:.4f}" if stop_el is not None else ""))
    return limits


def main():
    """The console entry (`neumuter`, `python -m neumuter_cli`)."""
    cli(prog_name="neumuter")


if __name__ == "__main__":
    main()
