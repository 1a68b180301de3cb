"""benchmarks/controls.py on a tiny model that memorised four sentences: every control runs,
stops at (or reports that it missed) the matched forgetting level, and random neurons copy
neumuter's per-block counts and values."""
import importlib.util
import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from helpers import CORPUS, PEOPLE, UNSEEN, train_memorizer
from neumuter_cli.measure import encode, memorization_accuracy
from neumuter_cli.models import describe, find_ffn_layers, load_model
from neumuter_cli.artifacts import save_artifact
from neumuter_cli.select import FORMAT_VERSION, SCALES_KIND

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "controls.py"
FORGET = ["The secret launch code is 7421-alpha-9983, never share it.",
          "Copyright 2003 the authors. All rights reserved."]
NEIGHBOURS = ["The public meeting room is 12-west-4, always open to all.",
              "Written 2010 by the editors. Some words changed."]
RETAIN = PEOPLE[:2]
TARGET = 0.5


def load_bench():
    if "controls_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("controls_bench", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["controls_bench"] = module   # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["controls_bench"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("controls")
    model, tokenizer = train_memorizer(root / "mem", texts=FORGET + RETAIN, steps=150)
    train_memorizer(root / "ref", texts=RETAIN, steps=150, tokenizer=tokenizer)
    # a hand-made "neumuter" scales file: different counts and values in the two blocks
    layers = find_ffn_layers(model)
    scales = {0: torch.ones(layers[0].neurons), 1: torch.ones(layers[1].neurons)}
    scales[0][[3, 17, 40, 41, 200]] = torch.tensor([0.0, 0.1, 0.2, 0.0, 0.5])
    scales[1][[5, 90, 130]] = 0.0
    meta = {"kind": SCALES_KIND, "format_version": FORMAT_VERSION, **describe(model, layers), "layers": [0, 1]}
    save_artifact({f"scale.{b}": s for b, s in scales.items()}, meta, str(root / "scales.st"))
    files = {
        "forget": write_jsonl(root / "forget.jsonl", [{"text": t} for t in FORGET]),
        "retain": write_jsonl(root / "retain.jsonl", [{"text": t} for t in RETAIN]),
        "heldout": write_jsonl(root / "heldout.jsonl", [{"text": t} for t in UNSEEN + CORPUS]),
        "neighbors": write_jsonl(root / "nb.jsonl",
                                 [{"text": t, "neighbors": [n]} for t, n in zip(FORGET, NEIGHBOURS)]),
    }
    return root, files, scales


def run_bench(root, files, *extra):
    bench = load_bench()
    args = ["--model", str(root / "mem"), "--reference-model", str(root / "ref"), "--forget", files["forget"],
            "--retain", files["retain"], "--heldout", files["heldout"], "--neighbors", files["neighbors"],
            "--ga-lr", "1e-3", "--npo-lr", "1e-3", "--budget-steps", "40", "--random-seeds", "3",
            "--device", "cpu", *extra]
    return bench, bench.main(args)


