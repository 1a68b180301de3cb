"""The `neumuter` command line: one thin command per stage. Options, streams, exit codes."""
from __future__ import annotations

import functools
import sys

import click
from tabulate import tabulate

from . import NeumuterError, __version__


class NeumuterGroup(click.Group):
    """Turns NeumuterError into one clear line on stderr and exit status 1."""

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


def main():  # pragma: no cover - console entry for `python -m neumuter_cli`
    cli(prog_name="neumuter")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
