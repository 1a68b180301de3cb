"""`select` (selection rules → scales file) and `apply` (scales folded into a checkpoint)."""
import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import save_tiny, tiny_model
from neumuter_cli import NeumuterError, __version__
from neumuter_cli.apply import apply_scales, apply_scales_file, save_checkpoint
from neumuter_cli.cli import cli
from neumuter_cli.gates import deterministic_gate, initial_log_alpha
from neumuter_cli.models import describe, find_ffn_layers, fingerprint, gated, load_model
from neumuter_cli.artifacts import FORMAT_VERSION, load_artifact, save_artifact
from neumuter_cli.records import sha256_file
from neumuter_cli.select import energy_threshold, select, select_from_mask, select_neurons

# ---------------------------------------------------------------- the rules, by hand

# 12 gate values over two blocks; sorted: 0, .1, .25, .25, .5, then seven 1.0 (untouched);
# total energy 8.1.
HAND = {
    0: torch.tensor([1.0, 1.0, 0.0, 0.5, 1.0, 0.25]),
    1: torch.tensor([0.1, 1.0, 1.0, 0.25, 1.0, 1.0]),
}


def chosen_positions(chosen):
    return sorted((b, int(i)) for b, flags in chosen.items() for i in flags.nonzero().flatten())


@pytest.mark.parametrize("fraction,epsilon,expected", [
    # 5 % of 8.1 = 0.405: cumulative 0, .1, .35, .6 → reached at the first 0.25; both 0.25s are
    # tied with eps and left out
    (0.05, 0.25, [(0, 2), (1, 0)]),
    # 10 % = 0.81: cumulative .6, 1.1 → reached at 0.5
    (0.10, 0.5, [(0, 2), (0, 5), (1, 0), (1, 3)]),
    # 50 % = 4.05: reached among the 1.0s → every moved gate, never an untouched one
    (0.50, 1.0, [(0, 2), (0, 3), (0, 5), (1, 0), (1, 3)]),
    (1.00, 1.0, [(0, 2), (0, 3), (0, 5), (1, 0), (1, 3)]),
])
def test_energy_rule_by_hand(fraction, epsilon, expected):
    chosen, eps = select(HAND, "energy", fraction)
    assert eps == pytest.approx(epsilon)
    assert chosen_positions(chosen) == expected
    assert energy_threshold(torch.cat([HAND[0], HAND[1]]), fraction) == pytest.approx(epsilon)


def test_energy_rule_ignores_block_order_and_zero_energy():
    swapped = {0: HAND[1], 1: HAND[0]}
    chosen, eps = select(swapped, "energy", 0.05)
    assert eps == pytest.approx(0.25)
    assert chosen_positions(chosen) == [(0, 0), (1, 2)]
    # all gates closed: no energy, eps = 0, and every gate is selected (each is fully closed)
    assert energy_threshold(torch.zeros(4), 0.05) == 0.0
    chosen, eps = select({2: torch.zeros(3), 5: torch.zeros(2)}, "energy", 0.05)
    assert eps == 0.0 and chosen[2].all() and chosen[5].all()
    # all gates untouched: nothing selected
    chosen, eps = select({3: torch.ones(8)}, "energy", 0.05)
    assert eps == 1.0 and not chosen[3].any()


@pytest.mark.parametrize("value,expected", [
    (0.3, [(0, 2), (0, 5), (1, 0), (1, 3)]),
    (0.25, [(0, 2), (1, 0)]),                              # strictly below
    (1.5, [(0, 2), (0, 3), (0, 5), (1, 0), (1, 3)]),       # never a gate at 1.0
])
def test_threshold_rule_by_hand(value, expected):
    chosen, eps = select(HAND, "threshold", value)
    assert eps == value
    assert chosen_positions(chosen) == expected


