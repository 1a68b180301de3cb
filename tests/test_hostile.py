"""Issue 20: never a wrong verdict. Each case a hostile user tried, with the exact line and exit
status they now get: a broken model (NaN losses), the model as its own yardstick, a checkpoint
that does not load whole, and the inputs that ended in a traceback with exit status 1 (the
status of a `measure --check` verdict).

The rule behind them: a verdict is only given on finite numbers from a model loaded whole,
against a reference that is not the model itself; exit statuses are 0 success, 1 a --check
verdict, 2 usage, 3 any other error, 130 Ctrl-C, 143 SIGTERM."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from helpers import PEOPLE, save_tiny, train_memorizer
from neumuter_cli.cli import cli
from neumuter_cli.models import fingerprint, load_model

ROOT = Path(__file__).resolve().parents[1]
C_FC = "transformer.h.0.mlp.c_fc.weight"
SELF = ("; a verdict needs a reference that never saw the records (against itself, every record passes "
        "as forgotten)")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(result, status=3):
    """Exit ``status``, no traceback, and exactly one "Error: " line, the last on stderr."""
    assert result.exit_code == status, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("Error: ")] == lines[-1:], lines
    return lines[-1]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def variant(world, name, edit_tensors=None, edit_config=None):
    """A copy of the memoriser M with its tensors or config.json edited."""
    folder = world["root"] / name
    if folder.exists():
        return folder
    shutil.copytree(world["M"], folder)
    weights = folder / "model.safetensors"
    if edit_tensors:
        tensors = load_file(weights)
        edit_tensors(tensors)
        save_file(tensors, weights, metadata={"format": "pt"})
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """M, a tiny GPT-Neo that memorised the people texts; R, an untrained model with its
    tokenizer (it never saw them); the forget texts; eq. 17 thresholds; a model that computes
    NaN (finite weights, so large that its logits overflow)."""
    root = tmp_path_factory.mktemp("hostile")
    _, tokenizer = train_memorizer(root / "M", steps=60)
    save_tiny(root / "R", "gpt_neo", seed=1, tokenizer=tokenizer, vocab_size=len(tokenizer), hidden=64, ffn=256)
    broken = AutoModelForCausalLM.from_pretrained(root / "M", dtype=torch.float32)
    with torch.no_grad():
        broken.transformer.ln_f.weight.mul_(1e38)
    broken.save_pretrained(root / "NaN")
    tokenizer.save_pretrained(root / "NaN")
    world = {"root": root, "M": root / "M", "R": root / "R", "NaN": root / "NaN",
             "forget": write_jsonl(root / "forget.jsonl", [{"id": f"p{k}", "text": t} for k, t in enumerate(PEOPLE[:3])]),
             "thresholds": root / "thresholds.json"}
    world["thresholds"].write_text(json.dumps({"ma": 0.5, "el_10": 0.5, "loss": 3.0}))
    world["fp"] = {name: fingerprint(load_model(str(world[name]), device="cpu")[0]) for name in ("M", "R")}
    return world


def scores(world, name, fmt):
    path = world["root"] / f"{name}-scores.{fmt}"
    if not path.exists():
        result = run("measure", world["forget"], "-m", world[name], "--format", fmt, "-o", path, "--device", "cpu")
        assert result.exit_code == 0, result.output
    return path


# ---------------------------------------------------------------- 1. a broken model never passes

NAN_LINE = ("Error: {file}: record p0: model {model} computes a non-finite logit or loss at token 2 (NaN or "
            "infinity): its weights are broken, so no number it gives means anything; no verdict is given")


def test_relearn_refuses_to_write_a_model_that_computes_nan(world, tmp_path):
    out = tmp_path / "rl"
    result = run("relearn", world["forget"], "-m", world["M"], "--steps", 1, "--lr", "1e37", "-o", out,
                 "--device", "cpu")
    assert error_line(result) == ("Error: after step 1: the loss is not finite (nan): the update broke the model; "
                                  "try a smaller --lr or --dtype float32")
    assert os.listdir(tmp_path) == []            # no checkpoint, no temporary folder beside it


def test_a_model_with_nan_losses_gets_no_verdict(world, tmp_path):
    out = tmp_path / "m.jsonl"
    expected = NAN_LINE.format(file=world["forget"], model=world["NaN"])
    for extra in (["--thresholds", world["thresholds"]],
                  ["--reference-scores", scores(world, "R", "json"), "--allow-over-forgotten"],
                  ["--reference-model", world["R"]]):
        result = run("measure", world["forget"], "-m", world["NaN"], *extra, "--check", "-o", out, "--device", "cpu")
        assert error_line(result) == expected, extra
        assert "check passed" not in result.stderr and not out.exists()
    # as the reference, too: the verdict would be against NaN numbers
    result = run("measure", world["forget"], "-m", world["M"], "--reference-model", world["NaN"], "--check",
                 "-o", out, "--device", "cpu")
    assert error_line(result) == NAN_LINE.format(file=world["forget"], model=world["NaN"]).replace(
        f"model {world['NaN']}", f"reference model {world['NaN']}")
    assert not out.exists()


def test_no_nan_is_ever_written_as_json():
    from neumuter_cli import NeumuterError
    from neumuter_cli.records import dumps_record

    with pytest.raises(NeumuterError, match=r"^refusing to write a non-finite number \(NaN or infinity\) as JSON$"):
        dumps_record({"text": "x", "loss": float("nan")})


# ---------------------------------------------------------------- 2. never the model as its own yardstick

def test_the_model_is_not_its_own_reference_model(world, tmp_path):
    result = run("measure", world["forget"], "-m", world["M"], "--reference-model", world["M"], "--check",
                 "--device", "cpu")
    assert error_line(result) == (f"Error: the reference is the model itself: reference model {world['M']} is the "
                                  f"checkpoint {world['M']}{SELF}")
    assert "loading" not in result.stderr                 # before any model loads
    copy = tmp_path / "copy-of-M"
    shutil.copytree(world["M"], copy)
    result = run("measure", world["forget"], "-m", world["M"], "--reference-model", copy, "--check", "--device", "cpu")
    assert error_line(result) == (f"Error: the reference is the model itself: reference model {copy} has the weights "
                                  f"of {world['M']} (fingerprint {world['fp']['M']}){SELF}")
    assert "measuring the 3 records under the reference model" not in result.stderr


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_scores_of_the_model_itself_are_refused(world, fmt):
    own = scores(world, "M", fmt)
    result = run("measure", world["forget"], "-m", world["M"], "--reference-scores", own, "--check", "--device", "cpu")
    assert error_line(result) == (f"Error: the reference is the model itself: reference scores {own} were measured "
                                  f"on a model with the fingerprint of {world['M']} ({world['fp']['M']}){SELF}")
    assert "measuring" not in result.stderr                # as soon as the model loads
    # the same file is a fine reference for another model
    result = run("measure", world["forget"], "-m", world["R"], "--reference-scores", own, "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_a_copy_in_another_precision_or_made_by_neumuter_is_the_model_itself(world, tmp_path):
    """Found trying more: a bfloat16 copy of M, M quantised or relearnt by neumuter, and M as
    the reference of its own muted checkpoint all passed --check (the fingerprints differ)."""
    from test_select_apply import write_mask

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(world["M"], dtype=torch.bfloat16).save_pretrained(bf16)
    load_model(str(world["M"]), device="cpu")[1].save_pretrained(bf16)
    rounded = fingerprint(load_model(str(bf16), device="cpu")[0])
    assert rounded != world["fp"]["M"]
    made = {}
    for stage, args in (("quantize", ["quantize", "--type", "q8_0"]),
                        ("relearn", ["relearn", world["forget"], "--steps", 1])):
        made[stage] = tmp_path / stage
        assert run(*args, "-m", world["M"], "-o", made[stage], "--device", "cpu").exit_code == 0
    write_mask(tmp_path / "mask.st", load_model(str(world["M"]), device="cpu")[0])
    assert run("select", tmp_path / "mask.st", "-o", tmp_path / "scales.st").exit_code == 0
    muted = tmp_path / "muted"
    assert run("apply", tmp_path / "scales.st", "-m", world["M"], "-o", muted, "--device", "cpu").exit_code == 0
    m, fp = world["M"], world["fp"]["M"]
    cases = [
        (m, bf16, f"reference model {bf16} has the weights of {m} rounded to bfloat16 (fingerprints {fp} and "
                  f"{rounded})"),
        (bf16, m, f"reference model {m} has the weights of {bf16} rounded to bfloat16 (fingerprints {rounded} and "
                  f"{fp})"),
        (m, made["quantize"], f"reference model {made['quantize']} was made from {m} by `neumuter quantize` (its "
                              f"neumuter.json names the fingerprint {fp})"),
        (m, made["relearn"], f"reference model {made['relearn']} was made from {m} by `neumuter relearn` (its "
                             f"neumuter.json names the fingerprint {fp})"),
        (muted, m, f"{muted} was made from reference model {m} by `neumuter apply` (its neumuter.json names the "
                   f"fingerprint {fp}): it is that model with some weights scaled or rounded"),
    ]
    for model, reference, detail in cases:
        result = run("measure", world["forget"], "-m", model, "--reference-model", reference, "--check",
                     "--allow-over-forgotten", "--device", "cpu")
        assert error_line(result) == f"Error: the reference is the model itself: {detail}{SELF}"
    own = scores(world, "M", "json")
    result = run("measure", world["forget"], "-m", muted, "--reference-scores", own, "--check", "--device", "cpu")
    assert error_line(result) == (f"Error: the reference is the model itself: {muted} was made from the model of "
                                  f"reference scores {own} by `neumuter apply` (its neumuter.json names the "
                                  f"fingerprint {fp}): it is that model with some weights scaled or rounded{SELF}")
    assert "measuring" not in result.stderr
    # a model that never saw the texts is still a reference for all of them
    for model in (muted, made["quantize"], bf16):
        assert run("measure", world["forget"], "-m", model, "--reference-model", world["R"], "--device",
                   "cpu").exit_code == 0


def test_scores_that_do_not_say_where_they_come_from_are_refused(world, tmp_path):
    data = json.loads(scores(world, "R", "json").read_text())
    anonymous = tmp_path / "anonymous.json"
    del data["summary"]["model"]
    for record in data["records"]:
        del record["model_fingerprint"]
    anonymous.write_text(json.dumps(data))
    mixed = tmp_path / "mixed.jsonl"
    rows = [dict(r, model_fingerprint=fp) for r, fp in zip(data["records"], [world["fp"]["R"], "0" * 32, "0" * 32])]
    write_jsonl(mixed, rows)
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [dict(r, model_fingerprint=["not", "hex"]) for r in data["records"]])
    for path, message in [
        (anonymous, f"{anonymous}: the scores do not say which model they were measured on (no "
                    "\"model_fingerprint\"): measure the reference model again with this neumuter "
                    "(`neumuter measure RECORDS --model REF --format json`)"),
        (mixed, f"{mixed}: the scores name 2 different model fingerprints ({'0' * 32}, {world['fp']['R']}, ...): "
                "they must all come from one run of `neumuter measure`"),
        (bad, f"{bad}: a model fingerprint in it is not 32 hexadecimal digits"),
    ]:
        result = run("measure", world["forget"], "-m", world["M"], "--reference-scores", path, "--check",
                     "--device", "cpu")
        assert error_line(result) == f"Error: {message}"
        assert "loading" not in result.stderr              # read before any model loads


# ---------------------------------------------------------------- 3. a checkpoint that does not load whole

def _delete(tensors):
    del tensors[C_FC]


def _as_int32(tensors):
    tensors[C_FC] = tensors[C_FC].to(torch.int32)


def _extra(tensors):
    tensors["transformer.h.0.extra.weight"] = torch.zeros(3)


def _narrow(config):
    config["hidden_size"] = 32


@pytest.mark.parametrize("name,edit_tensors,edit_config,message", [
    ("missing", _delete, None, f"cannot load {{path}}: weight {C_FC} is missing from the checkpoint (transformers "
                               "would fill it with random values)"),
    ("int32", _as_int32, None, f"cannot load {{path}}: model.safetensors stores the weight {C_FC} as I32, but it is a "
                               "floating-point weight (transformers would cast the integers without a word)"),
    ("unexpected", _extra, None, "cannot load {path}: the checkpoint holds transformer.h.0.extra.weight, which this "
                                 "model (gpt_neo) has no place for: the config does not describe these weights"),
    ("hidden", None, _narrow, "cannot load {path}: weight transformer.h.0.attn.attention.k_proj.weight has shape "
                              "[64, 64] in the checkpoint, but its config.json makes it [32, 32] (and 27 more): the "
                              "config does not describe these weights"),
])
@pytest.mark.parametrize("command", ["measure", "relearn"])
def test_a_checkpoint_that_does_not_load_whole_is_refused(world, tmp_path, name, edit_tensors, edit_config,
                                                          message, command):
    path = variant(world, name, edit_tensors, edit_config)
    out = tmp_path / "out"
    result = run(command, world["forget"], "-m", path, "-o", out, "--device", "cpu")
    assert error_line(result) == "Error: " + message.format(path=path)
    assert os.listdir(tmp_path) == []


def test_a_truncated_checkpoint_is_refused(world, tmp_path):
    path = tmp_path / "truncated"
    shutil.copytree(world["M"], path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    result = run("measure", world["forget"], "-m", path, "--device", "cpu")
    assert error_line(result) == (f"Error: {weights}: truncated (its tensors need {len(data)} bytes, the file "
                                  f"has {len(data) // 2})")
    weights.write_bytes(data[:5])
    result = run("measure", world["forget"], "-m", path, "--device", "cpu")
    assert error_line(result) == (f"Error: {weights}: not a complete safetensors file (its header says 0 bytes of "
                                  "metadata, the file has 5 bytes)")


# ---------------------------------------------------------------- 4. one line, never a traceback with status 1

@pytest.fixture(scope="module")
def small_vocab(world):
    """M with its embedding cut to 200 rows, under M's tokenizer of 400 tokens."""
    def cut(tensors):
        tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:200].contiguous()
    return variant(world, "small-vocab", cut, lambda config: config.update(vocab_size=200))


