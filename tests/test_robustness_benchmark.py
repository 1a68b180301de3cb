"""benchmarks/robustness.py runs end to end on tiny models in a few seconds (its quantisation
columns only where neumuter_cli.quantize exists), and stops with a clear message where a
quantisation is asked for that this checkout cannot do."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import CORPUS, PEOPLE, UNSEEN, train_memorizer
from neumuter_cli.measure import encode, memorization_accuracy
from neumuter_cli.models import find_ffn_layers, fold_scales, load_model

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "robustness.py"
HAS_QUANTIZE = importlib.util.find_spec("neumuter_cli.quantize") is not None


def load_benchmark():
    spec = importlib.util.spec_from_file_location("robustness_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"id": f"t{k}", "text": t}) + "\n" for k, t in enumerate(texts)))
    return str(path)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    """A memorizer of the people texts; a reference with the same tokenizer that never saw the
    forget texts (the memorizer's weights before training); a "muted" model with every FFN
    neuron of its last block scaled to zero."""
    root = tmp_path_factory.mktemp("robustness")
    _, tokenizer = train_memorizer(root / "mem", steps=60)
    torch.manual_seed(0)
    from helpers import tiny_config
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_config(tiny_config("gpt_neo", vocab_size=len(tokenizer), hidden=64,
                                                             ffn=256, layers=2))
    reference.save_pretrained(root / "ref")
    tokenizer.save_pretrained(root / "ref")
    muted, _ = load_model(str(root / "mem"), device="cpu")
    last = find_ffn_layers(muted)[-1]
    fold_scales([last], [torch.zeros(last.neurons)])
    muted.save_pretrained(root / "muted")
    tokenizer.save_pretrained(root / "muted")
    return {
        "root": root,
        "args": ["--memorizer", str(root / "mem"), "--reference", str(root / "ref"), "--muted", str(root / "muted"),
                 "--forget", write_jsonl(root / "forget.jsonl", PEOPLE[:4]),
                 "--retain", write_jsonl(root / "retain.jsonl", PEOPLE[4:]),
                 "--heldout", write_jsonl(root / "heldout.jsonl", [" ".join(CORPUS + UNSEEN)]),
                 "--device", "cpu", "--ppl-window", "32"],
    }


def test_the_benchmark_runs_on_tiny_models(fixture, capsys):
    quantize = "q8_0,q4_0" if HAS_QUANTIZE else ""
    out = fixture["root"] / "results.json"
    results = load_benchmark().main(fixture["args"] + [
        "--steps", "1,2", "--verdict-steps", "2", "--relearn-lr", "1e-2", "--quantize", quantize,
        "--second-muted", str(fixture["root"] / "muted"), "--second-forget", str(fixture["root"] / "retain.jsonl"),
        "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    rows = results["models"]
    assert list(rows) == ["memorizer", "reference", "muted"]
    conditions = ["fp32"] + (["q8_0", "q4_0"] if HAS_QUANTIZE else []) + ["relearn_1", "relearn_2"]
    for name, row in rows.items():
        assert list(row["conditions"]) == conditions, name
        assert all(len(c["ma"]) == 4 for c in row["conditions"].values())
        assert len(row["relearn_losses"]) == 2
        assert math.isfinite(row["perplexity"]["perplexity"]) and 0 <= row["retained_ma"] <= 1
    # the numbers are the models' own: the fp32 MA of each forget text as measure computes it
    tokenizer = load_model(str(fixture["root"] / "mem"), device="cpu")[1]
    forget_ids = encode(tokenizer, PEOPLE[:4], 200)
    for name, folder in (("memorizer", "mem"), ("reference", "ref"), ("muted", "muted")):
        model = load_model(str(fixture["root"] / folder), device="cpu")[0]
        assert rows[name]["conditions"]["fp32"]["ma"] == memorization_accuracy(model, forget_ids), name
    # the memorizer remembers, the reference never saw the texts
    assert rows["memorizer"]["forget_ma"]["fp32"] > rows["reference"]["forget_ma"]["fp32"] + 0.3
    # "at the reference" counts, per condition, the texts at or below the reference's MA on that
    # text + 0.05, recomputed here from the per-text numbers (not from the row itself)
    reference = rows["reference"]["conditions"]
    for name in ("memorizer", "muted"):
        for condition in conditions:
            expected = sum(ma <= ref + 0.05 for ma, ref in zip(rows[name]["conditions"][condition]["ma"],
                                                               reference[condition]["ma"]))
            assert rows[name]["at_ref"][condition] == expected, (name, condition)
    assert rows["memorizer"]["at_ref"]["fp32"] == 0        # every text memorised, far above the reference
    # relearning the first halves teaches the reference something
    assert rows["reference"]["forget_ma"]["relearn_2"] > rows["reference"]["forget_ma"]["fp32"]
    # the verdict compares each model after 2 relearning steps with the reference after the same 2
    for name in ("memorizer", "muted"):
        slow = rows[name]["forget_ma"]["relearn_2"] <= rows["reference"]["forget_ma"]["relearn_2"] + 0.05
        assert rows[name]["verdict"]["relearn_no_faster_than_reference"] is slow, name
    assert rows["memorizer"]["verdict"]["relearn_no_faster_than_reference"] is False
    second = results["second_request"]
    assert second["forget_ma"] == pytest.approx(rows["muted"]["forget_ma"]["fp32"])
    assert second["second_forget"]["memorizer_mean_ma"] == pytest.approx(rows["memorizer"]["retained_ma"])
    printed = capsys.readouterr()
    assert "forget MA fp32" in printed.out and "relearn 2" in printed.out and "second request" in printed.out
    assert "relearning steps" in printed.err
    if importlib.util.find_spec("matplotlib"):                 # the figure, beside the JSON
        assert (fixture["root"] / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figure written to {fixture['root'] / 'results.png'}" in printed.err


def test_quantisation_without_the_module_stops_clearly(fixture, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "neumuter_cli.quantize", None)     # import fails as if absent
    with pytest.raises(SystemExit) as stop:
        load_benchmark().main(fixture["args"] + ["--steps", "1,2", "--verdict-steps", "2", "--quantize", "q4_0"])
    assert "needs neumuter_cli.quantize" in str(stop.value) and "--quantize ''" in str(stop.value)
    assert "loading" not in capsys.readouterr().err                     # before any model is loaded


def test_verdict_settings_must_be_measured(fixture):
    with pytest.raises(SystemExit):
        load_benchmark().main(fixture["args"] + ["--steps", "1,2", "--verdict-steps", "20", "--quantize", ""])
