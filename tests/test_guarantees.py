"""What neumuter guarantees a user (README "Guarantees"): nothing silently wrong, nothing lost.

Each test is a bad input a user hit: scales made for another model, an output folder that
would take the user's files with it, a model that is not a causal decoder LM, a mixture of
experts, non-finite or out-of-range numbers, an output that cannot be written, SIGTERM while
writing, files that differ from run to run. Every refusal is one exact "Error: ..." line."""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import click.testing
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from helpers import PEOPLE, byte_bpe_tokenizer, save_tiny
from test_select_apply import write_mask
from neumuter_cli import NeumuterError
from neumuter_cli.artifacts import FORMAT_VERSION, load_artifact, save_artifact
from neumuter_cli.cli import cli
from neumuter_cli.localize import LocalizeConfig, localize
from neumuter_cli.measure import encode
from neumuter_cli.models import find_ffn_layers, fingerprint, load_model
from neumuter_cli.records import atomic_directory, atomic_output, check_output


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def error_line(result, status=3):
    """The run failed with ``status`` and no traceback; returns its one "Error: " line, which
    must be the last line of stderr (progress may come before it, but no other error)."""
    assert result.exit_code == status, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("Error: ")] == lines[-1:], lines
    return lines[-1]


def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny GPT-Neo on disk, the same model loaded, and a scales file made for it."""
    folder = tmp_path_factory.mktemp("guarantees")
    path = folder / "src"
    save_tiny(path, "gpt_neo")
    model, _ = load_model(str(path), device="cpu")
    write_mask(folder / "mask.safetensors", model, blocks=[0, 1])
    result = run("select", folder / "mask.safetensors", "-o", folder / "scales.safetensors")
    assert result.exit_code == 0, result.output
    return str(path), model, str(folder / "scales.safetensors")


@pytest.fixture
def nb_file(tmp_path):
    path = tmp_path / "nb.jsonl"
    path.write_text("".join(json.dumps({"id": k, "text": t, "neighbors": [PEOPLE[-1]]}) + "\n"
                            for k, t in enumerate(PEOPLE[:2])))
    return str(path)


# ---------------------------------------------------------------- 1. scales made for another model

def changed_copy(source, target, weight, element):
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        model.get_parameter(weight)[element] += 0.01
    model.save_pretrained(target)
    byte_bpe_tokenizer().save_pretrained(target)
    return str(target)


@pytest.mark.parametrize("weight,element", [
    ("transformer.h.0.mlp.c_fc.weight", (3, 2)),                  # FFN up-projection
    ("transformer.h.1.attn.attention.k_proj.weight", (4, 4)),     # attention
    ("transformer.h.0.mlp.c_proj.weight", (5, 11)),               # one element of a down-projection row
])
def test_apply_refuses_scales_made_for_another_model(src, tmp_path, weight, element):
    path, model, scales = src
    other = changed_copy(path, tmp_path / "other", weight, element)
    result = run("apply", scales, "-m", other, "-o", tmp_path / "out", "--device", "cpu")
    other_model, _ = load_model(other, device="cpu")
    assert error_line(result) == (
        f"Error: {scales} was made for model {path} (fingerprint {fingerprint(model)}), but --model {other} "
        f"has fingerprint {fingerprint(other_model)}: localize and select on the model you apply to")
    assert not (tmp_path / "out").exists()


def test_files_of_the_old_format_are_refused_with_what_to_do(src, tmp_path):
    _, _, scales = src
    tensors, meta = load_artifact(scales)
    old = tmp_path / "old.safetensors"
    save_artifact(tensors, {**meta, "format_version": 1}, str(old))
    result = run("apply", old, "-m", src[0], "-o", tmp_path / "out", "--device", "cpu")
    assert error_line(result) == (f"Error: {old}: made by an older neumuter (format version 1, this one reads "
                                  f"{FORMAT_VERSION}): its model fingerprint cannot be checked any more; "
                                  "run localize and select again")
    assert "loading" not in result.stderr          # refused before the model loads


# ---------------------------------------------------------------- 2. what apply -o may replace

def test_apply_never_replaces_the_current_folder(src, tmp_path, monkeypatch):
    path, _, scales = src
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(work)
    for output in (".", str(work)):
        result = run("apply", scales, "-m", path, "-o", output, "--force", "--device", "cpu")
        assert error_line(result) == (f"Error: refusing to write the checkpoint to {output}: it is the current "
                                      "folder (give a new folder)")
    result = run("apply", scales, "-m", path, "-o", tmp_path, "--force", "--device", "cpu")
    assert error_line(result) == (f"Error: refusing to write the checkpoint to {tmp_path}: it is a folder holding "
                                  "the current folder (give a new folder)")
    assert sorted(os.listdir(work)) == ["thesis.tex"] and "loading" not in result.stderr


def test_apply_never_replaces_a_folder_holding_its_inputs(src, tmp_path):
    path, _, scales = src
    models = tmp_path / "models"
    shutil.copytree(path, models / "src")
    shutil.copy(scales, models / "scales.safetensors")
    for args in (["-m", models / "src", "-o", models], ["-m", models / "src", "-o", models / "src"]):
        result = run("apply", models / "scales.safetensors", *args, "--force", "--device", "cpu")
        assert error_line(result) == (f"Error: refusing to write the checkpoint to {args[3]}: it would replace "
                                      f"{models / 'src'}, an input of this command (give a new folder)")
    result = run("apply", models / "scales.safetensors", "-m", path, "-o", models, "--force", "--device", "cpu")
    assert error_line(result) == (f"Error: refusing to write the checkpoint to {models}: it would replace "
                                  f"{models / 'scales.safetensors'}, an input of this command (give a new folder)")
    assert sorted(os.listdir(models)) == ["scales.safetensors", "src"]


def test_apply_help_states_the_rule():
    text = " ".join(run("apply", "--help").stdout.split())
    assert "--force Replace DIR when it holds a previous neumuter checkpoint" in text
    assert "A folder holding anything else is never replaced." in text
    assert "DIR is never the current folder, a folder holding it, or a folder holding the model or the scales file." in text


# ---------------------------------------------------------------- 3, 4. models that cannot be muted

def save_config_model(path, config):
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    byte_bpe_tokenizer().save_pretrained(path)
    return str(path)


def test_a_masked_lm_is_refused(tmp_path, nb_file):
    from transformers import BertConfig

    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, architectures=["BertForMaskedLM"])
    bert = save_config_model(tmp_path / "bert", config)
    expected = ("Error: model type 'bert' (BertLMHeadModel) is not a causal decoder LM: its prediction at a "
                "position changes with later tokens (it attends both ways, like a masked LM); neumuter needs "
                "a decoder-only causal LM")
    for args in (["localize", nb_file, "-o", tmp_path / "m.st"], ["measure", nb_file, "-o", tmp_path / "m.jsonl"],
                 ["inspect"]):
        assert error_line(run(*args, "-m", bert, "--device", "cpu")) == expected
    assert sorted(os.listdir(tmp_path)) == ["bert", "nb.jsonl"]


def test_a_bert_trained_as_a_decoder_is_a_causal_lm(tmp_path):
    from transformers import BertConfig

    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, is_decoder=True)
    result = run("inspect", "-m", save_config_model(tmp_path / "bert", config), "--device", "cpu")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_mixtures_of_experts_are_refused(tmp_path, nb_file, arch):
    from transformers import MixtralConfig, Qwen2MoeConfig

    common = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64)
    if arch == "qwen2_moe":   # a shared expert that looks like one dense FFN, beside 4 routed experts
        config = Qwen2MoeConfig(**common, moe_intermediate_size=16, shared_expert_intermediate_size=64,
                                num_experts=4, num_experts_per_tok=2)
    else:                     # num_local_experts, which Mixtral's config also names num_experts
        config = MixtralConfig(**common, num_local_experts=4)
    path = save_config_model(tmp_path / arch, config)
    expected = (f"Error: model type {arch!r} is not supported: its FFNs are mixtures of experts (config num_experts = 4); "
                "neumuter gates the neurons of one dense FFN per block")
    assert error_line(run("inspect", "-m", path, "--device", "cpu")) == expected
    assert error_line(run("localize", nb_file, "-m", path, "-o", tmp_path / "m.st", "--device", "cpu")) == expected
    assert not (tmp_path / "m.st").exists()


# ---------------------------------------------------------------- 5, 7. numbers: finite and in range

@pytest.mark.parametrize("command,option,value,message", [
    ("localize", "--stop-ma", "nan", "'nan' is not a finite number."),
    ("localize", "--stop-ma", "5", "5.0 is not in the range 0<=x<=1."),
    ("localize", "--stop-el", "-0.1", "-0.1 is not in the range 0<=x<=1."),
    ("localize", "--lr", "inf", "'inf' is not a finite number."),
    ("localize", "--lr", "nan", "'nan' is not a finite number."),
    ("localize", "--lr", "0", "0.0 is not in the range x>0."),
    ("localize", "--lambda", "nan", "'nan' is not a finite number."),
    ("localize", "--margin", "nan", "'nan' is not a finite number."),
    ("localize", "--eta", "inf", "'inf' is not a finite number."),
    ("localize", "--beta", "-inf", "'-inf' is not a finite number."),
    ("localize", "--max-forget-loss", "nan", "'nan' is not a finite number."),
    ("localize", "--target-ma", "nan", "'nan' is not a finite number."),
    ("select", "--energy", "nan", "'nan' is not a finite number."),
    ("select", "--threshold", "inf", "'inf' is not a finite number."),
    ("select", "--top-fraction", "nan", "'nan' is not a finite number."),
    ("neighbors", "--ratio", "nan", "'nan' is not a finite number."),
    ("neighbors", "--temperature", "inf", "'inf' is not a finite number."),
])
def test_every_float_option_is_finite_and_in_range(tmp_path, nb_file, command, option, value, message):
    extra = {"localize": ["-m", tmp_path / "no-model"], "neighbors": ["--mlm", tmp_path / "no-mlm"], "select": []}
    out = tmp_path / "out"
    result = run(command, nb_file, *extra[command], option, value, "-o", out)
    assert result.exit_code == 2, result.output
    label = {"--ratio": "'-r' / '--ratio'"}.get(option, f"'{option}'")   # click names both spellings
    assert result.stderr.splitlines()[-1] == f"Error: Invalid value for {label}: {message}"
    assert not out.exists()


def test_the_library_refuses_a_config_that_cannot_train(src):
    _, model, _ = src
    tokenizer = byte_bpe_tokenizer()
    records = [{"text": PEOPLE[0], "neighbors": [PEOPLE[1]]}]
    for field, value, message in [("lr", float("inf"), "lr must be a finite number, not inf"),
                                  ("kl_weight", float("nan"), "kl_weight must be a finite number, not nan"),
                                  ("target_ma", 2.0, "target_ma must be >= 0 and <= 1, not 2.0"),
                                  ("beta", 0.0, "beta must be > 0, not 0.0")]:
        with pytest.raises(NeumuterError) as info:
            localize(model, tokenizer, records, find_ffn_layers(model), LocalizeConfig(epochs=1, **{field: value}))
        assert str(info.value) == message


def test_gates_that_blow_up_stop_the_training(src):
    _, model, _ = src
    records = [{"text": PEOPLE[0], "neighbors": [PEOPLE[1]]}]
    with pytest.raises(NeumuterError) as info:   # a huge but finite learning rate: one step makes them inf
        localize(model, byte_bpe_tokenizer(), records, find_ffn_layers(model), LocalizeConfig(epochs=1, lr=1e308))
    assert str(info.value) == "epoch 1: the gates are not finite any more; try a smaller --lr"


# ---------------------------------------------------------------- 6. outputs checked before the work

@pytest.fixture
def unwritable(tmp_path):
    """A folder nobody may write in: a read-only folder, or /sys where read-only does not stop root."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if _unwritable(folder):
        yield folder
        folder.chmod(0o755)
        return
    folder.chmod(0o755)
    if _unwritable("/sys"):
        yield Path("/sys")
        return
    pytest.skip("no unwritable folder here")


