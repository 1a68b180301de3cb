"""benchmarks/gpu.sh end to end on the CPU at tiny sizes (--device cpu --dry-run): every row
runs, the table has its columns, and the GPU columns say "not run"."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"
KEYS = ["localize-neo", "localize-smol", "localize-dp", "neighbors", "measure"]


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_dry_run_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--dry-run", "--work", str(tmp_path / "work"),
                           "--json", str(tmp_path / "rows.json")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [row["key"] for row in rows] == KEYS
    cells = {row["key"]: row["cpu"] for row in rows}
    assert "2 ep" in cells["localize-neo"] and "2 ep" in cells["localize-smol"]
    assert cells["localize-dp"] == "not run (0 GPUs)"
    assert cells["neighbors"].endswith(" s") and "MA" in cells["measure"]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].split("|")[2:4] == [" GPU bf16 ", " GPU fp32 "]
    assert len(table) == 1 + len(KEYS)
    for line in table[1:]:
        assert [cell.strip() for cell in line.split("|")[2:4]] == ["not run", "not run"], line
    assert "2.4 min" in proc.stdout