def test_an_embedding_smaller_than_the_tokenizer_is_refused_before_the_work(world, small_vocab):
    line = (f"{small_vocab}: its tokenizer has token ids up to 399, but its embedding has only 200 rows: the "
            "tokenizer does not belong to these weights")
    result = run("measure", world["forget"], "-m", small_vocab, "--device", "cpu")
    assert error_line(result) == f"Error: {line}" and "measuring" not in result.stderr
    result = run("measure", world["forget"], "-m", world["M"], "--reference-model", small_vocab, "--check",
                 "--device", "cpu")
    assert error_line(result) == f"Error: reference model {line}"
    assert "loading" not in result.stderr                 # before the first model loads, let alone is measured


def test_relearn_max_length_is_bounded_by_the_context(world, tmp_path):
    long = write_jsonl(tmp_path / "long.jsonl", [{"id": "long", "text": " ".join(PEOPLE * 6)}])
    tokens = len(load_model(str(world["M"]), device="cpu")[1](" ".join(PEOPLE * 6))["input_ids"])
    for max_length, length in (("300", 300), ("100000", tokens)):
        out = tmp_path / "rl"
        result = run("relearn", long, "-m", world["M"], "--max-length", max_length, "-o", out, "--device", "cpu")
        assert error_line(result) == (f"Error: a text (use a smaller --max-length) of {length} tokens is longer than "
                                      "the model's context (256 tokens)")
        assert not out.exists() and "step" not in result.stderr