def _unwritable(folder):
    probe = Path(folder) / ".neumuter-test-probe"
    try:
        probe.write_text("x")
    except OSError:
        return True
    probe.unlink()
    return False


@pytest.mark.parametrize("command", ["localize", "measure", "apply"])
def test_an_output_that_cannot_be_written_is_refused_before_the_work(src, nb_file, tmp_path, unwritable, command):
    path, _, scales = src
    read_only = unwritable
    outputs = {"localize": "m.st", "measure": "m.jsonl", "apply": "ckpt"}
    first = {"apply": scales}.get(command, nb_file)
    for folder, reason in ((tmp_path / "missing", "does not exist"), (read_only, "is not writable (Permission denied)")):
        out = folder / outputs[command]
        result = run(command, first, "-m", path, "-o", out, "--device", "cpu")
        assert error_line(result) == f"Error: cannot write {out}: folder {folder} {reason}"
        assert "loading" not in result.stderr            # refused before the model loads
        assert not os.path.exists(out)


def test_an_output_that_is_the_input_is_refused(src, nb_file):
    before = Path(nb_file).read_bytes()
    result = run("localize", nb_file, "-m", src[0], "-o", nb_file, "--device", "cpu")
    assert error_line(result) == (f"Error: refusing to write {nb_file}: it is an input of this command "
                                  "(write the result to another file)")
    assert Path(nb_file).read_bytes() == before


