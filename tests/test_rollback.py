"""Rollback toward a base model (`--base`): the interpolation W(m) = W_base + m (W − W_base) of
each FFN neuron, its hooks and its fold, the ancestry check, and the commands that use them."""
import copy
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from helpers import CORPUS, PEOPLE, UNSEEN, byte_bpe_tokenizer, tiny_model, train_memorizer
from neumuter_cli.cli import cli
from neumuter_cli.models import find_ffn_layers
from neumuter_cli.rollback import NotAnAncestor, check_ancestor, fold, input_projections, neuron_changes, rolled_back


def fine_tuned(base, blocks=(1,), scale=0.005, seed=1):
    """A copy of ``base`` whose FFN weights in ``blocks`` moved a little (a fine-tune)."""
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    layers = find_ffn_layers(model)
    with torch.no_grad():
        for block in blocks:
            layer = layers[block]
            for module in [layer.module] + [p.module for p in input_projections(model, layer)]:
                for name in ("weight", "bias"):
                    tensor = getattr(module, name, None)
                    if tensor is not None:
                        tensor.add_(scale * torch.randn(tensor.shape, generator=generator))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neo", "gpt_neox", "phi3"])
def test_the_hooks_give_what_the_fold_writes_and_zero_is_the_base_bit_for_bit(arch):
    base = tiny_model(arch, seed=0)
    model = fine_tuned(base)
    changes = neuron_changes(model, base)
    assert [b for b, c in changes.items() if c.changed.any()] == [1]
    neurons = find_ffn_layers(model)[1].neurons
    scales = {1: torch.rand(neurons, generator=torch.Generator().manual_seed(3))}
    scales[1][:5] = 0.0
    scales[1][5:10] = 1.0
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(4))
    with rolled_back(model, {1: changes[1]}, scales):
        hooked = logits(model, ids)
    folded = copy.deepcopy(model)
    assert fold(folded, base, scales) == {1: neurons - 5}
    torch.testing.assert_close(logits(folded, ids), hooked, rtol=1e-4, atol=1e-5)
    down, base_down = find_ffn_layers(folded)[1], find_ffn_layers(base)[1]
    columns = (lambda w: w) if down.conv1d else (lambda w: w.t())
    assert torch.equal(columns(down.module.weight)[:5], columns(base_down.module.weight)[:5])
    assert torch.equal(columns(down.module.weight)[5:10], columns(find_ffn_layers(model)[1].module.weight)[5:10])
    every_zero = copy.deepcopy(model)
    fold(every_zero, base, {1: torch.zeros(neurons)})
    down_bias = find_ffn_layers(model)[1].path + ".bias"   # no neuron's: it stays the model's
    for key, tensor in every_zero.state_dict().items():
        expected = model if key == down_bias else base
        assert torch.equal(tensor, expected.state_dict()[key]), key


def test_a_model_trained_from_another_initialisation_is_not_an_ancestor():
    base = tiny_model("llama", seed=0)
    assert check_ancestor(fine_tuned(base), base) < 0.2      # accepted
    with pytest.raises(NotAnAncestor, match=r"weights are 1\.4\d apart .* do not correspond"):
        check_ancestor(tiny_model("llama", seed=1), base)
    with pytest.raises(NotAnAncestor, match="'gpt2' model and the model a 'llama'"):
        check_ancestor(tiny_model("llama"), tiny_model("gpt2"))


# ---------------------------------------------------------------- the commands on a real fine-tune