def python(*args, closed=(), stdin=None, start=None, **kwargs):
    """``python -m neumuter_cli ARGS`` in a child, with the file descriptors ``closed`` closed
    (as a shell's ``>&-`` does) and SIGINT at its default (a child of a background job would
    ignore it otherwise)."""
    def prepare():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        for fd in closed:
            os.close(fd)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "neumuter_cli", *map(str, args)]
    if start:
        return subprocess.Popen(command, env=env, preexec_fn=prepare, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    return subprocess.run(command, env=env, preexec_fn=prepare, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL if 1 in closed else subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=300, **kwargs)


def test_closed_stdout_is_one_line_before_the_work(world, tmp_path):
    from test_select_apply import write_mask

    model, _ = load_model(str(world["M"]), device="cpu")
    write_mask(tmp_path / "mask.st", model)
    for args in (["select", tmp_path / "mask.st"], ["measure", world["forget"], "-m", world["M"], "--device", "cpu"]):
        done = python(*args, closed=(1,))
        assert done.returncode == 3, done.stderr
        assert done.stderr.splitlines() == ["Error: cannot write to stdout: it is closed (write to a file instead)"], done.stderr


def test_closed_stdin_is_one_line(world):
    done = python("measure", "-m", world["M"], "--device", "cpu", "-o", os.devnull, closed=(0,))
    assert done.returncode == 3 and done.stderr.splitlines() == ["Error: no input: stdin is closed"], done.stderr


# ---------------------------------------------------------------- 5. signals, usage, wording

@pytest.mark.parametrize("command,sent,status", [
    ("relearn", signal.SIGINT, 130),
    ("localize", signal.SIGTERM, 143),
])
def test_a_signal_through_a_real_command_leaves_nothing_behind(world, tmp_path, command, sent, status):
    work = tmp_path / "work"
    work.mkdir()
    if command == "relearn":
        args = ["relearn", world["forget"], "-m", world["M"], "--steps", 100000, "-o", work / "out"]
        started = "step "
    else:
        nb = write_jsonl(tmp_path / "nb.jsonl", [{"text": t, "neighbors": [PEOPLE[-1]]} for t in PEOPLE[:2]])
        args = ["localize", nb, "-m", world["M"], "--epochs", 100000, "--stop-ma", 0, "-o", work / "mask.st"]
        started = "epoch "
    process = python(*args, "--device", "cpu", start=True)
    try:
        seen = []
        for line in process.stderr:
            seen.append(line)
            if line.lstrip().startswith(started):
                break
        else:
            pytest.fail("".join(seen))
        process.send_signal(sent)
        assert process.wait(timeout=120) == status
        rest = process.stderr.read()
    finally:
        process.kill()
        process.wait()
    assert "Traceback" not in rest
    if sent == signal.SIGINT:
        assert rest.splitlines()[-1] == "Aborted!"
    assert os.listdir(work) == []


def test_apply_in_another_dtype_says_so(world, tmp_path):
    from test_select_apply import write_mask

    model, _ = load_model(str(world["M"]), device="cpu")
    write_mask(tmp_path / "mask.st", model)
    assert run("select", tmp_path / "mask.st", "-o", tmp_path / "scales.st").exit_code == 0
    result = run("apply", tmp_path / "scales.st", "-m", world["M"], "--dtype", "bfloat16", "-o", tmp_path / "out",
                 "--device", "cpu")
    rounded = fingerprint(load_model(str(world["M"]), device="cpu", dtype="bfloat16")[0])
    assert error_line(result) == (
        f"Error: --dtype bfloat16 rounds the float32 weights of {world['M']}, so they are no longer the weights "
        f"{tmp_path / 'scales.st'} was made for (fingerprint {world['fp']['M']}, rounded {rounded}): apply with "
        "--dtype auto (the stored float32), or localize and select on the model loaded as bfloat16")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["relearn", "quantize", "apply"])
