"""Tensor-parallel layouts: tokens/s and bytes communicated per step, measured vs analytic.

For one fixed model, each layout runs a few steps (one `dist-train local --runs` launch per
world size); the bytes each
collective kind moved per rank and step come from the observed process group (metrics.jsonl,
summed over ranks, divided by the world size here). The analytic count per rank and step
is derived from how the layout works (dist_train/comm_model.py: tensor + sequence parallel
activations, FSDP's gathers and reduce-scatters, HSDP's replicate all-reduce, the
gradient-norm all-reduces).

Run:  python bench/tensor_parallel.py [--steps 4] [--out results.json]
Goal: measured bytes within 5% of the analytic count for every layout and kind.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _launch import REPO, run_sweep, steady_median  # noqa: E402

sys.path.insert(0, str(REPO))
from dist_train.comm_model import KINDS, dense_step_bytes  # noqa: E402

MODEL = {"model.dim": 64, "model.n_layers": 4, "model.n_heads": 4, "model.n_kv_heads": 4}
DATA = {"data.seq_len": 128, "train.global_batch": 8, "train.micro_batch": 2}
LAYOUTS = {  # name: (ranks, tp, dp_shard, dp_replicate)
    "dp_shard=4": (4, 1, 4, 1),
    "tp=2": (2, 2, 1, 1),
    "tp=4": (4, 4, 1, 1),
    "tp=2 x dp_shard=2": (4, 2, 2, 1),
    "tp=2 x dp_replicate=2": (4, 2, 1, 2),
}


def model_shapes():
    from dist_train.config import load_config
    from dist_train.model import ModelArgs

    cfg = load_config(REPO / "configs/tiny.toml", [f"{k}={v}" for k, v in {**MODEL, **DATA}.items()])
    return ModelArgs.from_config(cfg.model, cfg.data.seq_len, tokenizer_vocab=258)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", help="also write the table as JSON here")
    args = p.parse_args()
    a = model_shapes()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        by_ranks: dict[int, dict] = {}
        for name, (ranks, tp, dps, dpr) in LAYOUTS.items():
            by_ranks.setdefault(ranks, {})[name] = {"parallel.tp": tp, "parallel.dp_shard": dps,
                                                    "parallel.dp_replicate": dpr}
        metrics = {}
        for ranks, runs in by_ranks.items():  # one launch per world size
            keyed = {n.replace(" ", "").replace("=", ""): sets for n, sets in runs.items()}
            got = run_sweep(Path(tmp), ranks, keyed, {**MODEL, **DATA, "train.steps": args.steps})
            metrics.update({n: got[n.replace(" ", "").replace("=", "")] for n in runs})
        for name, (ranks, tp, dps, dpr) in LAYOUTS.items():
            records = metrics[name]
            measured = {k: steady_median(records, lambda r, k=k: r["comm"][k]["bytes"]) / ranks for k in KINDS}
            expect = dense_step_bytes(a, tp, dps, dpr, DATA["data.seq_len"], DATA["train.global_batch"],
                                      DATA["train.micro_batch"])
            rows.append({"layout": name, "ranks": ranks, "tokens_per_s": steady_median(records, "tokens_per_s"),
                         "measured": measured, "analytic": expect})
    base = rows[0]["tokens_per_s"]
    print(f"model: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads / {a.n_kv_heads} kv, ffn {a.ffn_dim}, "
          f"vocab {a.vocab_size}; seq {DATA['data.seq_len']}, global batch {DATA['train.global_batch']}, "
          f"micro batch {DATA['train.micro_batch']}; CPU gloo, {args.steps} steps, medians after the first")
    print(f"\n| layout | ranks | tokens/s | vs {rows[0]['layout']} | " +
          " | ".join(f"{k} MB/rank/step (measured / analytic = ratio)" for k in KINDS) + " |")
    print("|---|---|---|---|" + "---|" * len(KINDS))
    worst = 0.0
    for r in rows:
        cells = []
        for k in KINDS:
            m, e = r["measured"][k], r["analytic"][k]
            ratio = m / e if e else (1.0 if m == 0 else float("inf"))
            worst = max(worst, abs(ratio - 1))
            cells.append(f"{m / 1e6:.3f} / {e / 1e6:.3f} = {ratio:.3f}")
        print(f"| {r['layout']} | {r['ranks']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f} | "
              + " | ".join(cells) + " |")
    print(f"\nlargest deviation of measured from analytic bytes: {worst * 100:.2f}% "
          f"(goal <= 5%: {'met' if worst <= 0.05 else 'NOT met'})")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