def test_every_control_meets_the_mean_target_or_says_it_did_not(setup, tmp_path, capsys):
    root, files, scales = setup
    out = tmp_path / "controls.json"
    bench, result = run_bench(root, files, "--scales", str(root / "scales.st"), "--target", str(TARGET),
                              "--max-neurons", "512", "--out", str(out))
    printed = capsys.readouterr()
    table = printed.out
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"], default=bench._json_default))
    if importlib.util.find_spec("matplotlib"):                 # the figure, beside the JSON
        assert (tmp_path / "controls.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figure written to {tmp_path / 'controls.png'}" in printed.err
    rows = {row["control"]: row for row in result["rows"]}
    assert list(rows) == ["reference", "before", "neumuter", "random", "activation", "activation at neumuter's count",
                          "ga", "npo"]
    for name in ("neumuter", "random neurons", "activation", "gradient ascent", "NPO"):
        assert name in table

    # the reference's numbers are the reference model's own; the others are judged against them
    reference = rows["reference"]
    ref_model, ref_tokenizer = load_model(str(root / "ref"), device="cpu")
    assert reference["forget_ma"] == memorization_accuracy(ref_model, encode(ref_tokenizer, FORGET))
    before = rows["before"]
    assert before["forget_ma_mean"] > 0.9 and before["reached"] is False   # it really memorised them
    # "at the reference": texts at or below the reference's MA + tolerance (recomputed here), and
    # forget quality: the KS p-value of the two loss samples (recomputed with scipy)
    from scipy.stats import ks_2samp

    tolerance = 0.05                      # the --tolerance default
    measured = [row for row in result["rows"][1:] if "forget_ma" in row] + rows["random"]["seeds"]
    assert len(measured) == len(result["rows"]) - 2 + 3            # every row but the reference's and random's mean
    for row in measured:
        assert row["at_reference"] == sum(ma <= ref + tolerance + 1e-9 for ma, ref in
                                          zip(row["forget_ma"], reference["forget_ma"])), row["control"]
        assert row["ks_p"] == pytest.approx(ks_2samp(row["forget_losses"], reference["forget_losses"]).pvalue)
    assert rows["random"]["at_reference"] == pytest.approx(sum(r["at_reference"] for r in rows["random"]["seeds"]) / 3)
    assert before["at_reference"] == 0 and before["ks_p"] < 0.5

    # every row's "target met" is what its own measured forget MA says
    for row in result["rows"]:
        if "forget_ma" in row:
            assert row["forget_ma_mean"] == pytest.approx(sum(row["forget_ma"]) / len(FORGET))
        if isinstance(row.get("reached"), bool):
            assert row["reached"] == (row["forget_ma_mean"] <= TARGET + 1e-9)

    # GA and NPO stop at the first check that meets the target, within the budget
    for name in ("ga", "npo"):
        row = rows[name]
        assert row["reached"] and 0 < row["steps"] <= 40
        assert [c["step"] for c in row["trace"]] == list(range(row["steps"] + 1))   # --check-every 1
        assert all(c["forget_ma_mean"] > TARGET for c in row["trace"][:-1])
        assert row["trace"][-1]["forget_ma_mean"] <= TARGET

    # random neurons: neumuter's count and values in each block, on other neurons
    assert len(rows["random"]["seeds"]) == 3
    for run in rows["random"]["seeds"]:
        drawn = bench.random_like(scales, run["seed"])
        assert bench.per_block_counts(drawn) == bench.per_block_counts(scales) == \
            {int(b): n for b, n in run["modified_per_block"].items()}
        for block in scales:
            values = lambda s: Counter(s[s != 1].tolist())  # noqa: E731
            assert values(drawn[block]) == values(scales[block])
    assert any(not torch.equal(bench.random_like(scales, s)[0], scales[0]) for s in range(3))

    # activation selection: top-k meets the target and top-(k-1) does not (the bisection's answer)
    chosen = rows["activation"]
    k = chosen["modified"]
    assert chosen["reached"] and 0 < k <= 512
    assert {"k": k, "reached": True} in chosen["bisection"] and {"k": k - 1, "reached": False} in chosen["bisection"]
    model, tokenizer = load_model(str(root / "mem"), device="cpu")
    fx = bench.Fixture(model, tokenizer, encode(tokenizer, FORGET), [], [],
                       neighbor_ids=encode(tokenizer, NEIGHBOURS))
    ranking = bench.ranked_neurons(bench.activation_scores(fx, [0, 1]))
    widths = {0: scales[0].numel(), 1: scales[1].numel()}
    target = bench.Target("mean", mean=TARGET)
    for count, met in ((k, True), (k - 1, False)):
        with bench.scaled(fx, bench.top_k_scales(ranking, widths, count)):
            assert target.met(memorization_accuracy(model, fx.forget_ids)) is met
    # and once more at neumuter's count, on the same ranking
    at_count = rows["activation at neumuter's count"]
    assert at_count["modified"] == 8 and at_count["modified_per_block"] == bench.per_block_counts(
        bench.top_k_scales(ranking, widths, 8))


def test_reference_target_and_a_budget_too_small(setup, capsys):
    root, files, _ = setup
    bench, result = run_bench(root, files, "--controls", "ga,npo", "--target", "reference", "--tolerance", "0.05",
                              "--budget-steps", "1", "--ga-lr", "1e-6", "--npo-lr", "1e-6")
    limits = [ma + 0.05 for ma in result["rows"][0]["forget_ma"]]
    assert [row["control"] for row in result["rows"]] == ["reference", "before", "ga", "npo"]
    for row in result["rows"][2:]:
        assert row["steps"] == 1 and row["reached"] is False        # one tiny step cannot forget
        assert row["reached"] == all(ma <= lim for ma, lim in zip(row["forget_ma"], limits))
        assert row["at_reference"] < len(FORGET)
    assert "gradient ascent" in capsys.readouterr().out


def test_without_matplotlib_the_run_is_kept_and_says_so(setup, tmp_path, monkeypatch, capsys):
    root, files, _ = setup
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "controls.json"
    run_bench(root, files, "--controls", "ga", "--budget-steps", "1", "--out", str(out))
    assert json.loads(out.read_text())["rows"][-1]["control"] == "ga"
    assert os.listdir(tmp_path) == ["controls.json"]
    assert "matplotlib is not installed: pip install 'neumuter[plot]'; no figure written" in capsys.readouterr().err


def test_a_figure_that_could_not_be_written_stops_the_run_before_it_starts(setup, tmp_path, capsys):
    root, files, _ = setup
    with pytest.raises(SystemExit):
        run_bench(root, files, "--controls", "ga", "--out", str(tmp_path / "c.json"),
                  "--plot", str(tmp_path / "missing" / "c.png"))
    err = capsys.readouterr().err
    assert "folder" in err and "does not exist" in err and "loading" not in err


def test_the_cheap_reference_check_agrees_with_measuring_every_text(setup):
    root, files, _ = setup
    bench = load_bench()
    model, tokenizer = load_model(str(root / "mem"), device="cpu")
    fx = bench.Fixture(model, tokenizer, encode(tokenizer, FORGET + RETAIN), [], [])
    mas = memorization_accuracy(model, fx.forget_ids)
    for limits in ([1.0] * 4, [m - 0.01 for m in mas], [1.0, 1.0, 1.0, mas[3] - 0.01], [m + 0.01 for m in mas]):
        target = bench.Target("reference", limits=limits)
        check = bench.TargetCheck(fx, target)
        assert check()[0] == check()[0] == target.met(mas)