def test_an_output_that_is_a_symbolic_link_is_refused_before_the_work(world, tmp_path, command):
    from test_select_apply import write_mask

    previous = tmp_path / "previous"
    (previous).mkdir()
    (previous / "neumuter.json").write_text(json.dumps({"kind": "neumuter-checkpoint", "files": ["neumuter.json"]}))
    link = tmp_path / "link"
    link.symlink_to(previous)
    if command == "apply":
        inputs = tmp_path / "inputs"
        inputs.mkdir()
        write_mask(inputs / "mask.st", load_model(str(world["M"]), device="cpu")[0])
        assert run("select", inputs / "mask.st", "-o", inputs / "scales.st").exit_code == 0
    args = {"relearn": [world["forget"]], "quantize": ["--type", "q8_0"],
            "apply": [tmp_path / "inputs" / "scales.st"]}[command]
    result = run(command, *args, "-m", world["M"], "-o", link, "--force", "--device", "cpu")
    assert error_line(result) == (f"Error: refusing to write the checkpoint to {link}: it is a symbolic link (to "
                                  f"{previous}); give the folder itself, or a new folder")
    assert "loading" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(["link", "previous"] + (["inputs"] if command == "apply" else []))
    assert os.listdir(previous) == ["neumuter.json"]


def test_a_model_without_its_tokenizer_is_named(world, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(world["M"], bare)
    for name in os.listdir(bare):
        if "token" in name or name in ("vocab.json", "merges.txt"):
            os.remove(bare / name)
    result = run("measure", world["forget"], "-m", bare, "--device", "cpu")
    assert error_line(result) == (f"Error: cannot load the tokenizer of {bare}: it turns text into no tokens at all "
                                  "(are its tokenizer files missing from the folder?)")


def test_a_broken_config_is_the_model_s_fault_not_the_tokenizer_s(world, tmp_path):
    """Found trying more: a config.json that is not JSON, or that transformers' own validation
    refuses, was reported as "cannot load the tokenizer"; a validation error lost its reason."""
    broken = tmp_path / "broken"
    shutil.copytree(world["M"], broken)
    (broken / "config.json").write_text("{not json")
    result = run("measure", world["forget"], "-m", broken, "--device", "cpu")
    assert error_line(result) == (f"Error: cannot load {broken}: It looks like the config file at "
                                  f"'{broken / 'config.json'}' is not a valid JSON file.")
    config = json.loads((world["M"] / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    line = error_line(run("measure", world["forget"], "-m", broken, "--device", "cpu"))
    assert line.startswith(f"Error: cannot load {broken}: Class validation error for validator "
                           "'validate_architecture': ValueError: Configuration for convolutional module is incorrect.")


def test_every_measurement_of_a_broken_model_names_its_input(world, tmp_path):
    """The reference set (--reference), the holdout texts and the perplexity corpus are named
    as the records are."""
    unseen = write_jsonl(tmp_path / "unseen.jsonl", [{"id": "u0", "text": PEOPLE[4]}])
    tail = ("computes a non-finite logit or loss{at} (NaN or infinity): its weights are broken, so no number it "
            "gives means anything; no verdict is given")
    result = run("measure", world["forget"], "-m", world["NaN"], "--reference", unseen, "--el-n", "0", "--device",
                 "cpu")
    assert error_line(result) == f"Error: {world['forget']}: record p0: model {world['NaN']} " + tail.format(
        at=" at token 2")
    result = run("measure", "-m", world["NaN"], "--ppl", unseen, "--device", "cpu")
    assert error_line(result) == f"Error: {unseen}: record u0: model {world['NaN']} " + tail.format(at="")
    # the holdout under the reference model: the model's own numbers are fine, the reference's are not
    result = run("measure", world["forget"], "-m", world["M"], "--reference-model", world["NaN"], "--holdout", unseen,
                 "--el-n", "0", "--device", "cpu")
    assert error_line(result) == f"Error: {world['forget']}: record p0: reference model {world['NaN']} " + tail.format(
        at=" at token 2")


@pytest.mark.parametrize("content,problem", [
    ('{"ma": NaN, "el_10": 0.1, "loss": 1}', "not a JSON file (NaN is not a JSON value)"),
    ('{"ma": 1e999, "el_10": 0.1, "loss": 1}', "not a JSON file (the number 1e999 is out of range)"),
    ('{"ma": 0.5, "el_10": 0.1, "loss": 1' + "0" * 400 + "}", "no number for threshold 'loss' (measure the "
                                                              "reference set with the same --el-n)"),
    ('{"ma": ' + "[" * 5000 + "]" * 5000 + "}", "not a JSON file (nested too deeply)"),
])
def test_a_thresholds_file_holds_finite_numbers(world, tmp_path, content, problem):
    path = tmp_path / "thresholds.json"
    path.write_text(content)
    result = run("measure", world["forget"], "-m", world["M"], "--thresholds", path, "--check", "--device", "cpu")
    assert error_line(result) == f"Error: {path}: {problem}"
    assert "loading" not in result.stderr
