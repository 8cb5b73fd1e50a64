"""Cluster topology (`[topology]`, `dist-train ... --topology t.toml`) and rank placement
(`parallel.placement`).

Topology. Nodes are the launcher's (node = rank // LOCAL_WORLD_SIZE, what torchrun and
`dist-train local --nodes K` give every rank); clusters group nodes, either `clusters = C`
contiguous groups (C must divide the node count) or `cluster_map = { name = [node, ...] }`
(every node exactly once, equal sizes). Every pair of ranks is joined by one of three link
classes, slowest last: `intra_node`, `intra_cluster`, `inter_cluster`; `links` gives each a
bandwidth (Gbit/s) and a latency (ms). A collective over a group crosses the slowest class
among its members (`group_link`).

Placement. The mesh is diloco x pp x dp_replicate x dp_shard x tp. `ordered` numbers mesh
coordinates row-major by global rank (tp neighbours are consecutive ranks): today's map.
`auto` orders the ranks physically (cluster, node, local rank) and lays the mesh over that
order with some order of the dims, the dim varying fastest inside a node: it tries every
order of the dims (of size > 1), scores each by the link class every dim's groups cross
(weights tp 16 > dp_shard 8 > dp_replicate 4 > pp 2 > diloco 1: tp and ep move activations
every layer, dp_shard parameters and gradients every micro-batch or step, dp_replicate one
all-reduce per step, pp one activation per micro-batch and stage boundary, DiLoCo every H
steps), and keeps the cheapest. So tp (and ep, which borrows dp_shard x tp) stay inside a
node, dp_shard inside a cluster where it fits, and pp crosses the slowest links with its
stages contiguous (one boundary per cluster crossing).

What torch allows. `DeviceMesh(device_type, mesh=rank_tensor)` takes any permutation of the
ranks, but every group it builds is created with `new_group(ranks)`, which sorts them: a
rank's group rank is then its place in sorted order, while DTensor, FSDP and pipelining use
its mesh coordinate. Both agree only if the ranks increase along every mesh dim (and, with
ep > 1, along the flattened dp_replicate x dp_shard x tp the ep groups are carved from), so
`auto` only considers maps with that property (`monotone`); `ordered` always has it. A
cluster map whose clusters interleave the node numbers can leave no better map; `auto` then
says so and uses `ordered`.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

LINK_CLASSES = ("intra_node", "intra_cluster", "inter_cluster")  # fastest first
LINK_FIELDS = ("bandwidth_gbps", "latency_ms")
MESH_DIMS = ("diloco", "pp", "dp_replicate", "dp_shard", "tp")
WEIGHTS = {"tp": 16, "dp_shard": 8, "dp_replicate": 4, "pp": 2, "diloco": 1}
SIMULATED_ENV = "DIST_TRAIN_SIMULATED_NODES"  # set by `dist-train local` for its ranks
EXAMPLE = "[topology] with clusters = 2, links = { inter_cluster = { bandwidth_gbps = 1.0, latency_ms = 2.0 } }"


def topology_given(t) -> bool:
    """Whether the config describes a topology (any [topology] field but simulate set)."""
    return bool(t.file or t.links or t.cluster_map or t.clusters > 1 or t.nodes)


def check_links(links: dict) -> None:
    """Link classes and their fields, in one line each (the config calls this at load)."""
    for name, spec in links.items():
        if name not in LINK_CLASSES:
            raise ConfigError(f"topology.links: unknown link class {name!r}; the classes are "
                              f"{', '.join(LINK_CLASSES)}")
        if not isinstance(spec, dict):
            raise ConfigError(f"topology.links.{name} must be a table like {{ bandwidth_gbps = 1.0, latency_ms = 2.0 }}")
        for key, v in spec.items():
            if key not in LINK_FIELDS:
                raise ConfigError(f"topology.links.{name}: unknown field {key!r}; use {', '.join(LINK_FIELDS)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 if key == "bandwidth_gbps"
                                                                               else v >= 0):
                raise ConfigError(f"topology.links.{name}.{key} = {v!r}: must be a number "
                                  f"{'> 0' if key == 'bandwidth_gbps' else '>= 0'}")


def link_si(spec: dict) -> tuple[float | None, float | None]:
    """One link class's table in SI units: (bytes per s, latency s), None where not given
    (`bandwidth_gbps` is Gbit/s: x 1e9 / 8; `latency_ms`: / 1e3)."""
    bw, lat = spec.get("bandwidth_gbps"), spec.get("latency_ms")
    return (bw * 1e9 / 8 if bw else None), (float(lat) / 1e3 if lat is not None else None)


def read_topology_file(path: str) -> dict:
    """The `[topology]` table of a topology file (`--topology FILE`, `topology.file`)."""
    from .config import tomllib

    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"topology file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"topology file {p}: cannot read it ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"topology file {p} is not valid TOML: {e}") from None
    body = raw.get("topology")
    if not isinstance(body, dict) or set(raw) != {"topology"}:
        raise ConfigError(f"topology file {p} must hold one table: {EXAMPLE}")
    if "file" in body:
        raise ConfigError(f"topology file {p}: a topology file cannot name another (topology.file)")
    return body


@dataclass(frozen=True)
class Topology:
    """Nodes in clusters on a launch of `world` ranks, `per_node` a node."""
    world: int
    per_node: int
    cluster_of_node: tuple[int, ...]        # node -> cluster index
    cluster_names: tuple[str, ...]
    links: dict                              # class -> {bandwidth_gbps, latency_ms}

    @property
    def nodes(self) -> int:
        return self.world // self.per_node

    def node(self, rank: int) -> int:
        return rank // self.per_node

    def cluster(self, rank: int) -> int:
        return self.cluster_of_node[rank // self.per_node]

    def link(self, a: int, b: int) -> str:
        if self.node(a) == self.node(b):
            return "intra_node"
        return "intra_cluster" if self.cluster(a) == self.cluster(b) else "inter_cluster"

    def group_link(self, ranks) -> str:
        """The slowest class among a group's members (an op over it is as slow as that)."""
        ranks = list(ranks)
        if len({self.cluster(r) for r in ranks}) > 1:
            return "inter_cluster"
        if len({self.node(r) for r in ranks}) > 1:
            return "intra_cluster"
        return "intra_node"

    def physical_order(self) -> list[int]:
        """Ranks by (cluster, node, local rank): clusters in order of their first node."""
        first = {}
        for n, c in enumerate(self.cluster_of_node):
            first.setdefault(c, n)
        return sorted(range(self.world), key=lambda r: (first[self.cluster(r)], self.node(r), r))

    def simulated_links(self) -> dict:
        """class -> (latency s, bytes per s or None) for the classes given a bandwidth or latency."""
        out = {}
        for name, spec in self.links.items():
            bps, lat = link_si(spec)
            lat = lat or 0.0
            if bps or lat:
                out[name] = (lat, bps)
        return out


