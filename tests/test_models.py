"""The locator, gates and folding on tiny random models of many architectures."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import ARCHITECTURES, tiny_model
from neumuter_cli import NeumuterError
from neumuter_cli.errors import SettingError
from neumuter_cli.models import find_ffn_layers, fingerprint, fold_scales, gated, parse_layers

EXPECTED_WIDTH = {"bloom": 4 * 32}  # BLOOM's FFN is always 4 x hidden


def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 300, (2, 12), generator=g)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_locator_finds_every_block_with_its_width(arch):
    model = tiny_model(arch)
    layers = find_ffn_layers(model)
    assert [layer.index for layer in layers] == [0, 1]
    assert all(layer.neurons == EXPECTED_WIDTH.get(arch, 64) for layer in layers)
    assert len({layer.path for layer in layers}) == 2
    assert layers[0].conv1d == (arch == "gpt2")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gates_and_folding(arch, tmp_path):
    model = tiny_model(arch)
    layers = find_ffn_layers(model)
    x = ids()
    with torch.no_grad():
        plain = model(x).logits
        with gated(layers, lambda i: torch.ones(layers[i].neurons)):
            ones = model(x).logits
        assert torch.equal(plain, ones), "an all-ones gate must leave the logits bit-identical"

        # zeroing neuron i == zeroing column i of W2
        neuron = 5
        zero = torch.ones(layers[0].neurons)
        zero[neuron] = 0
        with gated(layers[:1], lambda i: zero):
            gated_zero = model(x).logits
        weight = layers[0].module.weight
        saved = weight.clone()
        if layers[0].conv1d:
            weight[neuron, :] = 0
        else:
            weight[:, neuron] = 0
        column_zero = model(x).logits
        weight.copy_(saved)
        assert (gated_zero - column_zero).abs().max() <= 1e-5
        assert not torch.allclose(gated_zero, plain)

        # folding random scales == gating with them, also after save + plain from_pretrained
        g = torch.Generator().manual_seed(2)
        scales = [torch.rand(layer.neurons, generator=g) for layer in layers]
        with gated(layers, lambda i: scales[i]):
            gated_logits = model(x).logits
        fold_scales(layers, scales)
        assert (model(x).logits - gated_logits).abs().max() <= 1e-5
        model.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        assert (reloaded(x).logits - gated_logits).abs().max() <= 1e-5


def test_folding_keeps_float64_precision():
    model = tiny_model("llama").double()
    layers = find_ffn_layers(model)
    scales = [torch.full((layer.neurons,), 1 / 3, dtype=torch.float64) for layer in layers]
    expected = [layer.module.weight.clone() * (1 / 3) for layer in layers]
    fold_scales(layers, scales)
    for layer, want in zip(layers, expected):
        assert layer.module.weight.dtype == torch.float64
        assert (layer.module.weight - want).abs().max() <= 1e-15


def test_hooks_are_removed_even_on_error():
    model = tiny_model("llama")
    layers = find_ffn_layers(model)
    with pytest.raises(RuntimeError):
        with gated(layers, lambda i: torch.zeros(layers[i].neurons)):
            raise RuntimeError("boom")
    assert all(not layer.module._forward_pre_hooks for layer in layers)


@pytest.mark.parametrize("arch,weight,element", [
    ("gpt_neo", "transformer.h.1.mlp.c_fc.weight", (5, 3)),              # FFN up-projection
    ("gpt_neo", "transformer.h.0.attn.attention.q_proj.weight", (0, 0)),  # attention
    ("gpt_neo", "transformer.h.1.mlp.c_proj.weight", (17, 63)),           # one element of a middle row
    ("gpt_neo", "transformer.ln_f.bias", (7,)),
    ("llama", "model.layers.0.mlp.up_proj.weight", (1, 1)),
    ("llama", "model.layers.1.self_attn.o_proj.weight", (2, 9)),
    ("llama", "model.layers.1.mlp.down_proj.weight", (30, 40)),
])
def test_fingerprint_sees_every_weight(arch, weight, element):
    model = tiny_model(arch)
    before = fingerprint(model)
    assert fingerprint(model) == before and len(before) == 32
    with torch.no_grad():
        model.get_parameter(weight)[element] += 1e-3
    assert fingerprint(model) != before


def test_fingerprint_sees_a_folded_scale_and_not_the_storage_dtype():
    model = tiny_model("gpt_neo")
    layers = find_ffn_layers(model)
    before = fingerprint(model)
    scales = [torch.ones(layer.neurons) for layer in layers]
    scales[1][63] = 0.5
    fold_scales(layers, scales)
    folded = fingerprint(model)
    assert folded != before
    # the same values in bfloat16 (a checkpoint stored in bfloat16, loaded either way): the same model
    model.to(torch.bfloat16)
    in_bf16 = fingerprint(model)
    model.to(torch.float32)
    assert fingerprint(model) == in_bf16 != folded   # rounding to bfloat16 changed the values
    model.to(torch.float16).to(torch.float32)
    assert fingerprint(model) != in_bf16


def test_unsupported_architecture_is_refused_by_type():
    class NoFFN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "weird-lm"})()
            self.embed = torch.nn.Embedding(10, 8)
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)])

        def get_input_embeddings(self):
            return self.embed

    with pytest.raises(NeumuterError, match="weird-lm"):
        find_ffn_layers(NoFFN())


@pytest.mark.parametrize("spec,expected", [(None, [0, 1, 2, 3]), ("all", [0, 1, 2, 3]),
                                           ("1-2", [1, 2]), ("0,3", [0, 3]), ("2,0-1", [0, 1, 2])])
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 4) == expected


@pytest.mark.parametrize("spec", ["5", "x", "3-1", "1-"])
def test_parse_layers_rejects(spec):
    with pytest.raises(SettingError, match="layers") as caught:
        parse_layers(spec, 4)
    assert caught.value.setting == "layers" and "--" not in str(caught.value)  # the CLI names the flag


def test_the_fingerprint_benchmark_runs_and_reports_each_dtype():
    """Speed is measured by benchmarks/bench_fingerprint.py (it prints MB/s), not asserted here."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fingerprint.py"
    spec = importlib.util.spec_from_file_location("bench_fingerprint", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--size", "64", "--layers", "2", "--repeat", "1"])
    assert [(r["dtype"], r["what"]) for r in rows] == [("float32", "fingerprint"), ("float32", "fingerprints(rounded)"),
                                                       ("bfloat16", "fingerprint"),
                                                       ("bfloat16", "fingerprints(rounded)")]
    assert all(r["megabytes"] == round(2 * 64 * 64 * 4 / 1e6, 1) and r["seconds"] > 0 for r in rows)


def test_rounded_fingerprints_recognise_a_copy_in_another_precision():
    """One pass gives the exact fingerprint (as fingerprint() does) and those of the weights
    rounded to bfloat16 and float16: a rounded copy differs exactly, agrees rounded."""
    import copy

    from neumuter_cli.models import fingerprints

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    prints = fingerprints(model, rounded=True)
    assert set(prints) == {"exact", "bfloat16", "float16"} and prints["exact"] == fingerprint(model)
    assert fingerprints(model) == {"exact": prints["exact"]}
    for dtype, kind in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        rounded = copy.deepcopy(model).to(dtype).to(torch.float32)
        theirs = fingerprints(rounded, rounded=True)
        assert theirs["exact"] != prints["exact"] and theirs[kind] == prints[kind]
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[1].bias[0] += 0.5               # a change no rounding hides
    assert all(a != b for a, b in zip(fingerprints(other, rounded=True).values(), prints.values()))