def test_a_pipe_given_as_output_is_written_not_replaced(tmp_path):
    """-o /dev/stdout, /dev/null or a named pipe: renaming a temporary file over it would
    replace the device (as root, /dev/null itself) with a regular file."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        check_output(str(fifo), inputs=(str(fifo),))
        with atomic_output(str(fifo)) as out:
            out.write("through the pipe\n")
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
        assert os.read(reader, 100) == b"through the pipe\n"
    finally:
        os.close(reader)
    assert os.listdir(tmp_path) == ["pipe"]


# ---------------------------------------------------------------- 8. nothing left behind

SIGTERM_SCRIPT = """
import os, sys, time
from neumuter_cli.records import atomic_directory, atomic_output
target = sys.argv[1]
writer = atomic_directory(target, force=True) if sys.argv[2] == "dir" else atomic_output(target, "wb")
with writer as out:
    if sys.argv[2] == "dir":
        (out / "model.safetensors").write_bytes(b"partial weights")
    else:
        out.write(b"partial")
    print("ready", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_sigterm_while_writing_leaves_nothing_behind(tmp_path, kind):
    folder = tmp_path / "work"
    folder.mkdir()
    target = folder / "out"
    if kind == "dir":
        target.mkdir()
        (target / "old.txt").write_text("the previous checkpoint")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SIGTERM_SCRIPT), str(target), kind],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert process.stdout.readline() == "ready\n", process.stderr.read()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        process.kill()
    assert "Traceback" not in process.stderr.read()
    assert sorted(os.listdir(folder)) == (["out"] if kind == "dir" else [])
    if kind == "dir":
        assert os.listdir(target) == ["old.txt"]


