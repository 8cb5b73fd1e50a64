"""`dist-train report RUN_DIR`: the run's curves as PNG files and one self-contained page,
`report/index.html` (the PNGs inlined, a summary table, the C4 findings, the resolved
config), readable offline and mailable as one file."""
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

    nan = float("nan")
    losses = {"loss": [r["loss"] for r in records]}
    if any("eval_loss" in r for r in records):
        losses["eval loss"] = [r.get("eval_loss", nan) for r in records]
    plot("loss", losses, "loss")
    plot("lr", {"lr": [r["lr"] for r in records]}, "learning rate")
    plot("throughput", {"tokens/s": [r["tokens_per_s"] for r in records]}, "tokens/s")
    memory = {"peak": [r["peak_memory_bytes"] / 2**30 for r in records]}
    allocated = _live_allocations(records)
    if allocated is not None:  # CPU: the max RSS and the heap peak
        memory = {"peak (CPU: max RSS)": memory["peak"],
                  "live allocations": [a / 2**30 if a >= 0 else nan for a in allocated]}
    plot("memory", memory, "peak memory per rank (GiB)")
    if any(r.get("mfu") is not None for r in records):  # n/a (null) off the peak-FLOPs table, e.g. CPUs
        plot("mfu", {"MFU": [nan if r.get("mfu") is None else r["mfu"] for r in records]}, "MFU")
    if any(r.get("noise_scale") is not None for r in records):  # metrics.noise_scale; null where not available
        plot("noise_scale", {"B_simple": [nan if r.get("noise_scale") is None else r["noise_scale"] for r in records]},
             "gradient noise scale B_simple (samples)")
    comm = {k: [r.get("comm", {}).get(k, {}).get("bytes", 0) for r in records] for k in COMM_KINDS}
    comm = {k: v for k, v in comm.items() if any(v)}
    if comm:
        plot("comm_bytes", comm, "bytes per step (all ranks)")
    dims = sorted({d for r in records for d in r.get("comm_by_dim", {})})
    if dims:
        plot("comm_by_dim", {d: [r.get("comm_by_dim", {}).get(d, {}).get("wire_bytes", 0) for r in records]
                             for d in dims}, "wire bytes per step by mesh dim")
    c4_timeline(run_dir, out, plt)
    write_page(run_dir, out, records)
    return out


def _live_allocations(records: list[dict]) -> list[int] | None:
    """Each record's peak_allocated_bytes (-1: none) where they tell something the peak
    memory does not: on CPU (max RSS); None on CUDA (the same numbers) or without them."""
    allocated = [r.get("peak_allocated_bytes", -1) for r in records]
    if all(a < 0 for a in allocated) or allocated == [r["peak_memory_bytes"] for r in records]:
        return None
    return allocated


def _allocated_text(records: list[dict]) -> str:
    """The live-allocation peak beside the CPU's max RSS."""
    allocated = _live_allocations(records)
    return "" if allocated is None else f" (max RSS; live allocations {max(allocated) / 2**30:.2f} GiB)"


def write_page(run_dir: Path, out: Path, records: list[dict]) -> Path:
    """`report/index.html`: every PNG of `out` inlined (base64), the summary, the C4
    findings and the resolved config; nothing it links to can go missing."""
    import base64
    import html
    from statistics import median

    last = records[-1]
    mfu = [r["mfu"] for r in records if r.get("mfu") is not None]
    rows = [("steps", f"{records[0]['step']}..{last['step']}"), ("final loss", f"{last['loss']:.4f}")]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    if evals:
        rows.append(("final eval loss", f"{evals[-1]:.4f}"))
    rows += [("median tokens/s", f"{median(r['tokens_per_s'] for r in records):.0f}"),
             ("median MFU", f"{median(mfu):.1%}" if mfu else "n/a (device not in the peak-FLOPs table)"),
             ("peak memory per rank", f"{max(r['peak_memory_bytes'] for r in records) / 2**30:.2f} GiB"
              + _allocated_text(records)),
             ("tokens", f"{last['tokens']:,}")]
    if "noise_scale" in last:  # metrics.noise_scale on: the last figure (an EMA), or why there is none
        noise = [r["noise_scale"] for r in records if r.get("noise_scale") is not None]
        seq = _seq_len(run_dir)
        rows.append(("gradient noise scale B_simple (last)",
                     (f"{noise[-1]:.3g} samples" + (f" ({noise[-1] * seq:,.0f} tokens)" if seq else ""))
                     if noise
                     else "n/a (null: one micro-batch per step, tp or ep > 1, or no positive estimate yet)"))
    for dim, c in sorted(last.get("comm_by_dim", {}).items()):
        rows.append((f"{dim} wire bytes / step (last)", f"{c['wire_bytes']:,}"))
    findings = _jsonl(run_dir / "c4" / "findings.jsonl")
    images = "".join(f'<h2>{html.escape(p.stem.replace("_", " "))}</h2><img alt="{p.stem}" '
                     f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                     for p in sorted(out.glob("*.png"), key=_figure_order))
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    c4 = ("<ul>" + "".join(f"<li>step {f.get('step')}: {html.escape(str(f.get('kind')))} ranks "
                           f"{html.escape(str(f.get('ranks')))} ({html.escape(str(f.get('why') or ''))})</li>"
                           for f in findings) + "</ul><p>On the timeline above: red lines.</p>") if findings else "<p>none</p>"
    config = run_dir / "config.toml"
    cfg = html.escape(config.read_text()) if config.exists() else "(no config.toml)"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(run_dir.name)}</title>"
            "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}img{max-width:100%}"
            "th{text-align:left;padding-right:2em}pre{background:#f4f4f4;padding:1em}</style></head><body>"
            f"<h1>{html.escape(run_dir.name)}</h1><table>{table}</table>{images}"
            f"<h2>C4 findings</h2>{c4}<h2>config</h2><pre>{cfg}</pre></body></html>\n")
    path = out / "index.html"
    path.write_text(page)
    return path


def _seq_len(run_dir: Path) -> int | None:
    """data.seq_len of the run's resolved config (a sample's tokens), if it has one."""
    try:
        import tomllib
    except ImportError:  # pragma: no cover
        import tomli as tomllib
    try:
        return int(tomllib.loads((run_dir / "config.toml").read_text())["data"]["seq_len"])
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError):
        return None


def _figure_order(p: Path) -> int:
    order = ["loss", "lr", "throughput", "mfu", "noise_scale", "memory", "comm_bytes", "comm_by_dim", "c4_timeline"]
    return order.index(p.stem) if p.stem in order else len(order)


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
