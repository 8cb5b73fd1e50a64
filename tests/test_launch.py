"""Launch paths: torchrun, simulated nodes, `prepare` and `report` from the command line."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, read_metrics, run_cli, tiny_overrides
from tests.equivalence import assert_values_match


def test_torchrun_and_simulated_nodes_train_the_same(tmp_path):
    """`torchrun -m dist_train train` (2 ranks) and `local --nproc 4 --nodes 2` (two launcher
    agents meeting through the c10d rendezvous) both run; same global batch, same losses."""
    sets = tiny_overrides(tmp_path, "torchrun", 3)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "-m", "dist_train", "train", "configs/tiny.toml", *sets],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 rank(s) on 1 node(s)" in proc.stdout
    nodes = run_cli("local", "--nproc", "4", "--nodes", "2", "configs/tiny.toml",
                    *tiny_overrides(tmp_path, "nodes", 3))
    assert "4 rank(s) on 2 node(s)" in nodes.stdout
    a = [r["loss"] for r in read_metrics(tmp_path / "torchrun")]
    b = [r["loss"] for r in read_metrics(tmp_path / "nodes")]
    assert len(a) == 3
    assert_values_match(a, b, 16 * 128, "torchrun vs simulated nodes loss")


def test_prepare_then_train_on_it_then_report(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(f'{{"text": "document number {i} says hello to the trainer. "}}\n' for i in range(400)))
    out = run_cli("prepare", str(docs), "--out", str(tmp_path / "shards"))
    assert "shards" in out.stdout
    run_cli("train", "configs/tiny.toml", *tiny_overrides(tmp_path, "own", 2, **{"data.source": str(tmp_path / "shards"),
                                                                              "data.seq_len": 32}))
    report = run_cli("report", str(tmp_path / "own"))
    assert (tmp_path / "own/report/loss.png").stat().st_size > 1000
    assert "report:" in report.stdout


def test_bad_data_and_report_inputs_are_clear_errors(tmp_path):
    proc = run_cli("train", "configs/tiny.toml", "--set", f"data.source={tmp_path}", check=False)
    assert proc.returncode == 2 and "without index.json" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("report", str(tmp_path / "nothing"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_cli("prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "missing.txt" in proc.stderr and "Traceback" not in proc.stderr