def test_a_folder_that_cannot_be_replaced_leaves_nothing_behind(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("mine")
    monkeypatch.chdir(work)
    with pytest.raises(NeumuterError, match=r"^cannot write \.: "):
        with atomic_directory(".", force=True) as folder:
            (folder / "weights").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["work"] and os.listdir(work) == ["mine.txt"]


def test_checkpoint_files_follow_the_umask(src, tmp_path):
    path, _, scales = src
    assert run("apply", scales, "-m", path, "-o", tmp_path / "out", "--device", "cpu").exit_code == 0
    for name in os.listdir(tmp_path / "out"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o666 & ~umask(), name
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask()


# ---------------------------------------------------------------- 9. byte-reproducible

def test_localize_select_and_apply_write_the_same_bytes_twice(src, nb_file, tmp_path):
    path, _, _ = src
    masks = [tmp_path / "m1.safetensors", tmp_path / "m2.safetensors"]
    for mask in masks:
        result = run("localize", nb_file, "-m", path, "--epochs", 1, "-o", mask, "--device", "cpu")
        assert result.exit_code == 0, result.output
    assert masks[0].read_bytes() == masks[1].read_bytes()
    mask = Path(src[2]).parent / "mask.safetensors"
    runs = []
    for name in ("a", "b"):
        scales = tmp_path / f"{name}.safetensors"
        assert run("select", mask, "-o", scales).exit_code == 0
        assert run("apply", scales, "-m", path, "-o", tmp_path / name, "--device", "cpu").exit_code == 0
        runs.append((scales, tmp_path / name))
    (scales_a, out_a), (scales_b, out_b) = runs
    assert scales_a.read_bytes() == scales_b.read_bytes()
    assert sorted(os.listdir(out_a)) == sorted(os.listdir(out_b))
    for name in os.listdir(out_a):
        assert (out_a / name).read_bytes() == (out_b / name).read_bytes(), name
    record = json.loads((out_a / "neumuter.json").read_text())
    assert list(record) == sorted(record)
    header = scales_a.read_bytes()
    metadata = json.loads(header[8:8 + int.from_bytes(header[:8], "little")])["__metadata__"]
    assert list(metadata) == sorted(metadata)


# ---------------------------------------------------------------- 10, 11. one line, not a traceback

def test_localize_max_length_beyond_the_context_is_one_line(src, tmp_path):
    path, _, _ = src
    long_text = " ".join(PEOPLE * 6)
    tokens = len(encode(byte_bpe_tokenizer(), [long_text], 400)[0])
    assert tokens > 256
    source = tmp_path / "long.jsonl"
    source.write_text(json.dumps({"text": long_text, "neighbors": [PEOPLE[0]]}) + "\n")
    result = run("localize", source, "-m", path, "--max-length", 400, "-o", tmp_path / "m.st", "--device", "cpu")
    assert error_line(result) == (f"Error: a forget text or neighbour (use a smaller --max-length) of {tokens} "
                                  "tokens is longer than the model's context (256 tokens)")
    assert not (tmp_path / "m.st").exists()


def test_localize_without_input_on_a_terminal_says_so(src, tmp_path, monkeypatch):
    monkeypatch.setattr(click.testing._NamedTextIOWrapper, "isatty", lambda self: True, raising=False)
    result = run("localize", "-m", src[0], "-o", tmp_path / "m.st", "--device", "cpu")
    assert error_line(result) == "Error: no input: give a JSONL file or pipe one into stdin"


@pytest.mark.parametrize("value", [1e6, -5.0])
def test_scales_outside_0_1_need_allow_any_scale(src, tmp_path, value):
    path, model, scales = src
    tensors, meta = load_artifact(scales)
    tensors["scale.0"][3] = value
    odd = tmp_path / "odd.safetensors"
    save_artifact(tensors, meta, str(odd))
    result = run("apply", odd, "-m", path, "-o", tmp_path / "out", "--device", "cpu")
    assert error_line(result) == (f"Error: block 0: the scale of neuron 3 is {value:g}, outside [0, 1] (1 such in "
                                  "this block); `select` writes gate values in [0, 1]: use --allow-any-scale to "
                                  "fold such scales anyway")
    assert not (tmp_path / "out").exists()
    result = run("apply", odd, "-m", path, "-o", tmp_path / "out", "--device", "cpu", "--allow-any-scale")
    assert result.exit_code == 0, result.output
    layer = find_ffn_layers(model)[0]
    muted = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    column = muted.get_submodule(layer.path).weight[:, 3]
    assert torch.allclose(column, layer.module.weight[:, 3] * value)


def test_exit_statuses_are_documented():
    text = run("--help").stdout
    for line in ("Exit status, the same for every command:", "0    success",
                 "1    `measure --check`: some record is not forgotten (and nothing else)",
                 "2    usage error: a bad option, argument or combination of them",
                 "3    any other error (bad input, wrong model, unwritable output, I/O),",
                 "130  interrupted (Ctrl-C); 143: terminated (SIGTERM); either way"):
        assert line in text, line


# ---------------------------------------------------------------- the Guarantees that had no test

def test_an_encoder_decoder_model_is_refused_before_its_weights_load(tmp_path, nb_file):
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    models = {
        "bart": ("BartForConditionalGeneration", BartForConditionalGeneration(BartConfig(
            vocab_size=300, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))),
        "t5": ("T5ForConditionalGeneration", T5ForConditionalGeneration(T5Config(
            vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))),
    }
    for kind, (architecture, model) in models.items():
        path = tmp_path / kind
        model.save_pretrained(path)
        byte_bpe_tokenizer().save_pretrained(path)
        expected = (f"Error: model type {kind!r} ({architecture}) is an encoder-decoder model, not a causal decoder "
                    "LM: neumuter needs a decoder-only causal LM")
        for args in (["inspect"], ["measure", nb_file, "-o", tmp_path / "m.jsonl"],
                     ["localize", nb_file, "-o", tmp_path / "m.st"], ["relearn", nb_file, "-o", tmp_path / "rl"]):
            result = run(*args, "-m", path, "--device", "cpu")
            assert error_line(result) == expected, (kind, args)
            assert "Loading weights" not in result.stderr          # refused from its config
    assert sorted(os.listdir(tmp_path)) == ["bart", "nb.jsonl", "t5"]


@pytest.mark.parametrize("version,shown", [(3, "3"), ("two", "'two'"), (None, "None"), (2.5, "2.5")])
def test_an_unknown_format_version_is_refused(src, tmp_path, version, shown):
    path, model, scales = src
    tensors, meta = load_artifact(scales)
    mask_tensors, mask_meta = load_artifact(str(Path(scales).parent / "mask.safetensors"))
    for name, (data, metadata), command in (("s.st", (tensors, meta), ["apply", "-m", path, "-o", tmp_path / "out"]),
                                            ("m.st", (mask_tensors, mask_meta), ["select", "-o", tmp_path / "out"])):
        metadata = dict(metadata)
        if version is None:
            del metadata["format_version"]
        else:
            metadata["format_version"] = version
        save_artifact(data, metadata, str(tmp_path / name))
        result = run(command[0], tmp_path / name, *command[1:], "--device", "cpu") if command[0] == "apply" else \
            run(command[0], tmp_path / name, *command[1:])
        assert error_line(result) == (f"Error: {tmp_path / name}: format_version {shown} is not supported (this "
                                      f"neumuter reads {FORMAT_VERSION})")
        assert "loading" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("value,message", [("nan", "'nan' is not a finite number."), ("inf", "'inf' is not a finite number."),
                                           ("-0.1", "-0.1 is not in the range 0<=x<=1."),
                                           ("1.5", "1.5 is not in the range 0<=x<=1.")])
@pytest.mark.parametrize("command", ["measure", "localize"])
def test_tolerance_is_finite_and_in_range(src, nb_file, tmp_path, value, message, command):
    result = run(command, nb_file, "-m", src[0], "--reference-model", src[0], "--tolerance", value,
                 "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1] == f"Error: Invalid value for '--tolerance': {message}"
    assert not (tmp_path / "out").exists()


def test_the_library_refuses_a_tolerance_that_is_not_finite(src):
    from neumuter_cli.measure import MeasureConfig, run_measure

    for value in (float("nan"), float("inf"), -0.5):
        with pytest.raises(NeumuterError) as info:
            run_measure(MeasureConfig(model=src[0], input_path=None, tolerance=value))
        assert str(info.value) == "--tolerance must be between 0 and 1"


def _outputs_that_are_inputs(src, nb_file, tmp_path):
    """(command line, the input it names as its output) for every command that writes a file
    or a folder."""
    path, _, scales = src
    mask = str(Path(scales).parent / "mask.safetensors")
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps({"ma": 0.5, "el_10": 0.5, "loss": 3.0}))
    models = tmp_path / "models"
    shutil.copytree(path, models / "m")
    shutil.copy(nb_file, models / "records.jsonl")
    cases = [(["neighbors", nb_file, "--mlm", tmp_path / "no-mlm", "-o", nb_file], nb_file),
             (["select", mask, "-o", mask], mask)]
    for option in ("--reference", "--thresholds", "--ppl", "--holdout", "--reference-scores"):
        given = thresholds if option == "--thresholds" else nb_file
        cases.append((["measure", nb_file, "-m", path, option, given, "-o", given], given))
    cases.append((["measure", nb_file, "-m", path, "-o", nb_file], nb_file))
    cases.append((["quantize", "-m", models / "m", "--type", "q8_0", "-o", models / "m", "--force"], models / "m"))
    cases.append((["relearn", nb_file, "-m", models / "m", "-o", models / "m", "--force"], models / "m"))
    cases.append((["relearn", models / "records.jsonl", "-m", path, "-o", models, "--force"], models))
    return cases


def test_an_output_is_not_an_input(src, nb_file, tmp_path):
    for args, given in _outputs_that_are_inputs(src, nb_file, tmp_path):
        before = {p: p.read_bytes() for p in Path(given).rglob("*") if p.is_file()} if Path(given).is_dir() \
            else {Path(given): Path(given).read_bytes()}
        result = run(*args, "--device", "cpu") if args[0] not in ("select",) else run(*args)
        line = error_line(result)
        if args[0] in ("quantize", "relearn"):
            folder = args[args.index("-o") + 1]
            held = Path(given) / "records.jsonl" if Path(given) == tmp_path / "models" else given
            assert line == (f"Error: refusing to write the checkpoint to {folder}: it would replace {held}, an "
                            "input of this command (give a new folder)"), args
        else:
            assert line == (f"Error: refusing to write {given}: it is an input of this command (write the result "
                            "to another file)"), args
        assert "loading" not in result.stderr, args        # checked before any model loads
        for file, data in before.items():
            assert file.read_bytes() == data, (args, file)


def test_localize_is_byte_reproducible_with_an_early_stop_and_pruning(tmp_path):
    """The same inputs, options and seed give the same mask, byte for byte, when the early stop
    fires and the pruning bisection runs (both call the forgetting check, which measures)."""
    from helpers import train_memorizer

    train_memorizer(tmp_path / "mem", steps=60)
    nb = tmp_path / "nb.jsonl"
    nb.write_text("".join(json.dumps({"id": k, "text": t, "neighbors": [PEOPLE[-1]]}) + "\n"
                          for k, t in enumerate(PEOPLE[:2])))
    masks = []
    for name in ("a.st", "b.st"):
        result = run("localize", nb, "-m", tmp_path / "mem", "--stop-ma", "0.95", "--epochs", "15", "--lr", "1",
                     "--eta", "0", "-o", tmp_path / name, "--device", "cpu")
        assert result.exit_code == 0, result.output
        assert "prune: trying" in result.stderr and "stopped: every forget text below the thresholds" in result.stderr
        masks.append((tmp_path / name).read_bytes())
    assert masks[0] == masks[1]
    _, meta = load_artifact(str(tmp_path / "a.st"))
    assert meta["stopped_early"] is True and meta["epochs_run"] < 15
    assert 0 < meta["pruned"]["kept"] < meta["pruned"]["moved"]


def test_records_are_read_and_written_as_utf8_under_another_locale(src, tmp_path):
    """In the C locale without UTF-8 coercion, Python's default encoding is ASCII; records
    with other characters are still read (from a file and from stdin) and written as UTF-8."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "LC_ALL": "C", "LANG": "C",
           "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    env.pop("PYTHONIOENCODING", None)
    probe = subprocess.run([sys.executable, "-c", "import locale; print(locale.getpreferredencoding(False))"],
                           env=env, capture_output=True, text=True)
    assert probe.stdout.strip() in ("ANSI_X3.4-1968", "ascii", "US-ASCII"), probe.stdout   # the test means it
    texts = ["Café au lait, naïve façade — 東京 ☕", "Ελληνικά and emoji 🙂 in one record"]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": k, "text": t}, ensure_ascii=False) + "\n"
                              for k, t in enumerate(texts)), encoding="utf-8")
    for how in ("file", "stdin"):
        out = tmp_path / f"out-{how}.jsonl"
        command = [sys.executable, "-m", "neumuter_cli", "measure", str(source) if how == "file" else "-",
                   "-m", src[0], "--el-n", "0", "--device", "cpu", "-o", str(out)]
        done = subprocess.run(command, env=env, input=source.read_bytes() if how == "stdin" else None,
                              capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert [r["text"] for r in rows] == texts and "☕" in out.read_text(encoding="utf-8")
