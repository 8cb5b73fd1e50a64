"""Flat and hierarchical (node-aware) all-to-all with uneven splits, as replayable plans.

An all-to-all over a group of P ranks sends chunk j of this rank's rows to group rank j
and receives, in group-rank order, the chunks the others sent here. Flat: one
`all_to_all_single`, so with N nodes of m ranks each rank sends P - m messages across
node boundaries, P(P - m) in all, each small.

Hierarchical, after HetuMoE (Nie et al., 2022, "HetuMoE: An Efficient Trillion-scale
Mixture-of-Expert Distributed Training System"): aggregate inside the node first, so fewer
and larger messages cross between nodes. HetuMoE reports >= 15% speedup over existing
MoE systems and up to 8.1x over DeepSpeed-MoE under the switch gate on commodity clusters.
The scheme here exchanges between *same-local-rank peers*:
  1. intra-node all-to-all: rank (n, l) hands local rank l' everything bound for local
     rank l' of any node, i.e. the rows of (n', l') for every node n' (aggregation);
  2. inter-node all-to-all among the N ranks with local index l': one message to each
     other node, carrying what all m ranks of this node send to that node's rank l'.
The data then already sits on its destination rank, in source-rank order, so the
"scatter inside the destination node" is done by step 1's regrouping before anything
leaves the node. Inter-node messages drop from P(P - m) to P(N - 1), a factor of m;
bytes crossing nodes are the same. Why per local rank, not one exchange per node pair
through a leader: every rank (and so every NIC on a rail-optimised node, one NIC per GPU)
carries an equal share of the inter-node traffic, each byte takes one intra-node hop
instead of two, and no leader serialises a node's traffic; a single leader per node pair
would cut messages by m^2 but funnel the whole node's bytes through one rank.

Split sizes: the counts are exchanged first along the same two steps (fixed-size rows of
counts), which also tells each rank the intermediate sizes of step 1. The result is a
`Plan` (reorders and exchanges) that replays the data exchange, and whose `reversed()`
is the exact inverse: the combine step of MoE and every backward pass use it without
exchanging sizes again.

Nodes come from LOCAL_WORLD_SIZE: a node is that many consecutive global ranks
(`dist-train local --nodes K` simulates K of them). The group must put the same number
of its ranks on each node, in node-major order (expert-parallel groups are contiguous
blocks of ranks, so ep must be a multiple or a divisor of the node size).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .dims import MeshError


@dataclass
class CommStats:
    """What this rank's exchanges sent: messages and bytes in all, and across nodes.
    A message is one non-empty chunk to one other rank."""

    messages: int = 0
    bytes: int = 0
    cross_node_messages: int = 0
    cross_node_bytes: int = 0

    def take(self) -> dict:
        out = dict(self.__dict__)
        self.messages = self.bytes = self.cross_node_messages = self.cross_node_bytes = 0
        return out


@dataclass
class Topology:
    """A group's ranks as nodes x ranks-per-node, with the sub-groups the hierarchical
    exchange uses. `group` is the whole group (flat exchange)."""

    group: object
    ranks: tuple[int, ...]          # global ranks, in group order
    local_world_size: int
    nodes: int = 1
    per_node: int = 1
    intra: object = None            # my node's members of the group (size per_node)
    inter: object = None            # members with my local index, one per node (size nodes)
    stats: CommStats = field(default_factory=CommStats)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def hierarchical(self) -> bool:
        return self.inter is not None

    def node_of(self, global_rank: int) -> int:
        return global_rank // self.local_world_size


def node_layout(ranks, local_world_size: int) -> tuple[int, int]:
    """(nodes, ranks per node) of a group, which must be node-major with equal shares."""
    nodes = [r // local_world_size for r in ranks]
    distinct = sorted(set(nodes))
    per_node = len(ranks) // len(distinct)
    expected = [distinct[i // per_node] for i in range(len(ranks))]
    if len(ranks) % len(distinct) or nodes != expected:
        raise MeshError(f"parallel.a2a = 'hierarchical': the group of ranks {list(ranks)} does not spread evenly "
                        f"over nodes of LOCAL_WORLD_SIZE = {local_world_size} ranks; make parallel.ep a multiple "
                        f"or a divisor of the ranks per node, or set parallel.a2a = 'flat'")
    return len(distinct), per_node


def build_topology(mesh, local_world_size: int, hierarchical: bool) -> Topology:
    """Topology of a 1-D DeviceMesh (e.g. the ep mesh). Hierarchical builds the intra- and
    inter-node sub-groups by unflattening the mesh into (nodes, per_node); every rank of
    the world must call this (group creation)."""
    ranks = tuple(int(r) for r in mesh.mesh.flatten().tolist())
    topo = Topology(mesh.get_group(), ranks, local_world_size)
    if not hierarchical:
        return topo
    topo.nodes, topo.per_node = node_layout(ranks, local_world_size)
    if topo.nodes > 1:
        name = mesh.mesh_dim_names[0]
        sub = mesh._unflatten(0, (topo.nodes, topo.per_node), (f"{name}_inter", f"{name}_intra"))
        topo.inter = sub[f"{name}_inter"].get_group()
        topo.intra = sub[f"{name}_intra"].get_group()
    return topo


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Reorder:
    """Permute row chunks: chunk sizes in the current order, and the new order of chunks."""

    sizes: tuple[int, ...]
    order: tuple[int, ...]

    def inverse(self) -> "Reorder":
        inv = [0] * len(self.order)
        for new, old in enumerate(self.order):
            inv[old] = new
        return Reorder(tuple(self.sizes[i] for i in self.order), tuple(inv))

    def run(self, x, topo):
        chunks = torch.split(x, list(self.sizes))
        return torch.cat([chunks[i] for i in self.order]) if chunks else x


@dataclass(frozen=True)
class Exchange:
    """One all_to_all_single on a group ('flat', 'intra' or 'inter' of the topology)."""

    group: str
    send: tuple[int, ...]
    recv: tuple[int, ...]

    def inverse(self) -> "Exchange":
        return Exchange(self.group, self.recv, self.send)

    def run(self, x, topo):
        return _all_to_all(x, self.send, self.recv, topo, self.group)


@dataclass(frozen=True)
class Plan:
    steps: tuple

    def reversed(self) -> "Plan":
        return Plan(tuple(s.inverse() for s in reversed(self.steps)))

    def run(self, x, topo):
        for step in self.steps:
            x = step.run(x, topo)
        return x


def _members(topo: Topology, which: str) -> tuple[object, list[int]]:
    """(process group, its members' global ranks in group order) for a plan step."""
    if which == "flat":
        return topo.group, list(topo.ranks)
    me = topo.ranks.index(dist.get_rank())
    n, l = divmod(me, topo.per_node)
    if which == "intra":
        return topo.intra, [topo.ranks[n * topo.per_node + j] for j in range(topo.per_node)]
    return topo.inter, [topo.ranks[j * topo.per_node + l] for j in range(topo.nodes)]


def _all_to_all(x, send, recv, topo: Topology, which: str):
    group, members = _members(topo, which)
    x = x.contiguous()
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    if len(members) == 1:
        return out.copy_(x)
    me = dist.get_rank()
    row_bytes = x.element_size() * (x.shape[1:].numel() if x.dim() > 1 else 1)
    st, my_node = topo.stats, topo.node_of(me)
    for peer, n in zip(members, send):
        if peer != me and n:
            st.messages += 1
            st.bytes += n * row_bytes
            if topo.node_of(peer) != my_node:
                st.cross_node_messages += 1
                st.cross_node_bytes += n * row_bytes
    dist.all_to_all_single(out, x, output_split_sizes=list(recv), input_split_sizes=list(send), group=group)
    return out


def exchange_counts(send: torch.Tensor, topo: Topology) -> tuple[torch.Tensor, Plan]:
    """Exchange per-destination counts (P, k) and plan the matching row exchange.

    `send[j]` are the k counts this rank sends to group rank j (the rows bound for j
    number send[j].sum()); returns recv (P, k), recv[j] the counts group rank j sent
    here, and the plan that moves the rows."""
    P, k = send.shape
    send = send.to(torch.int64).contiguous()
    if not topo.hierarchical:
        recv = Plan((Exchange("flat", (k,) * P, (k,) * P),)).run(send.view(-1), topo).view(P, k)
        return recv, Plan((Exchange("flat", tuple(send.sum(1).tolist()), tuple(recv.sum(1).tolist())),))
    N, m = topo.nodes, topo.per_node
    # step 1: to local rank l' the counts bound for (n', l') for every node n'
    by_local = send.view(N, m, k).transpose(0, 1).contiguous()          # [l', n', k]
    mid = Plan((Exchange("intra", (N * k,) * m, (N * k,) * m),)).run(by_local.view(-1), topo).view(m, N, k)
    # step 2: to node n' (its rank with my local index) the counts of every local source
    by_node = mid.transpose(0, 1).contiguous()                           # [n', l, k]
    recv = Plan((Exchange("inter", (m * k,) * N, (m * k,) * N),)).run(by_node.view(-1), topo).view(P, k)
    rows = send.sum(1).view(N, m)            # rows to (n', l')
    mid_rows = mid.sum(2)                    # [l, n']: rows from local source l bound for (n', me_l)
    recv_rows = recv.sum(1).view(N, m)       # rows from (n, l)
    plan = Plan((
        Reorder(tuple(rows.view(-1).tolist()), tuple(l2 + n2 * m for l2 in range(m) for n2 in range(N))),
        Exchange("intra", tuple(rows.sum(0).tolist()), tuple(mid_rows.sum(1).tolist())),
        Reorder(tuple(mid_rows.view(-1).tolist()), tuple(n2 + l * N for n2 in range(N) for l in range(m))),
        Exchange("inter", tuple(mid_rows.sum(0).tolist()), tuple(recv_rows.sum(1).tolist())),
    ))
    return recv, plan


class _Exchange(torch.autograd.Function):
    """Rows through a plan; the gradient goes back through the reversed plan."""

    @staticmethod
    def forward(ctx, x, plan: Plan, topo: Topology):
        ctx.plan, ctx.topo = plan, topo
        return plan.run(x, topo)

    @staticmethod
    def backward(ctx, grad):
        return ctx.plan.reversed().run(grad.contiguous(), ctx.topo), None, None


def run_plan(x: torch.Tensor, plan: Plan, topo: Topology) -> torch.Tensor:
    """Differentiable exchange of rows `x` along `plan`."""
    return _Exchange.apply(x, plan, topo)


def all_to_all(x: torch.Tensor, send_splits: list[int], topo: Topology) -> torch.Tensor:
    """Rows of `x`, send_splits[j] of them for group rank j, exchanged: the received rows
    in source-rank order. Flat or hierarchical as the topology was built; identical results."""
    counts = torch.tensor(send_splits, dtype=torch.int64, device=x.device).view(-1, 1)
    _, plan = exchange_counts(counts, topo)
    return run_plan(x, plan, topo)
