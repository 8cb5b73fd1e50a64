"""The hierarchical all-to-all equals the flat one element for element (rows and their
gradients) at 8 ranks on 2 simulated nodes, for skewed splits (most rows to one rank) and
a rank that receives nothing; it sends 4x fewer messages across nodes; and an MoE layer
whose experts are split over those 8 ranks (flat and hierarchical dispatch) gives the
outputs and gradients of the same layer run whole in one process.

One spawn of 8 gloo processes (LOCAL_WORLD_SIZE = 4) runs every check.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD, PER_NODE, DIM = 8, 4, 6


def _splits(rank: int, case: str) -> list[int]:
    g = torch.Generator().manual_seed(100 + rank)
    if case == "dense":  # at least one row to every rank: every chunk is a message
        return [int(x) for x in torch.randint(1, 4, (WORLD,), generator=g)]
    if case == "skewed":  # most rows to rank 0, nothing ever to rank 5
        s = [int(x) for x in torch.randint(0, 3, (WORLD,), generator=g)]
        s[0] = 40 + rank
    else:  # random, with zeros
        s = [int(x) for x in torch.randint(0, 6, (WORLD,), generator=g)]
    s[5] = 0
    return s


def _rows(rank: int, splits: list[int]) -> torch.Tensor:
    """Row i for destination d: (source, destination, index, noise...) so content is checkable."""
    g = torch.Generator().manual_seed(rank)
    parts = [torch.cat([torch.tensor([[rank, d, i]] * 1, dtype=torch.float32),
                        torch.randn(1, DIM - 3, generator=g)], 1) for d, n in enumerate(splits) for i in range(n)]
    return torch.cat(parts) if parts else torch.zeros(0, DIM)


def _exchange(topo_flat, topo_h, rank: int, cases) -> torch.Tensor:
    """Each case through both topologies, compared; returns the cross-node (messages flat,
    messages hierarchical, bytes flat, bytes hierarchical) of all ranks."""
    from dist_train.parallel.hierarchical_all_to_all import all_to_all

    for case in cases:
        splits = _splits(rank, case)
        outs, grads = [], []
        for topo in (topo_flat, topo_h):
            x = _rows(rank, splits).requires_grad_()
            y = all_to_all(x, splits, topo)
            weight = torch.arange(y.numel(), dtype=torch.float32).view_as(y)  # position-dependent gradient
            (y * weight).sum().backward()
            outs.append(y.detach())
            grads.append(x.grad)
        assert torch.equal(outs[0], outs[1]), f"rank {rank} {case}: hierarchical rows differ from flat"
        assert torch.equal(grads[0], grads[1]), f"rank {rank} {case}: hierarchical gradients differ from flat"
        y = outs[0]
        expected = sum(_splits(src, case)[rank] for src in range(WORLD))
        assert y.shape[0] == expected, (rank, case, y.shape, expected)
        assert bool((y[:, 1] == rank).all()) and bool((y[:, 0][1:] >= y[:, 0][:-1]).all())  # mine, source order
        if rank == 5 and case != "dense":
            assert y.shape[0] == 0
    fs, hs = topo_flat.stats.take(), topo_h.stats.take()
    stats = torch.tensor([fs["cross_node_messages"], hs["cross_node_messages"], fs["cross_node_bytes"],
                          hs["cross_node_bytes"]], dtype=torch.float64)
    dist.all_reduce(stats)
    return stats


def _check_exchange(topo_flat, topo_h, rank: int) -> None:
    stats = _exchange(topo_flat, topo_h, rank, ("skewed", "random"))
    # the same bytes cross (a rank of the hierarchical scheme carries its node-mates' too)
    assert stats[2] == stats[3] > 0, stats.tolist()
    # per case 3 exchanges (counts, rows, their gradient): hierarchical at most P(N-1) = 8 messages across
    # nodes each; flat P(P-m) = 32 each, less the empty chunks (many here: sparse splits)
    assert stats[1] <= 2 * 3 * WORLD * (WORLD // PER_NODE - 1) and stats[1] * 3 < stats[0], stats.tolist()
    # every chunk non-empty: 3 exchanges of P(P - m) = 32 messages flat and P(N - 1) = 8
    # hierarchical across the 2 nodes, exactly m = 4 times fewer
    dense = _exchange(topo_flat, topo_h, rank, ("dense",))
    nodes = WORLD // PER_NODE
    assert dense[0] == 3 * WORLD * (WORLD - PER_NODE) and dense[1] == 3 * WORLD * (nodes - 1), dense.tolist()
    assert dense[0] == PER_NODE * dense[1] and dense[2] == dense[3] > 0, dense.tolist()


def _check_moe(topo_flat, topo_h, ep_mesh, rank: int) -> None:
    """An MoE layer with 8 experts, one per rank; routing skewed to expert 2, expert 6 unused."""
    from dist_train.moe import MoE
    from dist_train.parallelize import apply_ep

    torch.manual_seed(0)
    n_experts = 8

    def build():
        m = MoE(DIM, 10, n_experts, 2, aux_weight=0.01, z_weight=0.001)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
            m.router.weight[6] = 0.0
            m.router.weight[6, 0] = -50.0  # never chosen (feature 0 is 1)
            m.router.weight[2, 0] = 5.0  # with feature 0 = 1 below: (nearly) every token picks expert 2
        return m

    g = torch.Generator().manual_seed(10 + rank)
    tokens = torch.randn(3, 5, DIM, generator=g)
    tokens[..., 0] = 1.0
    reference = build()
    x = tokens.clone().requires_grad_()
    ref_out = reference(x)
    ref_out.square().sum().backward()
    for topo in (topo_flat, topo_h):
        m = build()
        apply_ep(m, ep_mesh, topo)
        xe = tokens.clone().requires_grad_()
        out = m(xe)
        out.square().sum().backward()
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xe.grad, x.grad, rtol=1e-5, atol=1e-5)
        # this rank's expert: its gradient sums every rank's tokens, so compare with the sum
        for name in ("w1", "w2", "w3"):
            full = getattr(reference.experts, name).grad.clone()
            dist.all_reduce(full)
            local = getattr(m.experts, name).grad.to_local()
            torch.testing.assert_close(local, full[rank:rank + 1], rtol=1e-5, atol=1e-6)
        load = m.stats.load.clone()
        dist.all_reduce(load)
        assert load[6] == 0 and load[2] == load.max(), load.tolist()


def _worker(rank: int, init_file: str) -> None:
    os.environ.update(LOCAL_WORLD_SIZE=str(PER_NODE), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)  # 8 ranks on few cores: spinning OpenMP threads would starve the others
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        from dist_train.parallel.hierarchical_all_to_all import build_topology

        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",))
        topo_flat = build_topology(mesh, PER_NODE, hierarchical=False)
        topo_h = build_topology(mesh, PER_NODE, hierarchical=True)
        assert (topo_h.nodes, topo_h.per_node) == (2, 4) and topo_h.hierarchical
        _check_exchange(topo_flat, topo_h, rank)
        _check_moe(topo_flat, topo_h, mesh, rank)
    finally:
        dist.destroy_process_group()


def test_hierarchical_equals_flat_on_two_nodes(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, start_method="spawn")