def build_topology(t, world: int, nodes: int) -> Topology:
    """The `[topology]` section on a launch of `world` ranks over `nodes` nodes, or a
    one-line ConfigError naming the mismatch."""
    if t.nodes and t.nodes != nodes:
        raise ConfigError(f"topology.nodes = {t.nodes} but the launch has {nodes} node(s) (--nodes / --nnodes); "
                          f"describe {nodes} nodes or launch {t.nodes}")
    check_links(t.links)
    if t.cluster_map:
        seen: dict[int, str] = {}
        names = list(t.cluster_map)
        for name, members in t.cluster_map.items():
            if not isinstance(members, list) or not all(isinstance(n, int) and not isinstance(n, bool)
                                                        for n in members):
                raise ConfigError(f"topology.cluster_map.{name} = {members!r}: must be a list of node indices, "
                                  "e.g. [0, 1]")
            for n in members:
                if not 0 <= n < nodes:
                    raise ConfigError(f"topology.cluster_map.{name}: node {n} does not exist; the launch has nodes "
                                      f"0..{nodes - 1}")
                if n in seen:
                    raise ConfigError(f"topology.cluster_map: node {n} is in both {seen[n]!r} and {name!r}")
                seen[n] = name
        missing = sorted(set(range(nodes)) - set(seen))
        if missing:
            raise ConfigError(f"topology.cluster_map: node(s) {missing} are in no cluster; every one of the "
                              f"{nodes} nodes must be in one")
        sizes = {len(m) for m in t.cluster_map.values()}
        if len(sizes) != 1:
            raise ConfigError(f"topology.cluster_map: clusters of {sorted(sizes)} nodes; every cluster must hold the "
                              "same number of nodes")
        cluster_of = tuple(names.index(seen[n]) for n in range(nodes))
    else:
        if nodes % t.clusters:
            raise ConfigError(f"topology.clusters = {t.clusters} does not divide the launch's {nodes} node(s); "
                              f"choose clusters dividing {nodes} or set topology.cluster_map")
        per = nodes // t.clusters
        cluster_of = tuple(n // per for n in range(nodes))
        names = [str(c) for c in range(t.clusters)]
    return Topology(world, world // nodes, cluster_of, tuple(names), dict(t.links))


# ----------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Placement:
    """Which rank holds which mesh coordinate: `ranks[d, p, r, s, t]` (nested lists in
    MESH_DIMS order), and how it was chosen."""
    mode: str                    # the map in use: "ordered" or "auto"
    shape: tuple[int, ...]
    ranks: tuple[int, ...]       # row-major over shape: position -> global rank
    order: tuple[str, ...]       # dims outermost first as laid over the physical order ("ordered": MESH_DIMS)
    note: str = ""

    @property
    def identity(self) -> bool:
        return list(self.ranks) == list(range(len(self.ranks)))

    def tensor(self):
        import torch

        return torch.tensor(self.ranks, dtype=torch.int).view(self.shape)

    def groups(self, dim: str) -> list[list[int]]:
        """Every group of `dim`: the ranks along it, in coordinate order."""
        return _groups(self.ranks, self.shape, MESH_DIMS.index(dim))

    def coords(self, rank: int) -> dict:
        pos = self.ranks.index(rank)
        out = {}
        for name, size in zip(reversed(MESH_DIMS), reversed(self.shape)):
            out[name] = pos % size
            pos //= size
        return dict(reversed(list(out.items())))


def _groups(ranks, shape, axis: int) -> list[list[int]]:
    stride = math.prod(shape[axis + 1:])
    size = shape[axis]
    out = []
    for pos in range(len(ranks)):
        if (pos // stride) % size == 0:
            out.append([ranks[pos + i * stride] for i in range(size)])
    return out


def monotone(ranks, shape, ep: int = 1) -> bool:
    """Ranks increase along every dim (and along dp_replicate x dp_shard x tp with ep > 1):
    what torch's sorted groups need (module docstring)."""
    for axis in range(len(shape)):
        if any(g != sorted(g) for g in _groups(ranks, shape, axis)):
            return False
    if ep > 1:
        inner = math.prod(shape[2:])
        for start in range(0, len(ranks), inner):
            block = list(ranks[start:start + inner])
            if block != sorted(block):
                return False
    return True


def _laid(shape: tuple[int, ...], order: tuple[str, ...], phys: list[int]) -> tuple[int, ...]:
    """Position (row-major in MESH_DIMS order) -> rank, for the mesh laid over the physical
    order with `order` (outermost first)."""
    sizes = dict(zip(MESH_DIMS, shape))
    out = []
    for coords in itertools.product(*(range(s) for s in shape)):
        c = dict(zip(MESH_DIMS, coords))
        idx = 0
        for name in order:
            idx = idx * sizes[name] + c[name]
        out.append(phys[idx])
    return tuple(out)


def cost(topo: Topology, ranks, shape) -> int:
    """Sum over dims of weight x the class its groups cross (0 in a node, 1 in a cluster,
    2 between clusters), worst group counted."""
    total = 0
    for axis, name in enumerate(MESH_DIMS):
        if shape[axis] > 1:
            worst = max(LINK_CLASSES.index(topo.group_link(g)) for g in _groups(ranks, shape, axis))
            total += WEIGHTS[name] * worst
    return total


def place(mode: str, shape: tuple[int, ...], topo: Topology | None, ep: int = 1) -> Placement:
    """The placement for `parallel.placement = mode` (see the module docstring)."""
    world = math.prod(shape)
    ordered = Placement("ordered", tuple(shape), tuple(range(world)), MESH_DIMS)
    if mode == "ordered" or topo is None:
        return ordered
    phys = topo.physical_order()
    best, best_cost = ordered, cost(topo, ordered.ranks, shape)
    active = [n for n, s in zip(MESH_DIMS, shape) if s > 1]
    rejected = 0
    for perm in itertools.permutations(active):
        order = tuple(n for n in MESH_DIMS if n not in active) + perm
        ranks = _laid(tuple(shape), order, phys)
        c = cost(topo, ranks, shape)
        if c >= best_cost:
            continue
        if not monotone(ranks, shape, ep):
            rejected += 1
            continue
        best, best_cost = Placement("auto", tuple(shape), ranks, order), c
    if best is ordered:
        note = ("no map crosses slower links than ordered's: the same map" if not rejected else
                f"the {rejected} map(s) crossing slower links less than ordered have ranks decreasing along a mesh "
                "dim, which torch's sorted groups cannot build (number the nodes cluster by cluster); using ordered's")
        return Placement("auto", ordered.shape, ordered.ranks, MESH_DIMS, note)
    return best


def describe(p: Placement, topo: Topology | None) -> list[str]:
    """Lines printed at start: per dim of size > 1 its groups and the link class they cross."""
    sizes = dict(zip(MESH_DIMS, p.shape))
    order = [n for n in p.order if sizes[n] > 1]
    laid = f" (dims over cluster > node > rank, outermost first: {' > '.join(order)})" if p.mode == "auto" and not p.note \
        else ""
    lines = [f"placement: {p.mode}{laid}" + (f"; {p.note}" if p.note else "")]
    for name, size in zip(MESH_DIMS, p.shape):
        if size > 1:
            groups = p.groups(name)
            links = sorted({topo.group_link(g) for g in groups}, key=LINK_CLASSES.index) if topo else []
            shown = " ".join(str(g).replace(" ", "") for g in groups[:8]) + (" ..." if len(groups) > 8 else "")
            lines.append(f"  {name}: {shown}" + (f" over {'/'.join(links)}" if links else ""))
    return lines


def placement_record(p: Placement, topo: Topology | None) -> dict:
    """placement.json: the map, every rank's node, cluster and coordinates, and per dim its
    groups with the link class each crosses."""
    world = len(p.ranks)
    dims = {}
    for name, size in zip(MESH_DIMS, p.shape):
        groups = p.groups(name)
        dims[name] = {"size": size, "groups": [{"ranks": g, "link": topo.group_link(g) if topo else None}
                                               for g in groups] if size > 1 else []}
    ranks = []
    for r in range(world):
        entry = {"rank": r, "coords": p.coords(r)}
        if topo is not None:
            entry |= {"node": topo.node(r), "cluster": topo.cluster_names[topo.cluster(r)]}
        ranks.append(entry)
    return {"placement": p.mode, "note": p.note, "order": list(p.order), "shape": dict(zip(MESH_DIMS, p.shape)),
            "mesh": p.tensor().tolist(), "dims": dims, "ranks": ranks,
            "links": topo.links if topo else {}}


def write_placement(run_dir: Path, p: Placement, topo: Topology | None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "placement.json"
    path.write_text(json.dumps(placement_record(p, topo), indent=1) + "\n")
    return path


def simulate_wanted(t) -> bool:
    """Whether this rank's observed groups slow ops down to the topology's links."""
    if t.simulate == "on":
        return True
    return t.simulate == "auto" and os.environ.get(SIMULATED_ENV) == "1"