@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """A base model trained on general text, its fine-tune on PEOPLE in the FFN of block 1 only,
    and a model trained on the same data from another seed."""
    root = tmp_path_factory.mktemp("lineage")
    tokenizer = byte_bpe_tokenizer(400, corpus=CORPUS + PEOPLE + UNSEEN)
    general = [CORPUS[0], *CORPUS[3:]]                      # never the people of the fine-tune
    base, _ = train_memorizer(root / "base", texts=general, steps=60, tokenizer=tokenizer)
    other, _ = train_memorizer(root / "other", texts=general, steps=60, seed=7, tokenizer=tokenizer)
    model = copy.deepcopy(base).train()
    for name, param in model.named_parameters():
        param.requires_grad_(".h.1.mlp." in name)
    ids = [torch.tensor(tokenizer(t).input_ids) for t in PEOPLE]
    width = max(len(x) for x in ids)
    input_ids = torch.stack([torch.nn.functional.pad(x, (0, width - len(x)), value=0) for x in ids])
    mask = torch.stack([torch.nn.functional.pad(torch.ones_like(x), (0, width - len(x))) for x in ids])
    labels = input_ids.masked_fill(mask == 0, -100)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(150):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    model.save_pretrained(root / "tuned")
    tokenizer.save_pretrained(root / "tuned")
    forget = root / "forget.jsonl"
    forget.write_text("".join(json.dumps({"id": f"p{i}", "text": t, "neighbors": [UNSEEN[i % 2]]}) + "\n"
                              for i, t in enumerate(PEOPLE[:2])))
    return {k: str(root / k) for k in ("base", "other", "tuned")} | {"forget": str(forget), "root": root}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_localize_select_apply_with_base_roll_back_only_the_changed_neurons(lineage, tmp_path):
    L = lineage
    mask, scales, out = tmp_path / "mask.safetensors", tmp_path / "scales.safetensors", tmp_path / "muted"
    result = run("localize", L["forget"], "-m", L["tuned"], "--base", L["base"], "--epochs", 30, "--lr", 0.5,
                 "-o", mask)
    assert result.exit_code == 0, result.output
    assert "rolling neurons back toward" in result.output
    assert "in blocks 1 (weights" in result.output          # only block 1 changed, so only it is gated
    with safe_open(str(mask), "pt") as handle:
        meta = json.loads(handle.metadata()["neumuter"]) if "neumuter" in handle.metadata() else handle.metadata()
        assert sorted(handle.keys()) == ["log_alpha.1"]
    assert "base" in json.dumps(meta)
    assert run("select", mask, "-o", scales, "--top-fraction", 0.5).exit_code == 0
    result = run("apply", scales, "-m", L["tuned"], "--base", L["base"], "-o", out)
    assert result.exit_code == 0, result.output
    assert "rolled back toward" in result.output
    record = json.loads((out / "neumuter.json").read_text())
    assert record["mode"] == "rollback" and record["base"]["model"] == L["base"]


def test_apply_refuses_the_wrong_mode_and_another_base(lineage, tmp_path):
    L = lineage
    mask, scales = tmp_path / "mask.safetensors", tmp_path / "scales.safetensors"
    assert run("localize", L["forget"], "-m", L["tuned"], "--base", L["base"], "--epochs", 2, "-o", mask).exit_code == 0
    assert run("select", mask, "-o", scales, "--top-fraction", 0.5).exit_code == 0
    result = run("apply", scales, "-m", L["tuned"], "-o", tmp_path / "a")
    assert result.exit_code == 2
    assert "rolls neurons back toward the base model" in result.output and "--base" in result.output
    result = run("apply", scales, "-m", L["tuned"], "--base", L["tuned"], "-o", tmp_path / "b")
    assert result.exit_code == 3
    assert "rolls back toward the base model" in result.output and "apply with the base model given to localize" \
        in result.output
    plain_mask, plain_scales = tmp_path / "plain.safetensors", tmp_path / "plain-scales.safetensors"
    assert run("localize", L["forget"], "-m", L["tuned"], "--epochs", 2, "-o", plain_mask).exit_code == 0
    assert run("select", plain_mask, "-o", plain_scales, "--top-fraction", 0.5).exit_code == 0
    result = run("apply", plain_scales, "-m", L["tuned"], "--base", L["base"], "-o", tmp_path / "c")
    assert result.exit_code == 2
    assert "scales neurons (it was made without --base)" in result.output
    assert not any((tmp_path / d).exists() for d in "abc")


