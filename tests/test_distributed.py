"""Several processes (gloo, on the CPU) against one: `localize`, `measure`, `neighbors` and
`relearn` split their work over the processes of a launcher and give the single process's
result; a process that fails stops the others with one error line and leaves no output.

Each test starts 2 processes, either with torchrun itself or, to see each process's own exit
status and stderr, the way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT). One thread each (OMP_NUM_THREADS=1), as the single-process runs here."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import PEOPLE, UNSEEN, save_tiny, train_memorizer
from neumuter_cli.cli import cli
from test_neighbors import save_mlm

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
NEIGHBOURS = ["Zed Quinn lives at 90 Hill Street and his phone number is 555-0101.",
              "Amy Ross lives at 3 Lake Road and her phone number is 555-0199."]
TIMEOUT = 300
#: how far two ways of summing the same gate gradients may leave a log_alpha apart after a
#: few Adam steps at lr 0.5 (float32 rounding; measured about 3e-5)
LOG_ALPHA_TOLERANCE = 1e-4


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(args, world: int = 2, script=None, env=None, cwd=None):
    """Start ``world`` processes as torchrun does; returns [(exit status, stderr)] by rank."""
    base = {**environment(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(world), **(env or {})}
    command = [sys.executable, str(script)] if script else [sys.executable, "-m", "neumuter_cli"]
    processes = [subprocess.Popen([*command, *map(str, args)], env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
                 for r in range(world)]
    try:
        outcome = [(p.wait(TIMEOUT), p.stderr.read()) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    return outcome


def torchrun(args):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), "-m", "neumuter_cli", *map(str, args)],
                          env=environment(), capture_output=True, text=True, timeout=TIMEOUT)
    return proc


def run(args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A memorizer, a random model, another with the memorizer's tokenizer (a reference model),
    a tiny MLM and the records (6 texts: batches of 4 split 2 + 2, then 1 + 1)."""
    root = tmp_path_factory.mktemp("dist")
    _, tokenizer = train_memorizer(root / "mem", steps=150)
    save_mlm(root / "mlm")
    save_tiny(root / "random", "gpt_neo")
    save_tiny(root / "reference", "gpt_neo", tokenizer=tokenizer, vocab_size=len(tokenizer))
    forget = root / "forget.jsonl"
    forget.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(PEOPLE)))
    neighbours = root / "nb.jsonl"
    neighbours.write_text("".join(json.dumps({"id": f"p{i}", "text": t, "neighbors": NEIGHBOURS[: 1 + i % 2]}) + "\n"
                                  for i, t in enumerate(PEOPLE)))
    holdout = root / "holdout.jsonl"
    holdout.write_text("".join(json.dumps({"text": t}) + "\n" for t in UNSEEN))
    return root