@pytest.mark.parametrize("fraction,expected,epsilon", [
    (0.25, [(0, 2), (0, 5), (1, 0)], 0.25),                 # n = 3; tie at .25 → lower block first
    (1.0, [(0, 2), (0, 3), (0, 5), (1, 0), (1, 3)], 0.5),   # n = 12, but 1.0s are skipped
    (0.05, [], None),                                       # n = floor(0.6) = 0
])
def test_top_fraction_rule_by_hand(fraction, expected, epsilon):
    chosen, eps = select(HAND, "top-fraction", fraction)
    assert chosen_positions(chosen) == expected
    assert eps == (None if epsilon is None else pytest.approx(epsilon))


def test_scales_are_gate_values_for_selected_and_one_elsewhere():
    scales = select_neurons(HAND, "energy", 0.10)
    assert torch.equal(scales[0], torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.25]))
    assert torch.equal(scales[1], torch.tensor([0.1, 1.0, 1.0, 0.25, 1.0, 1.0]))
    assert all(s.dtype == torch.float32 for s in scales.values())


@pytest.mark.parametrize("rule,value,message", [
    ("energy", 0, "energy is a fraction: it must be in (0, 1], not 0"),
    ("energy", 1.5, "energy is a fraction: it must be in (0, 1], not 1.5"),
    ("top-fraction", -0.1, "top_fraction is a fraction: it must be in (0, 1], not -0.1"),
    ("threshold", 0, "threshold must be > 0 (no gate value is below 0)"),
    ("threshold", float("nan"), "threshold must be a finite number, not nan"),
    ("bogus", 0.1, "unknown selection rule 'bogus' (choose energy, threshold, top-fraction)"),
])
def test_bad_rule_values_are_refused(rule, value, message):
    with pytest.raises(NeumuterError) as info:
        select(HAND, rule, value)
    assert str(info.value) == message
    if rule != "bogus":       # a setting: the CLI names its flag
        assert info.value.setting == rule.replace("-", "_")


# ---------------------------------------------------------------- mask files

def log_alpha_for(gate_values: torch.Tensor) -> torch.Tensor:
    """log_alpha whose deterministic gate is (close to) the given value; 1.0 → the init value."""
    g = gate_values.double()
    s = ((g + 0.1) / 1.2).clamp(1e-6, 1 - 1e-6)
    alpha = torch.log(s / (1 - s))
    alpha[g >= 1.0] = initial_log_alpha()
    return alpha.float()


