"""`neumuter quantize`: the deployed weights as a checkpoint that every stage reads."""
import json

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from helpers import PEOPLE, train_memorizer
from neumuter_cli.cli import cli
from neumuter_cli.models import fingerprint, load_model


def test_quantize_writes_the_round_tripped_weights_and_says_so(tmp_path):
    source = tmp_path / "lm"
    train_memorizer(source, texts=PEOPLE[:2], steps=20, ffn=64)
    out = tmp_path / "lm-q8"
    result = CliRunner().invoke(cli, ["quantize", "-m", str(source), "--type", "Q8_0", "-o", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"checkpoint written to {out}" in result.stderr
    before, after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    block_weights = [k for k in before if ".h." in k and k.endswith(".weight") and before[k].dim() == 2]
    assert block_weights and all(not torch.equal(before[k], after[k]) for k in block_weights)
    for k in block_weights:   # q8_0: small, bounded changes
        assert (after[k] - before[k]).abs().max() <= before[k].abs().max() / 100
    untouched = [k for k in before if k not in block_weights]
    assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)
    record = json.loads((out / "neumuter.json").read_text())
    assert record["stage"] == "quantize" and record["quantization"]["type"] == "q8_0"
    assert record["quantization"]["weights"] == len(block_weights) and record["source_model"] == str(source)
    assert record["source_fingerprint"] == fingerprint(load_model(str(source), device="cpu")[0])
    assert record["fingerprint"] == fingerprint(load_model(str(out), device="cpu")[0]) != record["source_fingerprint"]
    measured = CliRunner().invoke(cli, ["measure", "-", "-m", str(out), "--el-n", "0", "--format", "json"],
                                  input=json.dumps({"text": PEOPLE[0]}) + "\n")
    assert measured.exit_code == 0, measured.output


def test_quantize_refuses_an_unknown_type_and_an_occupied_folder(tmp_path, tiny_neo_dir):
    bad = CliRunner().invoke(cli, ["quantize", "-m", tiny_neo_dir, "--type", "q3_k", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "Invalid value for '--type'" in bad.stderr
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "mine.txt").write_text("keep")
    result = CliRunner().invoke(cli, ["quantize", "-m", tiny_neo_dir, "--type", "q8_0", "-o", str(occupied)])
    assert result.exit_code == 3 and "is not a neumuter checkpoint" in result.stderr
    assert [p.name for p in occupied.iterdir()] == ["mine.txt"]