def test_localize_under_torchrun_equals_one_process(files, tmp_path):
    """Training, the forgetting check and the pruning probes split over 2 processes: the same
    verdicts and counts, log_alpha within float rounding, the same neurons selected."""
    options = ["localize", files / "nb.jsonl", "-m", files / "random", "--device", "cpu", "--epochs", 3,
               "--batch-size", 4, "--stop-ma", 0.5, "--check-every", 3, "--target-ma", 0]
    single = run([*options, "-o", tmp_path / "one.safetensors"])
    assert single.exit_code == 0, single.output
    proc = torchrun([*options, "-o", tmp_path / "two.safetensors"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("epoch   3") == 1 and proc.stderr.count("prune: trying") == single.stderr.count(
        "prune: trying") > 0                   # rank 0 alone reports progress, the probes are the same
    one, two = (load_file(tmp_path / f"{n}.safetensors") for n in ("one", "two"))
    assert one.keys() == two.keys()
    for key in one:
        assert (one[key] - two[key]).abs().max() <= LOG_ALPHA_TOLERANCE, key
    meta = [safe_open(tmp_path / f"{n}.safetensors", "pt").metadata() for n in ("one", "two")]
    for key in ("pruned", "epochs_run", "stopped_early", "stop", "fingerprint", "forget_sha256", "hyperparameters"):
        assert meta[0][key] == meta[1][key], key
    assert json.loads(meta[0]["pruned"])["moved"] > 0
    for name in ("one", "two"):
        assert run(["select", tmp_path / f"{name}.safetensors", "-o", tmp_path / f"{name}.scales"]).exit_code == 0
    assert all(torch.equal(a, b) for a, b in zip(*(load_file(tmp_path / f"{n}.scales").values()
                                                   for n in ("one", "two"))))


def test_measure_under_two_processes_gives_the_same_bytes(files, tmp_path):
    options = ["measure", files / "forget.jsonl", "-m", files / "mem", "--device", "cpu", "--el-n", "5,10",
               "--holdout", files / "holdout.jsonl", "--reference-model", files / "reference", "--ppl",
               files / "holdout.jsonl", "--generations", 2, "--prefix-tokens", 5, "--new-tokens", 5,
               "--batch-size", 2, "--format", "json"]
    single = run([*options, "-o", tmp_path / "one.json"])
    assert single.exit_code == 0, single.output
    outcome = spawn([*options, "-o", tmp_path / "two.json"])
    assert [status for status, _ in outcome] == [0, 0], outcome
    assert (tmp_path / "two.json").read_bytes() == (tmp_path / "one.json").read_bytes()
    assert "measuring 6 records" in outcome[0][1] and "measuring" not in outcome[1][1]


def test_neighbors_under_two_processes_give_the_same_bytes(files, tmp_path):
    options = ["neighbors", files / "forget.jsonl", "--mlm", files / "mlm", "--device", "cpu", "-k", 2,
               "--batch-size", 3]
    single = run([*options, "-o", tmp_path / "one.jsonl"])
    assert single.exit_code == 0, single.output
    outcome = spawn([*options, "-o", tmp_path / "two.jsonl"])
    assert [status for status, _ in outcome] == [0, 0], outcome
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert "tokens rewritten in" in outcome[0][1] and outcome[1][1].strip() == ""
    # the counts cover both processes' calls
    assert single.stderr.splitlines()[-1] .split(" in ")[0] == outcome[0][1].strip().splitlines()[-1].split(" in ")[0]


def test_relearn_under_two_processes_sums_the_weight_gradients(files, tmp_path):
    options = ["relearn", files / "forget.jsonl", "-m", files / "mem", "--device", "cpu", "--steps", 3,
               "--batch-size", 3, "--lr", "1e-3"]
    single = run([*options, "-o", tmp_path / "one"])
    assert single.exit_code == 0, single.output
    outcome = spawn([*options, "-o", tmp_path / "two"])
    assert [status for status, _ in outcome] == [0, 0], outcome
    one, two = (load_file(tmp_path / n / "model.safetensors") for n in ("one", "two"))
    before = load_file(files / "mem" / "model.safetensors")
    assert any(not torch.equal(one[k], before[k]) for k in one)
    for key in one:   # Adam divides by the gradient's own size: float rounding only, at lr 1e-3
        assert torch.allclose(one[key], two[key], rtol=0, atol=1e-5), key
    records = [json.loads((tmp_path / n / "neumuter.json").read_text()) for n in ("one", "two")]
    assert records[0]["losses"] == pytest.approx(records[1]["losses"], rel=1e-5)
    assert records[0]["input_sha256"] == records[1]["input_sha256"]


def test_a_failing_process_stops_the_others_with_one_line(files, tmp_path):
    out = tmp_path / "mask.safetensors"
    outcome = spawn(["localize", files / "nb.jsonl", "-m", files / "random", "--device", "cpu", "--epochs", 3,
                     "--batch-size", 4, "-o", out], script=WORKER,
                    env={"NEUMUTER_TEST_FAIL_RANK": "1", "NEUMUTER_TEST_FAIL_CALL": "3"})
    (status0, err0), (status1, err1) = outcome
    assert (status0, status1) == (3, 3), outcome
    assert error_lines(err1) == ["Error: rank 1: injected failure"] and error_lines(err0) == []
    assert "Traceback" not in err0 + err1
    assert "epoch   1" in err0                 # the failure came in the middle of training
    assert list(tmp_path.iterdir()) == []      # no output, no temporary file


def test_an_error_every_process_finds_is_shown_once(files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no neighbours here"}) + "\n")
    outcome = spawn(["localize", bad, "-m", files / "random", "--device", "cpu", "-o", tmp_path / "m.safetensors"])
    assert [status for status, _ in outcome] == [3, 3], outcome
    assert len(error_lines(outcome[0][1])) == 1 and "rank" not in error_lines(outcome[0][1])[0]
    assert error_lines(outcome[1][1]) == []
    outcome = spawn(["measure", files / "forget.jsonl", "-m", files / "mem", "--el-n", "x"])
    assert [status for status, _ in outcome] == [2, 2], outcome
    assert len(error_lines(outcome[0][1])) == 1 and outcome[1][1] == ""
    outcome = spawn(["measure", files / "forget.jsonl", "-m", files / "mem", "--device-map", "auto"])
    assert [status for status, _ in outcome] == [2, 2], outcome
    assert error_lines(outcome[0][1]) == ["Error: --device-map auto spreads one copy of the model over every GPU, "
                                          "but each of the 2 processes of the launcher holds its own: run one "
                                          "process, or give each its own GPU (--device cuda)"]
    assert error_lines(outcome[1][1]) == []
    assert not (tmp_path / "m.safetensors").exists()


def test_a_command_that_does_not_split_runs_on_rank_0_alone(files, tmp_path):
    mask = tmp_path / "mask.safetensors"
    assert run(["localize", files / "nb.jsonl", "-m", files / "random", "--device", "cpu", "--epochs", 1,
                "-o", mask]).exit_code == 0
    outcome = spawn(["select", mask, "-o", tmp_path / "scales.safetensors"])
    assert [status for status, _ in outcome] == [0, 0], outcome
    assert "selected" in outcome[0][1] and outcome[1][1] == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.safetensors", "scales.safetensors"]
