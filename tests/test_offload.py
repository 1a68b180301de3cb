"""`--device-map auto` with a `--max-memory` that does not hold the model: accelerate keeps part
of it on disk (here, on a CPU-only machine, the CPU holds the rest). The gates get their
gradient in every block, and localize, measure (with a quantisation round trip) and apply give
the same bytes as with the whole model loaded."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from helpers import PEOPLE, save_tiny
from neumuter_cli import NeumuterError
from neumuter_cli.cli import cli
from neumuter_cli.models import find_ffn_layers, fingerprint, gated, load_model
from neumuter_cli.offload import parse_max_memory

pytest.importorskip("accelerate")
NEIGHBOURS = ["Zed Quinn lives at 90 Hill Street and his phone number is 555-0101."]


def run(args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory):
    """A tiny 4-block GPT-Neo, and a --max-memory under which accelerate keeps the embeddings and
    the first blocks on the CPU and the last blocks on disk (twice the weights' bytes: accelerate
    keeps room for the largest layer besides)."""
    path = tmp_path_factory.mktemp("four-blocks")
    model, _ = save_tiny(path, "gpt_neo", layers=4)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return str(path), f"cpu={2 * size}"


@pytest.fixture(scope="module")
def offloaded(four_blocks):
    path, limit = four_blocks
    model, tokenizer = load_model(path, device_map="auto", max_memory=parse_max_memory(limit))
    where = {name: device for name, device in model.hf_device_map.items() if ".h." in f".{name}"}
    assert "cpu" in where.values() and "disk" in where.values(), (
        f"the test needs blocks on the CPU and on disk; accelerate made {model.hf_device_map}")
    return model, tokenizer


def test_max_memory_specs():
    assert parse_max_memory("0=20GiB, 1=1.5GB,cpu=64MiB") == {0: 20 * 2**30, 1: 1_500_000_000, "cpu": 64 * 2**20}
    assert parse_max_memory("cpu=1000") == {"cpu": 1000}
    for bad, message in (("cpu", "DEVICE=SIZE"), ("gpu=1GB", "not a device"), ("cpu=1XB", "DEVICE=SIZE"),
                         ("cpu=1GB,cpu=2GB", "twice"), ("", "no DEVICE=SIZE")):
        with pytest.raises(NeumuterError, match=message):
            parse_max_memory(bad)


def test_max_memory_is_a_usage_error_without_a_device_map(four_blocks, tmp_path):
    path, limit = four_blocks
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"text": PEOPLE[0]}) + "\n")
    result = run(["measure", records, "-m", path, "--max-memory", limit])
    assert result.exit_code == 2 and "--max-memory needs --device-map auto" in result.output
    result = run(["measure", records, "-m", path, "--device-map", "auto", "--max-memory", "cpu=lots"])
    assert result.exit_code == 2 and "DEVICE=SIZE" in result.output


def test_every_gate_gets_its_gradient_through_offloaded_blocks(four_blocks, offloaded):
    whole, tokenizer = load_model(four_blocks[0], device="cpu")
    ids = torch.tensor([tokenizer(PEOPLE[0])["input_ids"]])
    grads = []
    for model in (whole, offloaded[0]):
        layers = find_ffn_layers(model)
        gates = [torch.ones(layer.neurons, requires_grad=True) for layer in layers]
        with gated(layers, lambda i: gates[i]):
            logits = model(input_ids=ids).logits[0, :-1]
        F.cross_entropy(logits, ids[0, 1:]).backward()
        grads.append([g.grad for g in gates])
    for block, (expected, got) in enumerate(zip(*grads)):
        assert got is not None and got.abs().sum() > 0, block
        assert torch.equal(expected, got), block
    assert fingerprint(offloaded[0]) == fingerprint(whole)


def test_localize_measure_and_apply_give_the_same_bytes_with_offload(four_blocks, tmp_path):
    path, limit = four_blocks
    records = tmp_path / "nb.jsonl"
    records.write_text("".join(json.dumps({"id": f"p{i}", "text": t, "neighbors": NEIGHBOURS}) + "\n"
                               for i, t in enumerate(PEOPLE)))
    ways = {"whole": ["--device", "cpu"], "offloaded": ["--device-map", "auto", "--max-memory", limit]}
    for name, load in ways.items():
        result = run(["localize", records, "-m", path, *load, "--epochs", 3, "--batch-size", 4,
                      "-o", tmp_path / f"{name}.mask"])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "whole.mask").read_bytes() == (tmp_path / "offloaded.mask").read_bytes()
    assert run(["select", tmp_path / "whole.mask", "--top-fraction", 0.3, "-o", tmp_path / "scales"]).exit_code == 0
    for name, load in ways.items():
        result = run(["apply", tmp_path / "scales", "-m", path, *load, "-o", tmp_path / name])
        assert result.exit_code == 0, result.output
        assert "neurons scaled" in result.stderr
    whole, offloaded = tmp_path / "whole", tmp_path / "offloaded"
    assert sorted(p.name for p in whole.iterdir()) == sorted(p.name for p in offloaded.iterdir())
    for file in whole.iterdir():
        assert file.read_bytes() == (offloaded / file.name).read_bytes(), file.name
    scaled = json.loads((whole / "neumuter.json").read_text())["neurons_scaled_per_layer"]
    assert int(scaled.get("3", 0)) > 0                # a block that was on disk was changed
    for name, load in ways.items():
        result = run(["measure", records, "-m", tmp_path / "whole", *load, "--el-n", 5, "--quantize", "q8_0",
                      "--format", "json", "-o", tmp_path / f"{name}.json"])
        assert result.exit_code == 0, result.output
    measured = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ways]
    assert measured[0]["summary"]["quantized"].pop("seconds") >= 0
    assert measured[1]["summary"]["quantized"].pop("seconds") >= 0     # the only difference: time taken
    assert measured[0] == measured[1] and measured[0]["summary"]["quantized"]["weights"] > 0
