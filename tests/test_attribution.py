"""localize --method attribution: per-text rankings by -dCE/ds, cut where each text is forgotten."""
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from helpers import PEOPLE, UNSEEN, tiny_model, train_memorizer
from neumuter_cli.artifacts import load_artifact
from neumuter_cli.attribution import PrefixSearch, attribution, localize_by_attribution, rank_neurons, row_ma
from neumuter_cli.cli import cli
from neumuter_cli.models import find_ffn_layers, gated, load_model


@pytest.fixture(scope="module")
def memorizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("attr-mem")
    train_memorizer(path, steps=150)
    return str(path)


def slow_attribution(model, layers, ids):
    """One text, no padding: -d(mean CE)/d(scale) of every neuron, layers concatenated."""
    scales = [torch.ones(layer.neurons, requires_grad=True) for layer in layers]
    with gated(layers, lambda i: scales[i]):
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    F.cross_entropy(logits, torch.tensor(ids[1:])).backward()
    return -torch.cat([s.grad for s in scales])


def test_batched_attribution_equals_one_text_at_a_time():
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = find_ffn_layers(model)
    texts = [[5, 9, 11, 3, 7, 2], [4, 8, 1], [6, 6, 10, 12, 2]]      # unequal lengths: padding matters
    batched = attribution(model, layers, texts, pad_id=0, batch_size=2)
    assert batched.shape == (3, sum(layer.neurons for layer in layers))
    for row, ids in zip(batched, texts):
        torch.testing.assert_close(row, slow_attribution(model, layers, ids), rtol=1e-4, atol=1e-6)


def test_the_smoothed_score_adds_each_layers_mean_activation_on_the_others_below_the_line():
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = find_ffn_layers(model)
    texts, neighbours = [[5, 9, 11, 3], [4, 8, 1, 2], [6, 6, 10, 12]], [[[7, 3, 2]], [[9, 9, 4]], [[1, 5, 8, 8]]]
    _, active = attribution(model, layers, texts, 0, activations=True)
    _, nb_active = attribution(model, layers, [n for group in neighbours for n in group], 0, activations=True)
    scores = rank_neurons(model, layers, texts, neighbours, 0, 0.0, "specific-smoothed", 8)
    everything = torch.cat([active, nb_active])
    start = 0
    for layer in layers:
        for t in range(3):
            columns = slice(start, start + layer.neurons)
            others = (everything[:, columns].sum(0) - active[t, columns]) / (len(everything) - 1)
            expected = active[t, columns] / (others + others.mean() + 1e-6)
            torch.testing.assert_close(scores[t, columns], expected)
        start += layer.neurons


def test_each_prefix_is_the_shortest_that_reaches_its_limit(memorizer):
    model, tokenizer = load_model(memorizer, device="cpu")
    layers = find_ffn_layers(model)
    ids = [tokenizer(t).input_ids for t in PEOPLE[:3]]
    reference = [0.8, 0.7, 0.6]
    found = localize_by_attribution(model, tokenizer, ids, [], layers, reference, max_per_text=512)
    ranking = torch.sort(attribution(model, layers, ids, 0), dim=1, descending=True, stable=True).indices
    widths = [layer.neurons for layer in layers]

    def ma_with(t, k):
        flat = torch.ones(1, sum(widths))
        flat[0, ranking[t, :k]] = 0.0
        x = torch.tensor([ids[t]])
        return row_ma(model, layers, x, torch.ones_like(x), list(torch.split(flat, widths, dim=1)))[0]

    for t, k in enumerate(found.per_text):
        assert found.reached[t]
        assert ma_with(t, k) <= reference[t]
        assert k == 0 or ma_with(t, k - 1) > reference[t]
    union = torch.cat([found.log_alpha[layer.index] for layer in layers]) < 0
    expected = set()
    for t, k in enumerate(found.per_text):
        expected |= set(ranking[t, :k].tolist())
    assert set(torch.nonzero(union).flatten().tolist()) == expected


