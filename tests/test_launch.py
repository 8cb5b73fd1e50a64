"""`prepare`, `train` and `report` from the command line (torchrun and simulated nodes:
tests/test_multinode.py)."""
from __future__ import annotations

from tests.conftest import run_cli, tiny_overrides


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
    page = (tmp_path / "own/report/index.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(list((tmp_path / "own/report").glob("*.png"))) >= 4
    assert "http" not in page and "src=\"" + "report" not in page, "one self-contained page"
    assert "median MFU</th><td>n/a" in page and "seq_len = 32" in page  # MFU on a CPU; the resolved config
    assert "(max RSS; live allocations " in page  # CPU: the heap peak beside the resident set


def test_bad_data_and_report_inputs_are_clear_errors(tmp_path):
    proc = run_cli("train", "configs/tiny.toml", "--set", f"data.source={tmp_path}", check=False)
    assert proc.returncode == 2 and "without index.json" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("report", str(tmp_path / "nothing"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_cli("prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "missing.txt" in proc.stderr and "Traceback" not in proc.stderr
