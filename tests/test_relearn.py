"""`relearn` (the relearning attack): exact step count, only the chosen blocks move, the loss
falls, the checkpoint loads and says what was done, a seed fixes the weights, bad input fails
in one line."""
import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import PEOPLE, byte_bpe_tokenizer, tiny_model, train_memorizer
from neumuter_cli import NeumuterError, __version__
from neumuter_cli.cli import cli
from neumuter_cli.measure import encode, teacher_forced
from neumuter_cli.models import decoder_blocks, fingerprint, load_model
from neumuter_cli.records import sha256_texts
from neumuter_cli.relearn import RelearnConfig, data_order, first_halves, relearn

RECORDS = [{"id": f"p{k}", "text": text} for k, text in enumerate(PEOPLE)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny GPT-Neo (2 blocks) that has half-learnt the people texts, with a history of its own."""
    path = tmp_path_factory.mktemp("source")
    train_memorizer(path, steps=15)
    with open(path / "neumuter.json", "w") as handle:   # as if it were apply's output
        json.dump({"kind": "neumuter-checkpoint", "neurons_scaled": 3,
                   "history": [{"kind": "neumuter-checkpoint", "neurons_scaled": 1}]}, handle)
    return str(path)


@pytest.fixture(scope="module")
def input_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "texts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return str(path)


def weights(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def run_relearn(model_dir, input_file, out, *extra):
    args = ["relearn", input_file, "-m", model_dir, "--device", "cpu", "-o", str(out), *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result


# ---------------------------------------------------------------- the library

def test_exactly_the_given_number_of_steps(model_dir):
    model, tokenizer = load_model(model_dir, device="cpu")
    seen = []
    result = relearn(model, tokenizer, RECORDS, RelearnConfig(steps=7, batch_size=4, lr=1e-3),
                     on_step=lambda step, loss: seen.append(step))
    assert result.steps == 7 and len(result.losses) == 7 and seen == list(range(1, 8))
    # 7 steps x 4 texts = 28 texts: the 6 records cycled through 4 full passes and part of a fifth,
    # each pass a permutation of all records
    stream = [k for batch in result.order for k in batch]
    assert len(stream) == 28
    for start in range(0, 24, 6):
        assert sorted(stream[start:start + 6]) == list(range(6))
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_the_state_after_step_k_does_not_depend_on_the_total(model_dir):
    """What the benchmark relies on: measuring at step 2 of a 4-step run is a 2-step run."""
    model, tokenizer = load_model(model_dir, device="cpu")
    captured = {}
    relearn(model, tokenizer, RECORDS, RelearnConfig(steps=4, batch_size=2, lr=1e-3),
            on_step=lambda step, loss: captured.setdefault(step, weights(model)))
    short, _ = load_model(model_dir, device="cpu")
    relearn(short, tokenizer, RECORDS, RelearnConfig(steps=2, batch_size=2, lr=1e-3))
    assert all(torch.equal(captured[2][name], value) for name, value in weights(short).items())
    assert not all(torch.equal(captured[2][name], value) for name, value in captured[4].items())


@pytest.mark.parametrize("arch,count,spec,trained", [("gpt_neo", 2, "1", [1]), ("llama", 3, "0,2", [0, 2]),
                                                     ("gpt2", 3, "1-2", [1, 2])])
def test_layers_leave_every_other_weight_bit_identical(arch, count, spec, trained):
    tokenizer = byte_bpe_tokenizer()
    model = tiny_model(arch, layers=count)
    for p in model.parameters():
        p.requires_grad_(False)
    blocks_path, blocks = decoder_blocks(model)
    before = weights(model)
    result = relearn(model, tokenizer, RECORDS, RelearnConfig(steps=3, batch_size=3, lr=1e-2, layers=spec))
    assert result.blocks == trained
    assert result.trained_parameters == sum(p.numel() for b in trained for p in blocks[b].parameters())
    after = weights(model)
    for name, value in after.items():
        inside = any(name.startswith(f"{blocks_path}.{b}.") for b in trained)
        if not inside:
            assert torch.equal(value, before[name]), name
    for b in trained:
        assert any(not torch.equal(after[name], before[name]) for name in after
                   if name.startswith(f"{blocks_path}.{b}.")), b


def test_the_loss_on_the_relearnt_texts_falls():
    tokenizer = byte_bpe_tokenizer()
    model = tiny_model("llama")
    ids = encode(tokenizer, [r["text"] for r in RECORDS], 200)
    before = sum(tf.loss for tf in teacher_forced(model, ids)) / len(ids)
    result = relearn(model, tokenizer, RECORDS, RelearnConfig(steps=12, batch_size=3, lr=3e-3))
    after = sum(tf.loss for tf in teacher_forced(model, ids)) / len(ids)
    assert after < before - 0.5, (before, after)
    assert sum(result.losses[-3:]) < sum(result.losses[:3])


def test_half_precision_weights_follow_float32_training():
    """bfloat16 weights are updated through float32 masters: an update below half a bf16 step of
    a weight accumulates instead of being rounded away at every step."""
    tokenizer = byte_bpe_tokenizer()
    config = RelearnConfig(steps=8, batch_size=3, lr=1e-5)
    reference = tiny_model("llama")
    start = weights(reference)
    relearn(reference, tokenizer, RECORDS, config)
    half = tiny_model("llama").to(torch.bfloat16)
    relearn(half, tokenizer, RECORDS, config)
    name = "model.layers.0.mlp.down_proj.weight"
    size = start[name].abs()
    wanted = reference.state_dict()[name] - start[name]
    # weights where every single step (<= lr) is below half a bf16 step (|w| * 2^-9), but the
    # float32 run moved them by more than that in all
    chosen = (size > 0.008) & (size < 0.02) & (wanted.abs() > 5e-5)
    assert (size[chosen] * 2.0 ** -9).min() > config.lr and chosen.sum() > 100
    assert half.state_dict()[name].dtype == torch.bfloat16
    moved = (half.state_dict()[name].float() - start[name].to(torch.bfloat16).float())[chosen]
    assert (torch.sign(moved) == torch.sign(wanted[chosen])).float().mean() > 0.9


def test_data_order_is_fixed_by_the_seed():
    assert data_order(5, 4, 3, seed=1) == data_order(5, 4, 3, seed=1)
    assert data_order(5, 4, 3, seed=1) != data_order(5, 4, 3, seed=2)


def test_first_halves_by_tokens():
    tokenizer = byte_bpe_tokenizer()
    records = [{"id": 1, "text": PEOPLE[0], "extra": "kept"}, {"id": 2, "text": PEOPLE[1] * 3}]
    halves = first_halves(records, tokenizer, max_length=20)
    for record, half in zip(records, halves):
        ids = encode(tokenizer, [record["text"]], 20)[0]
        assert half["half_of_tokens"] == len(ids) == 20
        assert record["text"].startswith(half["text"])
        assert encode(tokenizer, [half["text"]], None)[0] == ids[:10]
    assert halves[0]["extra"] == "kept" and halves[0]["id"] == 1
    with pytest.raises(NeumuterError, match="too short to halve"):
        first_halves([{"id": "x", "text": "Ali"}], tokenizer)


# ---------------------------------------------------------------- the command

def test_checkpoint_loads_and_says_what_was_done(model_dir, input_file, tmp_path):
    out = tmp_path / "relearned"
    result = run_relearn(model_dir, input_file, out, "--steps", "3", "--lr", "1e-3", "--batch-size", "2",
                         "--layers", "1", "--first-halves", "--seed", "5")
    assert result.stdout == ""
    steps = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/3", "2/3", "3/3"] and "loss" in steps[0]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(loaded.get_input_embeddings().weight,
                       AutoModelForCausalLM.from_pretrained(model_dir).get_input_embeddings().weight)
    record = json.loads((out / "neumuter.json").read_text())
    assert record["stage"] == "relearn" and record["kind"] == "neumuter-checkpoint"
    assert record["tool_version"] == __version__
    assert (record["steps"], record["lr"], record["batch_size"], record["seed"]) == (3, 1e-3, 2, 5)
    assert record["layers"] == [1] and record["first_halves"] is True and record["max_length"] == 200
    assert len(record["losses"]) == 3 and record["final_loss"] == record["losses"][-1]
    assert record["input_sha256"] == sha256_texts(PEOPLE)
    tokenizer = load_model(model_dir, device="cpu")[1]
    assert record["trained_sha256"] == sha256_texts(r["text"] for r in first_halves(RECORDS, tokenizer, 200))
    assert record["trained_sha256"] != record["input_sha256"]
    assert record["source_model"] == model_dir
    assert record["source_fingerprint"] == fingerprint(load_model(model_dir, device="cpu")[0])
    assert record["fingerprint"] == fingerprint(load_model(str(out), device="cpu")[0]) != record["source_fingerprint"]
    assert record["loss_after_last_step"] is not None and record["loss_after_last_step"] < record["losses"][0]
    assert [h["neurons_scaled"] for h in record["history"]] == [1, 3]
    # the other stages read it, and a later relearn keeps the whole history
    measured = CliRunner().invoke(cli, ["measure", input_file, "-m", str(out), "--device", "cpu",
                                        "--el-n", "0", "--format", "json"])
    assert measured.exit_code == 0, measured.output
    assert json.loads(measured.stdout)["summary"]["records"] == len(PEOPLE)
    again = tmp_path / "again"
    run_relearn(str(out), input_file, again, "--steps", "1")
    history = json.loads((again / "neumuter.json").read_text())["history"]
    assert [h.get("stage") for h in history] == [None, None, "relearn"]


def test_the_same_seed_gives_the_same_weights(model_dir, input_file, tmp_path):
    options = ["--steps", "3", "--lr", "1e-3", "--batch-size", "2"]
    for name, seed in [("a", "0"), ("b", "0"), ("c", "1")]:
        run_relearn(model_dir, input_file, tmp_path / name, *options, "--seed", seed)
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)            # another order, other weights


@pytest.mark.parametrize("value", ["0", "-1e-5", "nan", "inf"])
def test_a_bad_learning_rate_is_a_usage_error(model_dir, input_file, tmp_path, value):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["relearn", input_file, "-m", model_dir, "--device", "cpu",
                                      "-o", str(out), "--lr", value])
    assert result.exit_code == 2 and "Invalid value for '--lr'" in result.stderr
    assert "loading" not in result.stderr and not out.exists() and result.stdout == ""


@pytest.mark.parametrize("options,message,after_load", [
    (["--layers", "5"], "--layers '5': block 5 does not exist (the model has blocks 0-1)", True),
    (["--layers", "99"], "--layers '99': block 99 does not exist (the model has blocks 0-1)", True),
    (["--layers", "1-x"], "--layers '1-x' is not a list of block numbers and ranges like 10-16,21", True),
    (["--lr", "1e39"], "--lr must be at most 3.40282e+38 (the largest float32), not 1e+39", False),
])
def test_bad_options_are_usage_errors(model_dir, input_file, tmp_path, options, message, after_load):
    """A value that cannot work for this model is a usage error (2), as click's own are; the
    library names its parameter (layers, lr), the CLI the flag."""
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["relearn", input_file, "-m", model_dir, "--device", "cpu",
                                      "-o", str(out), *options])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("Error: ")] == [f"Error: {message}"] == lines[-1:]
    assert "Traceback" not in result.output
    assert any(line.startswith("loading") for line in result.stderr.splitlines()) == after_load
    assert not out.exists() and result.stdout == ""


@pytest.mark.parametrize("content,message", [
    ("", "no records (empty input)"),
    ('{"id": "t", "text": "a"}\n', "text 't' has fewer than 2 tokens"),
    ('{"id": "t", "text": "Alice"}\n', "text 't' is too short to halve (1 of at least 4 tokens)"),
])
def test_bad_input_fails_in_one_line(model_dir, tmp_path, content, message):
    source = tmp_path / "in.jsonl"
    source.write_text(content)
    out = tmp_path / "out"
    extra = ["--first-halves"] if "halve" in message else []
    result = CliRunner().invoke(cli, ["relearn", str(source), "-m", model_dir, "--device", "cpu",
                                      "-o", str(out), *extra])
    assert result.exit_code == 3, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert result.stderr.splitlines()[-1] == errors[0] and not out.exists()


def test_steps_zero_and_an_occupied_output_are_refused(model_dir, input_file, tmp_path):
    result = CliRunner().invoke(cli, ["relearn", input_file, "-m", model_dir, "-o", str(tmp_path / "x"),
                                      "--steps", "0"])
    assert result.exit_code == 2 and "--steps" in result.stderr
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["relearn", input_file, "-m", model_dir, "-o", str(occupied)])
    assert result.exit_code == 3
    assert result.stderr.strip() == (f"Error: {occupied} exists and is not empty, and is not a neumuter checkpoint "
                                     "(it has no readable neumuter.json); --force only replaces a previous checkpoint: "
                                     "give a new folder")
    assert os.listdir(occupied) == ["keep.txt"]