def random_gates(neurons: int, seed: int, moved: float = 0.3) -> torch.Tensor:
    """Mostly untouched gates (1.0), a share of them moved to random values in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    gates = torch.ones(neurons)
    which = torch.rand(neurons, generator=g) < moved
    gates[which] = torch.rand(int(which.sum()), generator=g) * 0.9
    return gates


def write_mask(path, model, blocks=None, seed=0, log_alphas=None):
    """A hand-made mask file in the format `localize` writes."""
    layers = find_ffn_layers(model)
    blocks = [layer.index for layer in layers] if blocks is None else blocks
    if log_alphas is None:
        log_alphas = {b: log_alpha_for(random_gates(layers[b].neurons, seed + b)) for b in blocks}
    meta = {"kind": "neumuter-mask", "format_version": FORMAT_VERSION, **describe(model, layers), "layers": blocks,
            "hyperparameters": {"beta": 0.3, "epochs": 3}, "forget_sha256": "0" * 64,
            "losses": {"forget": 9.0}, "tool_version": __version__}
    save_artifact({f"log_alpha.{b}": a for b, a in log_alphas.items()}, meta, str(path))
    return log_alphas


def token_ids():
    return torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(5))


def logits(model, gates=None, layers=None):
    with torch.no_grad():
        if gates is None:
            return model(token_ids()).logits
        with gated(layers, lambda i: gates[layers[i].index]):
            return model(token_ids()).logits


def full_scales(layers, scales_by_block):
    return {layer.index: scales_by_block.get(layer.index, torch.ones(layer.neurons)) for layer in layers}


# ---------------------------------------------------------------- library: fold + save

@pytest.mark.parametrize("arch", ["gpt_neo", "gpt2"])
def test_checkpoint_reloads_with_the_gated_logits_and_only_selected_columns_change(arch, tmp_path):
    source = tiny_model(arch)
    layers = find_ffn_layers(source)
    gates = {layer.index: random_gates(layer.neurons, layer.index) for layer in layers}
    scales = select_neurons(gates, "threshold", 0.5)
    expected = logits(source, full_scales(layers, scales), layers)
    before = {k: v.clone() for k, v in source.state_dict().items()}

    scaled = apply_scales(source, layers, scales)
    assert scaled == {b: int((s != 1).sum()) for b, s in scales.items()} and sum(scaled.values()) > 0
    save_checkpoint(source, None, str(tmp_path / "out"), {"note": "test"})

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert (logits(reloaded) - expected).abs().max() <= 1e-5
    after = reloaded.state_dict()
    down = {layer.path + ".weight": layer for layer in layers}
    for key, old in before.items():
        if key not in down:
            assert torch.equal(after[key], old), f"{key} changed"
            continue
        layer = down[key]
        columns_old = old.t() if layer.conv1d else old
        columns_new = after[key].t() if layer.conv1d else after[key]
        changed = (columns_old != columns_new).any(dim=0)
        selected = scales[layer.index] != 1
        assert torch.equal(changed & ~selected, torch.zeros_like(changed)), "an unselected neuron changed"
        assert torch.allclose(columns_new, columns_old * scales[layer.index][None, :])
    record = json.loads((tmp_path / "out" / "neumuter.json").read_text())
    assert record == {"note": "test", "kind": "neumuter-checkpoint", "files": sorted(os.listdir(tmp_path / "out"))}


def test_apply_scales_refuses_unknown_blocks_and_wrong_widths():
    model = tiny_model("gpt_neo")
    layers = find_ffn_layers(model)
    with pytest.raises(NeumuterError, match="block 7"):
        apply_scales(model, layers, {7: torch.ones(64)})
    with pytest.raises(NeumuterError, match="3 scales for 64 neurons"):
        apply_scales(model, layers, {0: torch.ones(3)})


def test_select_from_mask_carries_the_provenance(tmp_path):
    model = tiny_model("gpt_neo")
    write_mask(tmp_path / "mask.safetensors", model, blocks=[1])
    tensors, meta = load_artifact(str(tmp_path / "mask.safetensors"), kind="neumuter-mask")
    scales, out = select_from_mask(tensors, meta, "energy", 0.05, mask_sha256="abc")
    gates = deterministic_gate(tensors["log_alpha.1"])
    chosen, eps = select({1: gates}, "energy", 0.05)
    assert list(scales) == ["scale.1"]
    assert torch.equal(scales["scale.1"], torch.where(chosen[1], gates, torch.ones(64)))
    assert out["kind"] == "neumuter-scales" and out["mask_sha256"] == "abc"
    for key in ("model", "architecture", "fingerprint", "modules", "neurons", "hyperparameters",
                "forget_sha256", "losses"):
        assert out[key] == meta[key]
    assert out["layers"] == [1] and out["total_neurons"] == 64
    assert out["rule"] == {"name": "energy", "value": 0.05} and out["epsilon"] == eps
    assert out["selected"] == out["selected_per_layer"]["1"] == int(chosen[1].sum()) > 0


# ---------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def neo(tmp_path_factory):
    """The tiny GPT-Neo saved to disk, and the same model loaded the way the CLI loads it."""
    path = tmp_path_factory.mktemp("neo-src")
    save_tiny(path, "gpt_neo")
    model, _ = load_model(str(path), device="cpu")
    return str(path), model


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def test_select_apply_pipeline(neo, tmp_path):
    src, model = neo
    layers = find_ffn_layers(model)
    mask = tmp_path / "mask.safetensors"
    log_alphas = write_mask(mask, model, blocks=[0, 1])

    # select → stdout → apply from stdin, the way they pipe
    selected = run("select", mask, "--threshold", "0.4")
    assert selected.exit_code == 0, selected.output
    assert "total" in selected.stderr and "block" in selected.stderr
    applied = run("apply", "-", "--model", src, "-o", tmp_path / "muted", "--device", "cpu",
                  input=selected.stdout_bytes)
    assert applied.exit_code == 0, applied.output

    gates = {b: deterministic_gate(a) for b, a in log_alphas.items()}
    scales = select_neurons(gates, "threshold", 0.4)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "muted", dtype=torch.float32).eval()
    assert (logits(reloaded) - logits(model, scales, layers)).abs().max() <= 1e-5
    assert os.path.isfile(tmp_path / "muted" / "tokenizer.json")
    assert os.path.isfile(tmp_path / "muted" / "model.safetensors")

    record = json.loads((tmp_path / "muted" / "neumuter.json").read_text())
    assert record["source_model"] == src and record["tool_version"] == __version__
    assert record["rule"] == {"name": "threshold", "value": 0.4}
    counts = {str(b): int((s != 1).sum()) for b, s in scales.items()}
    assert record["neurons_scaled_per_layer"] == counts and record["neurons_scaled"] == sum(counts.values())
    scales_file = tmp_path / "scales.safetensors"
    scales_file.write_bytes(selected.stdout_bytes)
    assert record["scales_sha256"] == sha256_file(str(scales_file))
    assert record["mask_sha256"] == sha256_file(str(mask))
    # the provenance by value: the model before and after, the texts the mask was made to forget
    assert record["source_fingerprint"] == fingerprint(model)
    assert record["fingerprint"] == fingerprint(load_model(str(tmp_path / "muted"), device="cpu")[0])
    assert record["fingerprint"] != record["source_fingerprint"]
    assert record["forget_sha256"] == load_artifact(str(mask))[1]["forget_sha256"] == "0" * 64


def test_default_rule_files_and_a_subset_of_blocks(neo, tmp_path):
    src, model = neo
    layers = find_ffn_layers(model)
    mask, scales_path = tmp_path / "mask.safetensors", tmp_path / "scales.safetensors"
    log_alphas = write_mask(mask, model, blocks=[1], seed=3)
    result = run("select", mask, "-o", scales_path)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    tensors, meta = load_artifact(str(scales_path), kind="neumuter-scales")
    assert meta["rule"] == {"name": "energy", "value": 0.05} and list(tensors) == ["scale.1"]
    expected = select_neurons({1: deterministic_gate(log_alphas[1])}, "energy", 0.05)
    assert torch.equal(tensors["scale.1"], expected[1]) and meta["selected"] > 0

    result = run("apply", scales_path, "-m", src, "-o", tmp_path / "muted", "--device", "cpu")
    assert result.exit_code == 0, result.output
    saved = load_file(str(tmp_path / "muted" / "model.safetensors"))
    source = model.state_dict()
    assert torch.equal(saved[layers[0].path + ".weight"], source[layers[0].path + ".weight"])
    assert not torch.equal(saved[layers[1].path + ".weight"], source[layers[1].path + ".weight"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "muted", dtype=torch.float32).eval()
    assert (logits(reloaded) - logits(model, full_scales(layers, expected), layers)).abs().max() <= 1e-5


def test_two_applies_compose(neo, tmp_path):
    src, model = neo
    layers = find_ffn_layers(model)
    first_alphas = write_mask(tmp_path / "m1.safetensors", model, seed=10)
    assert run("select", tmp_path / "m1.safetensors", "-o", tmp_path / "s1.safetensors").exit_code == 0
    assert run("apply", tmp_path / "s1.safetensors", "-m", src, "-o", tmp_path / "one",
               "--device", "cpu").exit_code == 0

    muted, _ = load_model(str(tmp_path / "one"), device="cpu")
    second_alphas = write_mask(tmp_path / "m2.safetensors", muted, blocks=[0], seed=20)
    # the first mask was made for the source model: refused on the muted one
    result = run("apply", tmp_path / "s1.safetensors", "-m", tmp_path / "one", "-o", tmp_path / "bad",
                 "--device", "cpu")
    assert result.exit_code == 3
    assert result.stderr.splitlines()[-1] == (
        f"Error: {tmp_path / 's1.safetensors'} was made for model {src} (fingerprint {fingerprint(model)}), but "
        f"--model {tmp_path / 'one'} has fingerprint {fingerprint(muted)}: localize and select on the model you "
        "apply to")
    assert run("select", tmp_path / "m2.safetensors", "--energy", "0.2",
               "-o", tmp_path / "s2.safetensors").exit_code == 0
    result = run("apply", tmp_path / "s2.safetensors", "-m", tmp_path / "one", "-o", tmp_path / "two",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output

    s1 = select_neurons({b: deterministic_gate(a) for b, a in first_alphas.items()}, "energy", 0.05)
    s2 = select_neurons({0: deterministic_gate(second_alphas[0])}, "energy", 0.2)
    assert (s2[0] != 1).any()
    combined = {b: s1[b] * s2.get(b, torch.ones_like(s1[b])) for b in s1}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two", dtype=torch.float32).eval()
    assert (logits(reloaded) - logits(model, combined, layers)).abs().max() <= 1e-5
    record = json.loads((tmp_path / "two" / "neumuter.json").read_text())
    assert record["source_model"] == str(tmp_path / "one")
    assert [r["source_model"] for r in record["history"]] == [src]


def test_fingerprint_mismatch_is_refused_naming_both(neo, tmp_path):
    src, model = neo
    other = tmp_path / "other"
    save_tiny(other, "gpt_neo", seed=1)
    write_mask(tmp_path / "mask.safetensors", model)
    assert run("select", tmp_path / "mask.safetensors", "-o", tmp_path / "s.safetensors").exit_code == 0
    result = run("apply", tmp_path / "s.safetensors", "-m", other, "-o", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 3
    made_for = load_artifact(str(tmp_path / "s.safetensors"))[1]["fingerprint"]
    assert made_for == fingerprint(model)
    assert result.stderr.splitlines()[-1] == (
        f"Error: {tmp_path / 's.safetensors'} was made for model {src} (fingerprint {made_for}), but --model {other} "
        f"has fingerprint {fingerprint(load_model(str(other), device='cpu')[0])}: localize and select on the model "
        "you apply to")
    assert not (tmp_path / "out").exists()


def test_non_mask_input_is_refused(neo, tmp_path):
    src, model = neo
    text = tmp_path / "forget.jsonl"
    text.write_text('{"text": "hello"}\n')
    result = run("select", text, "-o", tmp_path / "s.safetensors")
    assert result.exit_code == 3 and "not a safetensors file" in result.stderr
    assert not (tmp_path / "s.safetensors").exists()

    write_mask(tmp_path / "mask.safetensors", model)
    assert run("select", tmp_path / "mask.safetensors", "-o", tmp_path / "s.safetensors").exit_code == 0
    # a scales file is not a mask, and a mask is not a scales file
    result = run("select", tmp_path / "s.safetensors", "-o", tmp_path / "s2.safetensors")
    assert result.exit_code == 3 and "neumuter-mask" in result.stderr
    result = run("apply", tmp_path / "mask.safetensors", "-m", src, "-o", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 3 and "neumuter-scales" in result.stderr
    assert not (tmp_path / "s2.safetensors").exists() and not (tmp_path / "out").exists()
    result = run("select", tmp_path / "missing.safetensors")
    assert result.exit_code == 3 and "cannot read" in result.stderr


def test_malformed_masks_are_refused(neo, tmp_path):
    _, model = neo
    nan = write_mask(tmp_path / "nan.safetensors", model, blocks=[0])
    nan[0][3] = float("nan")
    write_mask(tmp_path / "nan.safetensors", model, blocks=[0], log_alphas=nan)
    result = run("select", tmp_path / "nan.safetensors", "-o", tmp_path / "s.safetensors")
    assert result.exit_code == 3 and "NaN" in result.stderr
    assert not (tmp_path / "s.safetensors").exists()

    write_mask(tmp_path / "short.safetensors", model, log_alphas={1: torch.zeros(5)})
    result = run("select", tmp_path / "short.safetensors")
    assert result.exit_code == 3 and "block 1 has 64 neurons" in result.stderr

    result = run("select", tmp_path / "short.safetensors", "--energy", "0.1", "--threshold", "0.2")
    assert result.exit_code == 2 and "at most one" in result.stderr
    result = run("select", tmp_path / "nan.safetensors", "--energy", "2")
    assert result.exit_code == 2 and "2.0 is not in the range 0<x<=1" in result.stderr


def test_existing_output_is_refused_and_force_replaces_only_a_previous_checkpoint(neo, tmp_path):
    src, model = neo
    write_mask(tmp_path / "mask.safetensors", model)
    assert run("select", tmp_path / "mask.safetensors", "-o", tmp_path / "s.safetensors").exit_code == 0
    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    for force in ([], ["--force"]):   # a folder that is not a neumuter checkpoint: never replaced
        result = run("apply", tmp_path / "s.safetensors", "-m", src, "-o", out, "--device", "cpu", *force)
        assert result.exit_code == 3 and "--force" in result.stderr
        assert result.stderr.splitlines()[-1] == (
            f"Error: {out} exists and is not empty, and is not a neumuter checkpoint (it has no readable "
            "neumuter.json); --force only replaces a previous checkpoint: give a new folder")
        assert sorted(os.listdir(tmp_path / "work")) == ["out"] and os.listdir(out) == ["keep.txt"]

    # the library refuses too, before folding anything
    tensors, meta = load_artifact(str(tmp_path / "s.safetensors"))
    fresh, tok = load_model(src, device="cpu")
    weights = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(NeumuterError, match="not empty"):
        apply_scales_file(fresh, tok, tensors, meta, str(out), force=True)
    assert all(torch.equal(v, weights[k]) for k, v in fresh.state_dict().items())

    # a previous checkpoint: refused without --force, replaced with it
    previous = tmp_path / "work" / "previous"
    assert run("apply", tmp_path / "s.safetensors", "-m", src, "-o", previous, "--device", "cpu").exit_code == 0
    result = run("apply", tmp_path / "s.safetensors", "-m", src, "-o", previous, "--device", "cpu")
    assert result.exit_code == 3
    assert result.stderr.splitlines()[-1] == (f"Error: {previous} holds a previous neumuter checkpoint "
                                              "(use --force to replace it)")
    result = run("apply", tmp_path / "s.safetensors", "-m", src, "-o", previous, "--device", "cpu", "--force")
    assert result.exit_code == 0, result.output
    assert "neumuter.json" in os.listdir(previous)
    assert sorted(os.listdir(tmp_path / "work")) == ["out", "previous"]
    # ... but not once something else was put into it
    (previous / "notes.txt").write_text("mine")
    result = run("apply", tmp_path / "s.safetensors", "-m", src, "-o", previous, "--device", "cpu", "--force")
    assert result.exit_code == 3 and "it holds 'notes.txt', which neumuter did not write there" in result.stderr
    assert (previous / "notes.txt").read_text() == "mine"


def test_apply_keeps_the_checkpoint_dtype(tmp_path):
    src = tmp_path / "bf16"
    model, tok = save_tiny(tmp_path / "f32", "gpt_neo")
    model.to(torch.bfloat16).save_pretrained(src)
    tok.save_pretrained(src)
    loaded, _ = load_model(str(src), device="cpu", dtype="bfloat16")
    write_mask(tmp_path / "mask.safetensors", loaded)
    assert run("select", tmp_path / "mask.safetensors", "-o", tmp_path / "s.safetensors").exit_code == 0
    result = run("apply", tmp_path / "s.safetensors", "-m", src, "-o", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
    assert json.loads((tmp_path / "out" / "neumuter.json").read_text())["dtype"] == "bfloat16"