def test_localize_refuses_a_base_that_is_not_an_ancestor_or_is_the_model(lineage, tmp_path):
    L = lineage
    result = run("localize", L["forget"], "-m", L["tuned"], "--base", L["other"], "-o", tmp_path / "m")
    assert result.exit_code == 3
    assert "is not an ancestor of" in result.output and "weights are 1.4" in result.output
    result = run("localize", L["forget"], "-m", L["tuned"], "--base", L["tuned"], "-o", tmp_path / "m")
    assert result.exit_code == 3 and "is the model itself" in result.output
    result = run("localize", L["forget"], "-m", L["tuned"], "--base", L["base"], "--method", "attribution",
                 "-o", tmp_path / "m")
    assert result.exit_code == 2 and "--base rolls back with trained gates: use --method gates" in result.output
    assert not (tmp_path / "m").exists()


def test_inspect_base_shows_where_the_fine_tune_changed_the_model(lineage):
    L = lineage
    result = run("inspect", "-m", L["tuned"], "--base", L["base"], "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    changed = {row["block"]: row["changed"] for row in report["blocks"]}
    assert changed[0] == 0 and changed[1] == report["blocks"][1]["neurons"]
    assert report["changed_neurons"] == changed[1] and 0 < report["base"]["distance"] < 1.0
    table = run("inspect", "-m", L["tuned"], "--base", L["base"])
    assert "changed since" in table.stdout and "change (median)" in table.stdout


def test_the_rollback_benchmark_measures_the_control_and_the_base_model(lineage, tmp_path):
    """benchmarks/rollback.py: 'revert the top k by fine-tune change' reverts exactly k neurons,
    and the full rollback's row is the base model's numbers."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "rollback_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "rollback.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    fixtures = tmp_path / "fixtures"
    fixtures.mkdir()
    for name, texts in (("forget.jsonl", PEOPLE[:2]), ("retain.jsonl", PEOPLE[2:]), ("heldout.jsonl", CORPUS[3:6])):
        (fixtures / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    L = lineage
    out = tmp_path / "rollback.json"
    bench.main(["-", "--model", L["tuned"], "--base", L["base"], "--reference-model", L["other"],
                "--fixtures", str(fixtures), "--ks", "10,100", "--out", str(out)])
    data = json.loads(out.read_text())
    rows = {(r["kind"], r["k"]): r for r in data["rows"]}
    assert set(rows) == {("model", 0), ("base model", 256), ("top k by change", 10), ("top k by change", 100)}
    assert rows[("base model", 256)]["forget"] == data["base_ma"]       # a full rollback is the base model
    assert rows[("base model", 256)]["at_base"] == 2
    assert rows[("model", 0)]["forget_ma"] > rows[("base model", 256)]["forget_ma"]
    bench.main(["-", "--model", L["tuned"], "--base", L["base"], "--reference-model", L["other"],
                "--fixtures", str(fixtures), "--ks", "10", "--split", "1", "--no-control", "--out", str(out)])
    split = json.loads(out.read_text())["rows"]
    assert [r["kind"] for r in split] == ["model", "base model"]          # no control rows
    for r in split:                                                      # the first retained text, and the rest
        assert r["retained_first"] == r["retained"][0]
        assert r["retained_rest"] == pytest.approx(sum(r["retained"][1:]) / (len(r["retained"]) - 1))
    base = torch.zeros(4)
    changes = {0: type("C", (), {"changed": torch.tensor([True, True, False, True]),
                                 "size": torch.tensor([0.1, 0.3, 0.0, 0.2])})()}
    assert torch.equal(bench.top_changed(changes, 2)[0], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert torch.equal(bench.top_changed(changes, 9)[0], base + torch.tensor([0.0, 0.0, 1.0, 0.0]))


def test_completion_reverts_the_most_changed_open_neurons_as_few_as_pass():
    """When the epochs run out first, the open gates are closed in order of the fine-tune's
    change, as few as pass the check; trained gates stay as they are."""
    from types import SimpleNamespace

    from neumuter_cli.gates import deterministic_gate, initial_log_alpha
    from neumuter_cli.localize import complete_by_change

    trained = torch.full((8,), initial_log_alpha())
    trained[0] = -5.0                                                   # one gate training closed
    trained[6] = 0.0                                                    # one half closed: still a candidate
    sizes = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.2, 0.6, 0.3, 0.0])
    changes = {4: SimpleNamespace(changed=sizes > 0, size=sizes)}
    needed = {2, 3, 5}                                                  # the three most changed open neurons

    def check(gates):
        return all(float(gates[4][i]) == 0.0 for i in needed)

    done, counts = complete_by_change({4: trained}, changes, check)
    gates = deterministic_gate(done[4])
    assert counts == {"completed": 3, "open": 6}                         # neuron 7 never changed: not a candidate
    assert [i for i in range(8) if gates[i] == 0] == [0, 2, 3, 5]
    assert torch.equal(done[4][0], trained[0]) and torch.equal(done[4][6], trained[6])
    unchanged, counts = complete_by_change({4: trained}, changes, lambda gates: False)
    assert torch.equal(unchanged[4], trained) and counts["completed"] is None


def test_complete_without_base_is_refused(lineage, tmp_path):
    L = lineage
    result = run("localize", L["forget"], "-m", L["tuned"], "--reference-model", L["base"], "--no-complete",
                 "-o", tmp_path / "m")
    assert result.exit_code == 2 and "--complete/--no-complete needs --base" in result.output


def test_training_counts_as_stalled_after_patience_checks_without_progress():
    from types import SimpleNamespace

    from neumuter_cli.localize import _Stall

    stall, said = _Stall(3, []), []
    stall.progress = said.append
    check = SimpleNamespace(last=None)
    verdicts = []
    for excess in (5.0, 4.0, 3.98, 4.5, 3.0, 2.99, 2.98, 2.995):
        check.last = {"excess": excess}
        verdicts.append(stall.stuck(check, applies=True))
    assert verdicts == [False, False, False, False, False, False, False, True]
    assert said == ["  stalled: 3 checks without the forget texts' MA above their limits shrinking (best: 3.0000 "
                    "summed); completing"]
    assert not _Stall(1).stuck(SimpleNamespace(last={"excess": 2.0}), applies=False)


def test_the_neighbour_swap_deals_retained_texts_or_the_model_s_continuations(lineage, tmp_path):
    """benchmarks/rollback_neighbours.py: each forget record keeps its text and gets N other texts
    as neighbours, dealt in turn; continuations are the model's greedy text after each prompt."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "rollback_neighbours", Path(__file__).resolve().parents[1] / "benchmarks" / "rollback_neighbours.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    retain = tmp_path / "retain.jsonl"
    retain.write_text("".join(json.dumps({"text": t}) + "\n" for t in PEOPLE[2:]))
    out = tmp_path / "bound.jsonl"
    bench.main([lineage["forget"], "--kind", "retained", "--retain", str(retain), "--per-record", "2", "-o", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == PEOPLE[:2]
    assert [r["neighbors"] for r in rows] == [PEOPLE[2:4], PEOPLE[4:6]]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    bench.main([lineage["forget"], "--kind", "continuations", "--model", lineage["tuned"], "--prompts", str(prompts),
                "--prompt-tokens", "3", "--new-tokens", "5", "--per-record", "1", "-o", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["neighbors"]) == 1 and r["neighbors"][0] for r in rows)


def test_the_localization_benchmark_reverts_when_the_file_was_made_with_base(lineage, tmp_path):
    """benchmarks/localization.py on a `localize --base` file: every row moves neurons toward
    the base model instead of zeroing them, so an oracle over every changed neuron is the base
    model itself; a file made toward another base is refused."""
    import importlib.util
    import shutil
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(here))
    spec = importlib.util.spec_from_file_location("localization_bench", here / "localization.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    L = lineage
    injected = tmp_path / "injected"
    shutil.copytree(L["tuned"], injected)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    width = find_ffn_layers(AutoModelForCausalLM.from_pretrained(L["tuned"]))[1].neurons
    texts = [{"text": PEOPLE[0], "half": "forget", "neurons": [[1, n] for n in range(width)]},
             {"text": PEOPLE[2], "half": "retain", "neurons": []}]
    (injected / "injected.json").write_text(json.dumps({"texts": texts}))
    mask, scales = tmp_path / "mask.safetensors", tmp_path / "scales.safetensors"
    assert run("localize", L["forget"], "-m", str(injected), "--base", L["base"], "--epochs", 2, "-o", mask).exit_code == 0
    assert run("select", mask, "-o", scales, "--top-fraction", 0.5).exit_code == 0
    out = tmp_path / "loc.json"
    assert bench.main(["--injected", str(injected), "--base", L["base"], "--scales", str(scales), "--controls", "",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["control"]: r for r in result["rows"]}
    assert result["mode"] == "rollback" and "reverted to the base" in rows["oracle"]["method"]
    folded = AutoModelForCausalLM.from_pretrained(str(injected))      # what `apply --base` writes for the oracle
    fold(folded, AutoModelForCausalLM.from_pretrained(L["base"]), {1: torch.zeros(width)})
    tokenizer = AutoTokenizer.from_pretrained(str(injected))
    expected = bench.measure_model(folded.eval(), tokenizer, [tokenizer(PEOPLE[0]).input_ids],
                                   [tokenizer(PEOPLE[2]).input_ids], [])
    assert rows["oracle"]["forget_losses"] == pytest.approx(expected["forget_losses"], rel=1e-4)
    assert rows["oracle"]["forget_losses"] != pytest.approx(rows["injected"]["forget_losses"], rel=1e-2)
    assert rows["neumuter"]["modified"] == width // 2
    assert bench.main(["--injected", str(injected), "--base", L["other"], "--scales", str(scales), "--controls", "",
                       "--out", str(tmp_path / "x.json")]) == 3


def test_the_controls_benchmark_with_base_reverts_and_ranks_by_change(lineage, tmp_path):
    """benchmarks/controls.py --base: a `localize --base` scales file is measured as it folds,
    the change control reverts the most changed neurons at the smallest k that meets the target,
    and a rollback file without --base is refused."""
    import importlib.util
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    here = Path(__file__).resolve().parents[1] / "benchmarks"
    if "controls_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("controls_bench", here / "controls.py")
        sys.modules["controls_bench"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["controls_bench"])
    bench = sys.modules["controls_bench"]
    L = lineage
    mask, scales = tmp_path / "mask.safetensors", tmp_path / "scales.safetensors"
    assert run("localize", L["forget"], "-m", L["tuned"], "--base", L["base"], "--epochs", 2, "-o", mask).exit_code == 0
    assert run("select", mask, "-o", scales, "--top-fraction", 0.5).exit_code == 0
    def texts(name, items):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in items))
        return str(tmp_path / name)
    common = ["--model", L["tuned"], "--reference-model", L["base"], "--forget", texts("f.jsonl", PEOPLE[:2]),
              "--retain", texts("r.jsonl", PEOPLE[2:]), "--heldout", texts("h.jsonl", CORPUS[3:5]),
              "--scales", str(scales)]
    out = tmp_path / "controls.json"
    result = bench.main([*common, "--base", L["base"], "--controls", "neumuter,change", "--target", "0.5",
                         "--out", str(out)])
    rows = {r["control"]: r for r in result["rows"]}
    assert rows["reference"]["method"] == "reference model base (never saw the forget texts)"
    assert rows["neumuter"]["method"] == "neumuter, rolled back toward base"
    redrawn = bench.main(["--from-json", str(out), "--plot", str(tmp_path / "again.png")])
    assert [r["method"] for r in redrawn["rows"]] == [r["method"] for r in result["rows"]]
    assert (tmp_path / "again.png").stat().st_size > 0
    tuned, base = AutoModelForCausalLM.from_pretrained(L["tuned"]), AutoModelForCausalLM.from_pretrained(L["base"])
    from neumuter_cli.artifacts import read_artifact
    fold(tuned, base, {1: read_artifact(str(scales)).tensors["scale.1"]})
    tokenizer = AutoTokenizer.from_pretrained(L["tuned"])
    folded = bench.measure_model(tuned.eval(), tokenizer, [tokenizer(t).input_ids[:200] for t in PEOPLE[:2]], [], [])
    assert rows["neumuter"]["forget_losses"] == pytest.approx(folded["forget_losses"], rel=1e-4)
    change = rows["change"]
    assert change["reached"] and change["forget_ma_mean"] <= 0.5 + 1e-9
    assert {"k": change["modified"] - 1, "reached": False} in change["bisection"]     # the smallest k
    assert 0 < change["modified"] <= 256
    with pytest.raises(SystemExit):
        bench.main([*common, "--controls", "neumuter"])
