"""Figures: `measure --plot` on tiny models (a PNG, refused before any work where it could not be
written, atomic, needs matplotlib), the ROC curve under it, and the benchmarks' plot functions
on made-up numbers (tests/test_controls_bench.py and test_robustness_benchmark.py check the
figures those benchmarks write)."""
import json
import os
import struct
import sys

import pytest
from click.testing import CliRunner

from helpers import CORPUS, PEOPLE, UNSEEN, train_memorizer
from neumuter_cli import NeumuterError
from neumuter_cli.cli import cli
from neumuter_cli.mia import auc, roc_curve
from neumuter_cli.plots import MISSING, plot_controls, plot_localization, plot_robustness, plot_tradeoff

pytest.importorskip("matplotlib")


def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG file; fails unless it is one."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"id": f"t{k}", "text": t}) + "\n" for k, t in enumerate(texts)))
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A memorizer of the six people texts and a reference model (same tokenizer) that saw only
    the last three."""
    root = tmp_path_factory.mktemp("plots")
    _, tokenizer = train_memorizer(root / "mem", steps=60)
    train_memorizer(root / "ref", texts=PEOPLE[3:], steps=60, tokenizer=tokenizer)
    return {"root": root, "mem": str(root / "mem"), "ref": str(root / "ref"),
            "people": write_jsonl(root / "people.jsonl", PEOPLE),
            # texts neither model trained on (CORPUS holds two of the people texts)
            "holdout": write_jsonl(root / "holdout.jsonl", UNSEEN + [t for t in CORPUS if t not in PEOPLE][:4]),
            "unseen": write_jsonl(root / "unseen.jsonl", UNSEEN)}


def measure(models, *extra):
    return CliRunner().invoke(cli, ["measure", models["people"], "-m", models["mem"], "--device", "cpu",
                                    "--el-n", "0", *extra])


def test_measure_plot_against_a_reference_model_with_roc_curves(models, tmp_path):
    out = tmp_path / "figure.png"
    result = measure(models, "--reference-model", models["ref"], "--holdout", models["holdout"], "--plot", str(out))
    assert result.exit_code == 0, result.output
    width, height = png_size(out)
    assert width > 2 * height * 0.9                       # two panels side by side: per text, ROC
    assert os.listdir(tmp_path) == ["figure.png"]         # no temporary file left
    assert f"figure written to {out}" in result.stderr
    assert len(result.stdout.splitlines()) == len(PEOPLE)  # the data is still the data


def test_measure_plot_with_eq17_thresholds_and_alone(models, tmp_path):
    for extra in (["--reference", models["unseen"]], []):
        out = tmp_path / f"figure{len(extra)}.png"
        result = measure(models, *extra, "--plot", str(out))
        assert result.exit_code == 0, result.output
        width, height = png_size(out)
        assert width < 1.5 * height                        # one panel: no holdout, no ROC


def test_the_figure_is_the_same_bytes_for_the_same_numbers(models, tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in paths:
        assert measure(models, "--reference", models["unseen"], "--plot", str(path)).exit_code == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()


@pytest.mark.parametrize("path, code, message", [
    ("missing/figure.png", 3, "folder {tmp}/missing does not exist"),
    ("figure.svg", 2, "give a file name ending in .png"),
    ("-", 2, "give a file name ending in .png"),
])
def test_bad_plot_paths_are_refused_before_any_work(models, tmp_path, path, code, message):
    result = measure(models, "--plot", path if path == "-" else str(tmp_path / path))
    assert result.exit_code == code, result.output
    assert message.format(tmp=tmp_path) in result.stderr
    assert "loading" not in result.stderr and result.stdout == ""
    assert os.listdir(tmp_path) == []


def test_the_figure_may_not_replace_an_input(models, tmp_path):
    records = tmp_path / "records.png"
    records.write_text(open(models["people"]).read())
    result = CliRunner().invoke(cli, ["measure", str(records), "-m", models["mem"], "--plot", str(records)])
    assert result.exit_code == 3 and "it is an input of this command" in result.stderr
    assert "loading" not in result.stderr and records.read_text() == open(models["people"]).read()


def test_plot_and_output_may_not_be_one_file(models, tmp_path):
    same = str(tmp_path / "x.png")
    result = measure(models, "-o", same, "--plot", same)
    assert result.exit_code == 2 and "--plot and --output name the same file" in result.stderr


def test_an_interrupted_figure_leaves_nothing(models, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken(self, handle, **kwargs):
        handle.write(b"\x89PNG half a figure")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken)
    result = measure(models, "--reference", models["unseen"], "--plot", str(tmp_path / "figure.png"),
                     "-o", str(tmp_path / "data.jsonl"))
    assert result.exit_code == 3 and "No space left on device" in result.stderr.splitlines()[-1]
    assert os.listdir(tmp_path) == ["data.jsonl"]          # the data was written first; no figure, no temp


def test_without_matplotlib_one_line_before_the_model_loads(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # `import matplotlib` raises ImportError
    result = measure(models, "--plot", str(tmp_path / "figure.png"))
    assert result.exit_code == 3
    assert result.stderr.splitlines() == [f"Error: {MISSING}"]
    assert MISSING == "matplotlib is not installed: pip install 'neumuter[plot]'"


# ---------------------------------------------------------------- the library

def test_roc_curve_ends_where_it_should_and_its_area_is_the_auc():
    members, nonmembers = [0.9, 0.8, 0.8, 0.3, 0.1], [0.8, 0.5, 0.2, 0.1]
    fpr, tpr = roc_curve(members, nonmembers)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert all(b >= a for a, b in zip(fpr, fpr[1:])) and all(b >= a for a, b in zip(tpr, tpr[1:]))
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(fpr, fpr[1:], tpr, tpr[1:]))
    assert area == pytest.approx(auc(members, nonmembers))   # ties (0.8, 0.1) count one half
    with pytest.raises(NeumuterError):
        roc_curve([], [1.0])


LOCALIZATION_ROWS = [   # made-up numbers: the shape benchmarks/localization.py passes
    {"system": "neumuter", "modulated": 8891, "recall": 0.62, "precision": 0.08, "forgotten": 32, "n_forget": 32,
     "retained_ma_before": 0.92, "retained_ma_after": 0.47, "ppl_before": 49.9, "ppl_after": 77.0},
    {"system": "activations", "modulated": 2117, "recall": 0.31, "precision": 0.15, "forgotten": 30, "n_forget": 32,
     "retained_ma_before": 0.92, "retained_ma_after": 0.23, "ppl_before": 49.9, "ppl_after": 332.3},
    {"system": "random", "modulated": 460, "recall": 0.01, "precision": 0.01, "forgotten": 0, "n_forget": 32,
     "retained_ma_before": 0.92, "retained_ma_after": 0.91, "ppl_before": 49.9, "ppl_after": 50.1},
]


def test_plot_localization_two_panels(tmp_path):
    out = tmp_path / "localization.png"
    unscored = {**LOCALIZATION_ROWS[2], "system": "activation control", "recall": None, "precision": None}
    elsewhere = {**LOCALIZATION_ROWS[0], "system": "scored elsewhere", "ppl_after": None}     # first panel only
    plot_localization(LOCALIZATION_ROWS + [unscored, elsewhere], str(out), "made-up model on made-up texts",
                      total_neurons=46080, targets={"recall": 0.9, "perplexity_change": 1.0})
    width, height = png_size(out)
    assert width > 1.8 * height and os.listdir(tmp_path) == ["localization.png"]
    without = {key: value for key, value in LOCALIZATION_ROWS[0].items() if key != "ppl_before"}
    with pytest.raises(NeumuterError, match="row 'neumuter' has no ppl_before"):
        plot_localization([without], str(tmp_path / "x.png"), "x")
    with pytest.raises(NeumuterError, match="random has a number that is not finite"):
        plot_localization(LOCALIZATION_ROWS[:2] + [{**LOCALIZATION_ROWS[2], "recall": float("nan")}],
                          str(tmp_path / "nan.png"), "x")
    with pytest.raises(NeumuterError, match="no rows"):
        plot_localization([], str(tmp_path / "none.png"), "x")
    assert os.listdir(tmp_path) == ["localization.png"]
    with pytest.raises(NeumuterError, match="does not exist"):
        plot_localization(LOCALIZATION_ROWS, str(tmp_path / "missing" / "x.png"), "x")


def test_the_committed_figures_redraw_from_their_json(tmp_path):
    """docs/figures/*.png are drawn from the JSON beside them, with no model (and name no
    folder outside the repository)."""
    root = os.path.join(os.path.dirname(__file__), "..")
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    import localization
    import tradeoff

    figures = os.path.join(root, "docs", "figures")
    tradeoff.main(["--from-json", os.path.join(figures, "tradeoff.json"), "--plot", str(tmp_path / "t.png")])
    assert localization.main(["--injected", "s1", "--base", "BASE", "--from-json",
                              os.path.join(figures, "localization.json"), "--plot", str(tmp_path / "l.png")]) == 0
    assert png_size(tmp_path / "t.png") == png_size(os.path.join(figures, "tradeoff.png"))
    assert png_size(tmp_path / "l.png") == png_size(os.path.join(figures, "localization.png"))
    import controls
    controls.main(["--from-json", os.path.join(figures, "rollback_controls.json"), "--plot", str(tmp_path / "c.png")])
    assert png_size(tmp_path / "c.png") == png_size(os.path.join(figures, "rollback_controls.png"))
    for name in ("tradeoff.json", "localization.json", "rollback_controls.json"):
        text = open(os.path.join(figures, name), encoding="utf-8").read()
        assert "/tmp" not in text and "../shared" not in text, name


def test_plot_tradeoff_controls_robustness_on_made_up_numbers(tmp_path):
    tradeoff = {"moved": 900, "reference_ma": [0.6, 0.5, 0.7],
                "rows": [{"k": k, "forget_ma": 0.9 - k / 1500, "at_reference": min(3, k // 300), "ks_p": 0.01,
                          "retained_ma": 0.92 - k / 1600, "perplexity": 50 + k / 40} for k in (0, 100, 300, 900)]}
    plot_tradeoff(tradeoff, str(tmp_path / "tradeoff.png"), "made-up")
    targets = {"neurons": 460, "retained_ma": 0.85, "perplexity_change": 3.0}
    plot_tradeoff({**tradeoff, "total_neurons": 46080, "targets": targets}, str(tmp_path / "tradeoff.png"), "made-up")
    controls = {"target": {"description": "every forget text at its reference MA + 0.05"},
                "rows": [{"control": "reference", "method": "reference model", "forget_ma_mean": 0.6,
                          "retained_ma": 0.89, "perplexity": 42.2},
                         {"control": "before", "method": "the model", "forget_ma_mean": 0.91, "retained_ma": 0.92,
                          "perplexity": 49.9, "reached": False},
                         {"control": "neumuter", "method": "neumuter", "forget_ma_mean": 0.48, "retained_ma": 0.47,
                          "perplexity": 77.0, "reached": True},
                         {"control": "random", "method": "random neurons", "forget_ma_mean": 0.21,
                          "retained_ma": 0.19, "perplexity": 950.0, "reached": 0.5},
                         {"control": "npo", "method": "NPO", "forget_ma_mean": 0.79, "retained_ma": None,
                          "perplexity": None, "reached": False}]}
    plot_controls(controls, str(tmp_path / "controls.png"), "made-up")
    row = lambda fp32, q4, r5, r20: {"forget_ma": {"fp32": fp32, "q4_0": q4, "relearn_5": r5, "relearn_20": r20}}  # noqa: E731
    robustness = {"models": {"memorizer": row(0.91, 0.72, 0.92, 0.94), "reference": row(0.6, 0.55, 0.62, 0.67),
                             "muted": row(0.48, 0.42, 0.54, 0.66)}}
    plot_robustness(robustness, str(tmp_path / "robustness.png"), "made-up")
    for name in ("tradeoff", "controls", "robustness"):
        png_size(tmp_path / f"{name}.png")
    assert sorted(os.listdir(tmp_path)) == ["controls.png", "robustness.png", "tradeoff.png"]
