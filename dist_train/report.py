"""`dist-train report RUN_DIR`: loss, throughput and communication curves as PNG files."""
from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .metrics import COMM_KINDS, read_metrics


def write_report(run_dir: Path) -> Path:
    """Draw the run's curves into `RUN_DIR/report/`; returns that folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the folder a run wrote (runs/<name>)")
    records = read_metrics(run_dir)
    if not records:
        raise UserError(f"{run_dir}/metrics.jsonl has no steps yet; train first, then report")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    steps = [r["step"] for r in records]

    def plot(name: str, series: dict, ylabel: str, log: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for label, ys in series.items():
            ax.plot(steps, ys, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        if len(series) > 1:
            ax.legend()
        ax.set_title(f"{run_dir.name}: {ylabel}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png")
        plt.close(fig)

    plot("loss", {"loss": [r["loss"] for r in records]}, "loss")
    plot("throughput", {"tokens/s": [r["tokens_per_s"] for r in records]}, "tokens/s")
    comm = {k: [r.get("comm", {}).get(k, {}).get("bytes", 0) for r in records] for k in COMM_KINDS}
    comm = {k: v for k, v in comm.items() if any(v)}
    if comm:
        plot("comm_bytes", comm, "bytes per step (all ranks)")
    return out
