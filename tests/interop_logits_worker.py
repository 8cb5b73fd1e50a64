"""One rank of the HF-import layout check (tests/test_interop_hf.py), run under
`torch.distributed.run`: for each run (a list of `section.key=value` overrides, one JSON
list per run) it builds the trainer exactly as training does (mesh, parallelised model,
`model.init_from` loaded into this rank's shards), runs the model's own forward on fixed
tokens (through the pipeline schedule when there are stages) and captures the logits
where the fused head + loss would start: the head's hidden states (gathered over tp) times
the head weight (gathered). Rank 0 saves them to OUT/<run.name>.pt.

usage: python -m torch.distributed.run --nproc-per-node N tests/interop_logits_worker.py OUT RUNS.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def fixed_tokens(rows: int, seq_len: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(7))


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def capture_logits(trainer, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits of `tokens` from the trainer's model; None on ranks without the last stage."""
    from dist_train.trainer import _reshard

    tp = trainer.dims.tp
    tp_group = trainer.mesh["tp"].get_group() if tp > 1 else None
    out: list[torch.Tensor] = []

    def head(hidden, weight, targets):
        h = hidden
        if tp_group is not None:  # sequence-parallel: this rank holds a slice of the sequence
            parts = [torch.empty_like(h) for _ in range(tp)]
            dist.all_gather(parts, h.contiguous(), group=tp_group)
            h = torch.cat(parts, dim=1)
        out.append(h @ _full(weight).t())
        return (hidden * 0).sum()

    par = trainer.par
    last = par.parts[-1]
    owner = last.output if last.output is not None else last
    owner.loss_fn = head
    targets = torch.zeros_like(tokens)
    with torch.no_grad():
        if par.schedule is not None:
            args = (tokens,) if par.first else ()
            kwargs = dict(target=targets, losses=[]) if par.last else {}
            par.schedule.eval(*args, **kwargs)
        else:
            trainer.model(tokens, targets)
    _reshard(par.parts)
    return torch.cat(out) if out else None


def main(out_dir: str, runs_file: str) -> None:
    from dist_train.config import load_config
    from dist_train.trainer import Trainer

    out = Path(out_dir)
    trainers = []
    try:
        for overrides in json.loads(Path(runs_file).read_text()):
            cfg = load_config(None, overrides)
            trainer = Trainer(cfg)
            trainers.append(trainer)
            tokens = fixed_tokens(trainer.sampler.local_batch, cfg.data.seq_len, trainer.args.vocab_size)
            logits = capture_logits(trainer, tokens)
            # one rank holding the last stage saves; every other copy must be the same
            if logits is not None and trainer.mesh["tp"].get_local_rank() == 0 and trainer.batch_mesh.get_local_rank() == 0:
                torch.save({"tokens": tokens, "logits": logits}, out / f"{cfg.run.name}.pt")
            dist.barrier()
    finally:
        if trainers:
            trainers[0].close()


if __name__ == "__main__":
    main(*sys.argv[1:])