def test_shrinking_cuts_what_a_text_gets_from_the_others():
    # two texts that share neurons 2 and 5: each passes with 3 of its own set closed; alone
    # each needs a prefix of 3, and the union of those holds 5 neurons where 3 suffice
    needs = [{0, 1, 2, 5, 6}, {5, 2, 6, 0}]
    ranking = torch.tensor([[0, 1, 2, 3, 4, 7], [5, 2, 6, 7, 8, 9]])

    def check(closed_in_row):
        verdicts = []
        for t in range(2):
            closed = torch.zeros(10, dtype=torch.bool)
            closed[closed_in_row(t)] = True           # an index tensor or a boolean row
            verdicts.append(len(needs[t] & set(closed.nonzero().flatten().tolist())) >= 3)
        return verdicts

    search = PrefixSearch(ranking, 10, check)
    alone = search.smallest(search.alone, [0, 0], [6, 6])
    assert alone == [3, 3]
    union, whole = search.grow(list(alone))
    assert whole and set(union.nonzero().flatten().tolist()) == {0, 1, 2, 5, 6}
    smaller = search.shrink(alone)
    assert smaller == [0, 1]                   # text 0 is forgotten by text 1's neurons alone
    cut, whole = search.grow(smaller)          # together they are not: the prefixes grow back
    assert whole and smaller == [1, 2] and set(cut.nonzero().flatten().tolist()) == {0, 2, 5}
    assert all(check(lambda t: cut))


def test_shrink_rounds_never_leave_a_text_above_its_limit(memorizer):
    model, tokenizer = load_model(memorizer, device="cpu")
    layers = find_ffn_layers(model)
    ids = [tokenizer(t).input_ids for t in PEOPLE[:4]]
    limits = [0.7, 0.5, 0.6, 0.8]
    plain = localize_by_attribution(model, tokenizer, ids, [], layers, limits, max_per_text=512)
    cut = localize_by_attribution(model, tokenizer, ids, [], layers, limits, max_per_text=512, shrink_rounds=2)
    closed = torch.cat([cut.log_alpha[layer.index] for layer in layers]) < 0
    plain_closed = torch.cat([plain.log_alpha[layer.index] for layer in layers]) < 0
    assert 0 < int(closed.sum()) <= int(plain_closed.sum()) and cut.probes > plain.probes
    widths = [layer.neurons for layer in layers]
    scales = list(torch.split((~closed).float()[None], widths, dim=1))
    for t, text in enumerate(ids):
        x = torch.tensor([text])
        assert row_ma(model, layers, x, torch.ones_like(x), scales)[0] <= limits[t]


@pytest.mark.parametrize("score", ["gradient", "specific", "specific-smoothed"])
def test_the_command_writes_a_mask_that_select_turns_into_exactly_the_union(memorizer, tmp_path, score):
    nb = tmp_path / "nb.jsonl"
    nb.write_text("".join(json.dumps({"text": t, "neighbors": [UNSEEN[0]]}) + "\n" for t in PEOPLE[:2]))
    mask, scales = tmp_path / "mask.safetensors", tmp_path / "scales.safetensors"
    runner = CliRunner()
    result = runner.invoke(cli, ["localize", str(nb), "-m", memorizer, "--method", "attribution", "--stop-ma", "0.3",
                                 "--contrast", "1", "--score", score, "-o", str(mask), "--device", "cpu"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "0 of 2 forget texts above the MA threshold 0.3000" in result.stderr
    tensors, meta = load_artifact(str(mask), kind="neumuter-mask")
    closed = sum(int((t < 0).sum()) for t in tensors.values())
    assert meta["hyperparameters"]["method"] == "attribution" and meta["epochs_run"] == 0
    assert meta["hyperparameters"]["score"] == score
    assert closed > 0
    result = runner.invoke(cli, ["select", str(mask), "-o", str(scales)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    chosen, _ = load_artifact(str(scales), kind="neumuter-scales")
    assert sum(int((t == 0).sum()) for t in chosen.values()) == closed
    assert sum(int((t != 1).sum()) for t in chosen.values()) == closed


def test_attribution_without_a_stopping_point_is_refused(memorizer, tmp_path):
    nb = tmp_path / "nb.jsonl"
    nb.write_text(json.dumps({"text": PEOPLE[0], "neighbors": [UNSEEN[0]]}) + "\n")
    result = CliRunner().invoke(cli, ["localize", str(nb), "-m", memorizer, "--method", "attribution",
                                      "-o", str(tmp_path / "m.safetensors"), "--device", "cpu"])
    assert result.exit_code == 3
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: the attribution method needs a stopping point: a reference model, reference texts or an MA threshold")
    assert not (tmp_path / "m.safetensors").exists()


def test_an_unknown_score_is_refused(memorizer):
    model, tokenizer = load_model(memorizer, device="cpu")
    with pytest.raises(Exception, match="unknown score 'loudest'"):
        localize_by_attribution(model, tokenizer, [tokenizer(PEOPLE[0]).input_ids], [], find_ffn_layers(model),
                                [0.5], 10, score="loudest")
