"""benchmarks/oracle_bound.py computes eq. 17's MA threshold from its inputs (it was hard-coded
as the fixture's 0.1075) and prints the forget MA's max beside its mean (the README cites both)."""
import importlib.util
import json
import re
from pathlib import Path

from helpers import PEOPLE, UNSEEN, train_memorizer
from neumuter_cli.measure import encode, memorization_accuracy
from neumuter_cli.models import load_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "oracle_bound.py"


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_the_threshold_comes_from_the_unseen_texts(tmp_path, capsys):
    fixtures = tmp_path / "fixtures"
    fixtures.mkdir()
    train_memorizer(fixtures / "memorizer", steps=30)
    write_jsonl(fixtures / "forget.jsonl", PEOPLE[:2])
    write_jsonl(fixtures / "retain.jsonl", [f"{t} Entry {k}." for k in range(34) for t in PEOPLE[2:4]])   # 68 texts
    write_jsonl(fixtures / "unseen.jsonl", UNSEEN)
    spec = importlib.util.spec_from_file_location("oracle_bound", SCRIPT)
    oracle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oracle)
    oracle.main(["--fixtures", str(fixtures), "--steps", "2", "--retained", "4", "--reference-limit", "1"])
    out = capsys.readouterr().out
    model, tokenizer = load_model(str(fixtures / "memorizer"), device="cpu")
    expected = memorization_accuracy(model, encode(tokenizer, UNSEEN[:1], 200))[0]   # --reference-limit 1
    assert f"eq. 17 MA threshold: {expected:.4f} (mean MA over 1 texts of {fixtures / 'unseen.jsonl'})" in out
    rows = re.findall(r"\|\s+([\d.]+) \(([\d.]+)\) \|\s+(\d+)/2", out)
    # all 512 neurons, the largest 200, the largest 1 % (600 is more than this model has)
    assert len(rows) == 3 and all(float(mean) <= float(top) for mean, top, _ in rows)
