"""The library states plain facts about its own parameters; the CLI names the flag the user gave."""
import json

import pytest
import torch
from click.testing import CliRunner

from helpers import PEOPLE, save_tiny
from neumuter_cli.cli import cli
from neumuter_cli.errors import DeviceUnavailable, SettingError
from neumuter_cli.models import resolve_device
from neumuter_cli.select import check_rule


def error_line(result) -> str:
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("Error: ")
    return lines[-1]


def test_library_errors_name_parameters_not_flags(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailable) as device:
        resolve_device("cuda")
    assert device.value.setting == "device" and "--" not in str(device.value)
    with pytest.raises(SettingError) as rule:
        check_rule("top-fraction", 1.5)
    assert rule.value.setting == "top_fraction" and "--" not in str(rule.value)


def test_the_cli_names_the_flag_of_a_bad_setting(tiny_neo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device = CliRunner().invoke(cli, ["inspect", "-m", tiny_neo_dir, "--device", "cuda"])
    assert error_line(device) == "Error: --device cuda asked for, but no CUDA device is available"

    records = tmp_path / "nb.jsonl"
    records.write_text(json.dumps({"text": PEOPLE[0], "neighbors": [PEOPLE[1]]}) + "\n")
    layers = CliRunner().invoke(cli, ["localize", str(records), "-m", tiny_neo_dir, "--layers", "1-9",
                                      "--device", "cpu", "-o", str(tmp_path / "mask.safetensors")])
    assert layers.exit_code == 2, layers.output       # a value that cannot work: a usage error
    assert layers.stderr.splitlines()[-1] == "Error: --layers '1-9': block 2 does not exist (the model has blocks 0-1)"

    scales = CliRunner().invoke(cli, ["select", "no-such-mask", "--top-fraction", "1.5"])
    assert scales.exit_code == 2 and "Invalid value for '--top-fraction'" in scales.stderr   # checked by click


def test_a_diverging_localize_suggests_the_flags_to_change(tmp_path):
    model, _ = save_tiny(tmp_path / "nan-lm")
    with torch.no_grad():
        model.get_input_embeddings().weight[:] = float("nan")
    model.save_pretrained(tmp_path / "nan-lm")
    records = tmp_path / "nb.jsonl"
    records.write_text(json.dumps({"text": PEOPLE[0], "neighbors": [PEOPLE[1]]}) + "\n")
    result = CliRunner().invoke(cli, ["localize", str(records), "-m", str(tmp_path / "nan-lm"), "--epochs", "1",
                                      "--device", "cpu", "-o", str(tmp_path / "mask.safetensors")])
    line = error_line(result)
    assert "the loss is not finite" in line and line.endswith("; try a smaller --lr or --dtype float32")
    assert not (tmp_path / "mask.safetensors").exists()


def test_each_command_finds_the_flag_of_a_setting():
    neighbors, localize = cli.commands["neighbors"], cli.commands["localize"]
    assert neighbors.flag("top_k") == "--top-k" and neighbors.flag("k") == "--count"
    assert localize.flag("kl_weight") == "--lambda" and localize.flag("layers") == "--layers"
    assert neighbors.flag("lr") is None   # not an option of this command: the plain message stays
