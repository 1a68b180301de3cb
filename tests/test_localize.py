"""localize: gates train, weights stay frozen, the mask file is complete and reproducible."""
import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from helpers import PEOPLE, save_tiny, train_memorizer
from neumuter_cli import NeumuterError
from neumuter_cli.cli import cli
from neumuter_cli.localize import LocalizeConfig, forget_loss, localize, neighbour_kl, original_distribution
from neumuter_cli.models import find_ffn_layers, fingerprint, load_model
from neumuter_cli.artifacts import load_artifact
from neumuter_cli.records import sha256_texts

NEIGHBOURS = ["Zed Quinn lives at 90 Hill Street and his phone number is 555-0101.",
              "Amy Ross lives at 3 Lake Road and her phone number is 555-0199."]


def fingerprint_of(path):
    return fingerprint(load_model(str(path), device="cpu")[0])


def write_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def nb_file(tmp_path):
    return write_records(tmp_path / "nb.jsonl", [
        {"id": "a", "text": PEOPLE[0], "neighbors": NEIGHBOURS},
        {"id": "b", "text": PEOPLE[1], "neighbors": NEIGHBOURS[:1]},
    ])


def run(args, **kwargs):
    return CliRunner().invoke(cli, args, catch_exceptions=False, **kwargs)


