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
    if any(r.get("mfu") is not None for r in records):  # n/a (null) off the peak-FLOPs table, e.g. CPUs
        plot("mfu", {"MFU": [r.get("mfu") if r.get("mfu") is not None else float("nan") for r in records]}, "MFU")
    comm = {k: [r.get("comm", {}).get(k, {}).get("bytes", 0) for r in records] for k in COMM_KINDS}
    comm = {k: v for k, v in comm.items() if any(v)}
    if comm:
        plot("comm_bytes", comm, "bytes per step (all ranks)")
    c4_timeline(run_dir, out, plt)
    return out


def _jsonl(path: Path) -> list[dict]:
    import json

    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def c4_timeline(run_dir: Path, out: Path, plt) -> Path | None:
    """Per-rank collective latency over time (from the C4 publisher's traces,
    `c4/trace-rankN.jsonl`), with findings and injected faults marked."""
    traces = {int(p.stem.split("rank")[-1]): _jsonl(p) for p in sorted((run_dir / "c4").glob("trace-rank*.jsonl"))}
    traces = {r: t for r, t in traces.items() if t}
    if not traces:
        return None
    findings = _jsonl(run_dir / "c4" / "findings.jsonl")
    injected = _jsonl(run_dir / "c4" / "injections.jsonl")
    t0 = min(t[0]["t"] for t in traces.values())
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * len(traces)), dpi=100)
    ranks = sorted(traces)
    for i, r in enumerate(ranks):
        xs = [e["t"] - t0 for e in traces[r]]
        # the slowest op this rank saw in each publication interval, or how long it has been waiting
        ys = [max([g["max_ms"] for g in e["g"].values()] + [e["wait"] * 1e3, 0.01]) for e in traces[r]]
        ax.plot(xs, ys, lw=0.8, label=f"rank {r}")
    ax.set_yscale("log")
    ax.set_xlabel("seconds")
    ax.set_ylabel("slowest collective / wait (ms)")
    for f in findings:
        x = f["time"] - t0
        ax.axvline(x, color="red", lw=1.2)
        ax.annotate(f"{f['kind']} {f['ranks']}", (x, 1), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=7, color="red")
    for e in injected:
        ax.axvline(e["time"] - t0, color="gray", ls="--", lw=1)
        ax.annotate(f"inject {e['spec']}", (e["time"] - t0, 0), xycoords=("data", "axes fraction"),
                    rotation=90, va="bottom", ha="right", fontsize=7, color="gray")
    ax.legend(fontsize=7, ncol=min(8, len(ranks)), loc="upper left")
    ax.set_title(f"{run_dir.name}: per-rank collective latency (C4), findings in red")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "c4_timeline.png"
    fig.savefig(path)
    plt.close(fig)
    return path