def test_mask_file_complete_and_weights_untouched(tiny_neo_dir, nb_file, tmp_path):
    before = load_file(f"{tiny_neo_dir}/model.safetensors")
    out = tmp_path / "mask.safetensors"
    result = run(["localize", nb_file, "--model", tiny_neo_dir, "--epochs", "3", "--layers", "1",
                  "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "epoch   3" in result.stderr
    tensors, meta = load_artifact(str(out), kind="neumuter-mask")
    assert list(tensors) == ["log_alpha.1"]          # only the listed layers get gates
    assert tensors["log_alpha.1"].shape == (64,) and tensors["log_alpha.1"].dtype == torch.float32
    for key in ("model", "architecture", "fingerprint", "modules", "neurons", "layers", "hyperparameters",
                "forget_sha256", "losses", "tool_version", "format_version"):
        assert key in meta, key
    # by value: the model the gates were trained on, the texts they were trained to forget
    assert meta["model"] == tiny_neo_dir and meta["fingerprint"] == fingerprint_of(tiny_neo_dir)
    assert meta["forget_sha256"] == sha256_texts([PEOPLE[0], PEOPLE[1]])
    assert meta["layers"] == [1] and meta["architecture"] == "gpt_neo"
    assert meta["hyperparameters"]["epochs"] == 3 and meta["losses"]["epoch"] == 3
    assert len(meta["modules"]) == 2 and meta["neurons"] == [64, 64]
    after = load_file(f"{tiny_neo_dir}/model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_in_memory_weights_bit_identical_and_gates_move(tiny_neo_dir):
    model, tok = load_model(tiny_neo_dir, device="cpu")
    layers = find_ffn_layers(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    records = [{"text": PEOPLE[0], "neighbors": NEIGHBOURS}]
    result = localize(model, tok, records, layers, LocalizeConfig(epochs=4, batch_size=1, lr=0.5))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(not layer.module._forward_pre_hooks for layer in layers)
    assert any(not torch.allclose(la, torch.full_like(la, la[0].item())) for la in result.log_alpha.values())
    assert all(not p.requires_grad for p in model.parameters())


def test_same_seed_same_mask(tiny_neo_dir, nb_file, tmp_path):
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / f"{name}.safetensors"
        result = run(["localize", nb_file, "-m", tiny_neo_dir, "--epochs", "2", "--seed", str(seed),
                      "-o", str(out), "--device", "cpu"])
        assert result.exit_code == 0, result.output
        outs.append(load_artifact(str(out))[0])
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert any(not torch.equal(outs[0][k], outs[2][k]) for k in outs[0])


def test_stdout_when_piped(tiny_neo_dir, nb_file):
    result = CliRunner().invoke(cli, ["localize", nb_file, "-m", tiny_neo_dir, "--epochs", "1", "--device", "cpu"])
    assert result.exit_code == 0
    assert result.stdout_bytes[8:].lstrip().startswith(b"{")   # a safetensors header follows its length


@pytest.mark.parametrize("lines,message", [
    ([{"text": "no neighbours here"}], 'record has no "neighbors"'),
    ([{"text": "x", "neighbors": []}], '"neighbors" must be a non-empty list of non-empty strings'),
    ([], "no records (empty input)"),
])
def test_bad_records(tiny_neo_dir, tmp_path, lines, message):
    path = write_records(tmp_path / "in.jsonl", lines)
    out = tmp_path / "mask.safetensors"
    result = CliRunner().invoke(cli, ["localize", path, "-m", tiny_neo_dir, "-o", str(out)])
    assert result.exit_code == 3
    assert result.stderr.splitlines() == [f"Error: {path}:1: {message}" if lines else f"Error: {path}: {message}"]
    assert not out.exists() and not list(tmp_path.glob(".mask*"))


def test_model_that_cannot_be_gated(tmp_path, nb_file):
    """A mixture-of-experts FFN has no single down-projection per block: refused, type named."""
    from transformers import AutoModelForCausalLM, MixtralConfig
    from helpers import byte_bpe_tokenizer

    path = tmp_path / "moe"
    config = MixtralConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, num_local_experts=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    byte_bpe_tokenizer().save_pretrained(path)
    out = tmp_path / "m.st"
    result = CliRunner().invoke(cli, ["localize", nb_file, "-m", str(path), "-o", str(out)])
    assert result.exit_code == 3
    assert result.stderr.splitlines()[-1] == (
        "Error: model type 'mixtral' is not supported: its FFNs are mixtures of experts (config num_experts = 4); "
        "neumuter gates the neurons of one dense FFN per block")
    assert not out.exists()


def test_bad_layers(tiny_neo_dir, nb_file, tmp_path):
    result = CliRunner().invoke(cli, ["localize", nb_file, "-m", tiny_neo_dir, "--layers", "7",
                                      "-o", str(tmp_path / "m.st")])
    assert result.exit_code == 2      # a value that cannot work for this model: a usage error
    assert result.stderr.splitlines()[-1] == "Error: --layers '7': block 7 does not exist (the model has blocks 0-1)"
    assert not (tmp_path / "m.st").exists()


def test_topk_kl_equals_full_kl_when_k_covers_vocabulary():
    torch.manual_seed(0)
    base = torch.randn(2, 5, 30)
    mask = torch.ones(2, 5, dtype=torch.long)
    model = lambda input_ids, attention_mask: type("O", (), {"logits": base})()  # noqa: E731
    full = original_distribution(model, [(None, mask)], 0)[0]
    top = original_distribution(model, [(None, mask)], 30)[0]
    part = original_distribution(model, [(None, mask)], 5)[0]
    q = torch.randn(2, 5, 30)
    exact = neighbour_kl(q, mask, full)
    assert torch.allclose(neighbour_kl(q, mask, top), exact, atol=1e-5)
    assert 0 <= neighbour_kl(q, mask, part) <= exact + 1e-6          # coarse-grained KL is a lower bound
    assert neighbour_kl(base, mask, part).abs() < 1e-5


def test_hinge_stops_at_target():
    logits = torch.zeros(1, 4, 10)
    ids = torch.tensor([[1, 2, 3, 4]])
    logits[0, 0, 2] = logits[0, 1, 3] = 5.0                        # 2 of 3 tokens predicted
    mask = torch.ones_like(ids)
    pulling, _ = forget_loss(logits, ids, mask, LocalizeConfig(forget_term="hinge", target_ma=0.5))
    resting, _ = forget_loss(logits, ids, mask, LocalizeConfig(forget_term="hinge", target_ma=0.7))
    assert pulling > 0 and resting == 0


def test_a_non_finite_loss_stops_with_a_clear_error(tiny_neo_dir):
    model, tok = load_model(tiny_neo_dir, device="cpu")
    layers = find_ffn_layers(model)
    with torch.no_grad():
        layers[0].module.weight[0, 0] = float("nan")
    records = [{"text": PEOPLE[0], "neighbors": [PEOPLE[1]]}]
    with pytest.raises(NeumuterError, match="loss is not finite"):
        localize(model, tok, records, layers, LocalizeConfig(epochs=2, batch_size=1))


def test_early_stop_and_the_warning_when_the_texts_are_not_forgotten(tiny_neo_dir, nb_file, tmp_path):
    out = str(tmp_path / "mask.safetensors")
    # a threshold no text can miss: the first check (epoch 2) stops the training
    easy = run(["localize", nb_file, "-m", tiny_neo_dir, "--epochs", "10", "--check-every", "2",
                "--stop-ma", "1.0", "-o", out, "--device", "cpu"])
    assert easy.exit_code == 0, easy.output
    assert "stopped: every forget text below the thresholds after 2 epochs" in easy.stderr
    assert "warning" not in easy.stderr
    # a memorised text that 2 timid epochs cannot break: the user is told, the mask is still written
    memorizer = tmp_path / "memorizer"
    train_memorizer(memorizer, texts=PEOPLE[:2], steps=150)
    hard = run(["localize", nb_file, "-m", str(memorizer), "--epochs", "2", "--check-every", "1",
                "--stop-ma", "0.5", "--lr", "0.001", "-o", out, "--device", "cpu"])
    assert hard.exit_code == 0, hard.output
    assert "warning: 2 of 2 forget texts are still above the MA threshold" in hard.stderr
    assert load_artifact(out, kind="neumuter-mask")[0]


@pytest.fixture(scope="module")
def memorizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("memorizer")
    train_memorizer(path, texts=PEOPLE[:3], steps=150)
    return str(path)


def test_a_reference_that_remembers_as_well_stops_at_the_first_check(memorizer_dir, tmp_path):
    """A reference that memorised the same texts (another seed) leaves nothing to forget. The
    model itself, or a copy of it, is refused as its own reference (before any training)."""
    from transformers import AutoTokenizer

    nb = write_records(tmp_path / "nb.jsonl", [{"id": i, "text": t, "neighbors": NEIGHBOURS[:1]}
                                                for i, t in enumerate(PEOPLE[:3])])
    out = str(tmp_path / "mask.safetensors")
    copy = tmp_path / "copy"
    shutil.copytree(memorizer_dir, copy)
    for reference, detail in ((memorizer_dir, f"is the checkpoint {memorizer_dir}"),
                              (copy, f"has the weights of {memorizer_dir} (fingerprint {fingerprint_of(memorizer_dir)})")):
        refused = run(["localize", nb, "--model", memorizer_dir, "--reference-model", str(reference),
                       "--epochs", "20", "-o", out, "--device", "cpu"])
        assert refused.exit_code == 3, refused.output
        assert refused.stderr.splitlines()[-1] == (
            f"Error: the reference is the model itself: reference model {reference} {detail}; a verdict needs a "
            "reference that never saw the records (against itself, every record passes as forgotten)")
        assert "localize:" not in refused.stderr and not os.path.exists(out)
    twin = tmp_path / "twin"
    train_memorizer(twin, texts=PEOPLE[:3], steps=150, seed=1, tokenizer=AutoTokenizer.from_pretrained(memorizer_dir))
    result = run(["localize", nb, "--model", memorizer_dir, "--reference-model", str(twin),
                  "--epochs", "20", "--check-every", "1", "-o", out, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "reference model: forget MA" in result.stderr
    assert "0 of 3 forget texts above its reference-model MA + tolerance" in result.stderr
    _, meta = load_artifact(out, kind="neumuter-mask")
    assert meta["epochs_run"] == 1 and meta["stopped_early"] is True
    assert len(meta["stop"]["reference_ma"]) == 3 and meta["stop"]["tolerance"] == 0.05
    assert meta["stop"]["ma"] == [min(1.0, m + 0.05) for m in meta["stop"]["reference_ma"]]


def test_reference_model_with_another_tokenizer_is_refused(memorizer_dir, tiny_neo_dir, tmp_path):
    nb = write_records(tmp_path / "nb.jsonl", [{"text": PEOPLE[0], "neighbors": NEIGHBOURS[:1]}])
    result = CliRunner().invoke(cli, ["localize", nb, "--model", memorizer_dir, "--reference-model", tiny_neo_dir,
                                      "-o", str(tmp_path / "m.safetensors"), "--device", "cpu"])
    assert result.exit_code == 3
    assert result.stderr.splitlines()[-1] == (
        f"Error: reference model {tiny_neo_dir} does not share the tokenizer of {memorizer_dir}: a reference model "
        "must tokenize texts exactly as the model does")
    assert not (tmp_path / "m.safetensors").exists()


def test_reference_model_excludes_the_generic_thresholds(memorizer_dir, tmp_path):
    nb = write_records(tmp_path / "nb.jsonl", [{"text": PEOPLE[0], "neighbors": NEIGHBOURS[:1]}])
    result = CliRunner().invoke(cli, ["localize", nb, "--model", memorizer_dir, "--reference-model", memorizer_dir,
                                      "--stop-ma", "0.2", "-o", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 2
    assert "give --reference-model or --reference/--stop-ma/--stop-el, not both" in result.output


def test_per_text_targets_stop_each_text_at_its_own_level():
    """The hinge leaves a text alone once its MA is at its own target, and only that text."""
    logits = torch.tensor([[[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]]] * 2)   # greedy: 0, 0 (then unused)
    ids = torch.tensor([[0, 0, 0], [0, 0, 0]])                          # MA 2/2 = 1.0 for both rows
    mask = torch.ones_like(ids)
    config = LocalizeConfig(forget_term="hinge")
    both, _ = forget_loss(logits, ids, mask, config, torch.tensor([0.5, 0.5]))
    one, _ = forget_loss(logits, ids, mask, config, torch.tensor([0.5, 1.0]))
    none, _ = forget_loss(logits, ids, mask, config, torch.tensor([1.0, 1.0]))
    assert both > one > none == 0


def test_prune_keeps_the_smallest_set_of_most_closed_gates_that_passes():
    from neumuter_cli.gates import deterministic_gate, initial_log_alpha
    from neumuter_cli.localize import smallest_passing_set

    torch.manual_seed(0)
    trained = {0: torch.linspace(-6, 1, 12), 3: torch.full((8,), initial_log_alpha())}
    trained[3][[1, 5]] = torch.tensor([-5.5, -2.0])          # two moved gates in another block
    ranked = sorted(((float(v), b, i) for b, t in trained.items() for i, v in enumerate(t)
                     if deterministic_gate(v) < 1))

    def check(gates):   # "forgets" once the 5 most-closed gates of the trained mask are all closed
        closed = {(b, i) for b, g in gates.items() for i in (g < 1).nonzero().flatten().tolist()}
        check.last = {"closed": len(closed)}
        return {(b, i) for _, b, i in ranked[:5]} <= closed

    pruned, counts = smallest_passing_set(trained, check)
    assert counts == {"moved": len(ranked), "kept": 5}
    kept = {(b, i) for b, g in pruned.items() for i in (deterministic_gate(g) < 1).nonzero().flatten().tolist()}
    assert kept == {(b, i) for _, b, i in ranked[:5]}
    for b, i in kept:                                  # kept gates keep their trained value
        assert pruned[b][i] == trained[b][i]
    assert check.last == {"closed": 5}                 # the kept set's own check, not the last failed probe


def test_shared_adam_steps_keep_the_gradients_proportions():
    from neumuter_cli.localize import SharedAdam

    for optimiser_class, expected in ((torch.optim.Adam, 1.0), (SharedAdam, 100.0)):
        weights = torch.zeros(2, requires_grad=True)
        optimiser = optimiser_class([weights], lr=0.1)
        for _ in range(3):
            optimiser.zero_grad()
            (weights * torch.tensor([1.0, 0.01])).sum().backward()
            optimiser.step()
        ratio = float(weights[0].detach() / weights[1].detach())
        assert ratio == pytest.approx(expected, rel=1e-3)
