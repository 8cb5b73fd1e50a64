"""Observe every collective below the Python API with a wrapping process-group backend.

Why this layer: FSDP2, DTensor (functional collectives, called from C++),
pipelining (batched p2p) and `all_to_all_single` all end up calling methods of
the group's `ProcessGroup` object. Registering a backend whose creator returns
a Python subclass of `dist.ProcessGroup` puts us under all of them at once:
monkeypatching `dist.*` misses DTensor and pipelining, the profiler has no
group or sequence number, a TorchDispatchMode costs ~3x per op, and the flight
recorder has no durations on gloo (measured on torch 2.13).

How: `register_observed_backend()` registers "observed" and returns the backend
string for `dist.init_process_group(backend=...)`; `init_device_mesh` and
`new_group` inherit it, so every mesh group is wrapped. Each
`ObservedProcessGroup` forwards to an inner, unregistered C++ `ProcessGroup`
holding a real `ProcessGroupGloo` for CPU tensors and, where CUDA and NCCL
exist, a `ProcessGroupNCCL` for CUDA tensors, so device dispatch stays in C++
exactly as for a plain "cpu:gloo,cuda:nccl" group. Nothing is registered on the
outer group itself, so no C++ path can reach a backend without passing through
us; device queries (`_device_types`, `_get_backend`) answer for the inner
group. This group never reports a bound device (torch 2.13 binds `device_id`
on the plain group it then replaces with ours; NCCL still connects eagerly), so
`init_device_mesh`/`new_group` create sub-groups through this backend instead
of splitting the real communicator outside it; setting one is refused.

Timing: `t_enter` is stamped just before the real call (after fault hooks);
`t_exit` when the caller's `wait()` returns (or `is_completed()` first says
True). That is exact for blocking calls and an upper bound for async work
waited on later; completion callbacks cost ~2x more and do not exist for gloo
reduce_scatter/send/recv.

Known limits: `dist.monitored_barrier` refuses non-"gloo" backend strings, use
`monitored_barrier()` here (it runs on the inner gloo backend).
`batch_isend_irecv` only coalesces on an exact `ProcessGroup`, so on this group
it issues one send/recv per op. Harmless on gloo (sends do not block); on NCCL
(untested here) ungrouped send/recv between the same pair in both directions
can deadlock, so pipelining on GPU must be checked before relying on it.
`dist.isend/irecv` themselves are untouched (pipelining checks their identity).
"""

from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, ProcessGroupGloo

from .recorder import CollectiveRecord, CollectiveRecorder, _now

BACKEND_NAME = "observed"

_CPU = torch.device("cpu")
_BT = dist.ProcessGroup.BackendType
_lock = threading.Lock()
_recorder: CollectiveRecorder | None = None  # the process's recorder (not a group)


def get_recorder() -> CollectiveRecorder:
    """The one process-wide recorder that observed groups created from now on feed."""
    global _recorder
    if _recorder is None:
        with _lock:
            if _recorder is None:
                _recorder = CollectiveRecorder()
    return _recorder


def _cuda_wanted() -> bool:
    return torch.cuda.is_available() and dist.is_nccl_available()


def register_observed_backend(recorder: CollectiveRecorder | None = None) -> str:
    """Register the observing backend once per process; return the backend string.

    `recorder` (optional) becomes the process recorder for groups created
    afterwards. Returns "cpu:observed" or "cpu:observed,cuda:observed".
    """
    global _recorder
    if recorder is not None:
        _recorder = recorder
    with _lock:
        if BACKEND_NAME.upper() not in dist.Backend._plugins:
            devices = ["cpu", "cuda"] if _cuda_wanted() else ["cpu"]
            dist.Backend.register_backend(
                BACKEND_NAME, _create_observed_group, extended_api=True, devices=devices)
    return ",".join(f"{d}:{BACKEND_NAME}" for d in (("cpu", "cuda") if _cuda_wanted() else ("cpu",)))


def _create_observed_group(opts, pg_options):
    """Backend creator (extended API): build the real backends, wrap them."""
    store, rank, size, timeout = opts.store, opts.group_rank, opts.group_size, opts.timeout
    ranks = list(opts.global_ranks_in_group)
    name = opts.group_id
    inner = dist.ProcessGroup(store, rank, size)

    gloo_store = PrefixStore("gloo/", store)
    if isinstance(pg_options, ProcessGroupGloo._Options):  # caller's options, by hand
        if not pg_options._devices:
            pg_options._devices = [ProcessGroupGloo.create_default_device()]
        gloo = ProcessGroupGloo(gloo_store, rank, size, pg_options)
    else:
        gloo = ProcessGroupGloo(gloo_store, rank, size, timeout=timeout)
    gloo.options.global_ranks_in_group = ranks
    gloo.options.group_name = name
    gloo._set_sequence_number_for_group()
    inner._register_backend(_CPU, _BT.GLOO, gloo)
    default = _BT.GLOO

    if _cuda_wanted():  # untested here (no GPU); mirrors torch's own NCCL setup
        from torch.distributed import ProcessGroupNCCL
        nopts = pg_options if isinstance(pg_options, ProcessGroupNCCL.Options) else None
        if nopts is None:
            nopts = ProcessGroupNCCL.Options()
            nopts.is_high_priority_stream = False
        nopts._timeout = timeout
        nopts.global_ranks_in_group = ranks
        nopts.group_name = name
        nccl = ProcessGroupNCCL(PrefixStore("nccl/", store), rank, size, nopts)
        nccl._set_sequence_number_for_group()
        inner._register_backend(torch.device("cuda"), _BT.NCCL, nccl)
        default = _BT.NCCL

    inner._set_default_backend(default)
    inner._set_group_name(name)
    return ObservedProcessGroup(store, rank, size, inner, ranks or range(size), get_recorder())


def _nb(t) -> int:
    """Bytes of a tensor or a (nested) list of tensors (no isinstance: the
    Tensor metaclass makes it slow on this hot path)."""
    if t.__class__ is list or t.__class__ is tuple:
        n = 0
        for x in t:
            n += _nb(x)
        return n
    return t.nbytes


def _to_self(input, splits, rank: int, size: int) -> int:
    """Bytes of an all_to_all's input that stay on this rank (its own chunk)."""
    if not input.numel():
        return 0
    if not splits:
        return input.nbytes // size
    return int(splits[rank]) * (input.nbytes // input.shape[0])


_work_init = dist.Work.__init__


class _ObservedWork(dist.Work):
    """Forwards to the real Work; stamps the record's exit on first completion seen."""

    def __init__(self, inner, st, rec):
        _work_init(self)
        self._w = (inner, st, rec)

    def wait(self, timeout=None):
        inner, st, rec = self._w
        if not rec.t_wait:
            rec.t_wait = _now()
        arrived = rec.link_s and not rec.t_exit and inner.is_completed()
        try:
            ok = inner.wait() if timeout is None else inner.wait(timeout)
        except BaseException as e:
            st.fail(rec, e)
            raise
        if rec.hold_s and not rec.t_exit:  # injected slow transfer (fault hook)
            time.sleep(rec.hold_s)
        if rec.link_s and not rec.t_exit:  # a simulated slow link (the topology's link model):
            # done before the wait, it ends link_s after it was entered; else link_s after it completes
            left = rec.link_s - (_now() - rec.t_enter) / 1e9 if arrived else rec.link_s
            if left > 0:
                time.sleep(left)
        st.end(rec)
        return ok

    def is_completed(self):
        inner, st, rec = self._w
        done = inner.is_completed()
        if done:
            st.end(rec)
        return done

    def get_future(self):
        return self._w[0].get_future()

    def is_success(self):
        return self._w[0].is_success()

    def exception(self):
        return self._w[0].exception()

    def result(self):
        return self._w[0].result()

    def source_rank(self):
        return self._w[0].source_rank()

    def _source_rank(self):
        return self._w[0]._source_rank()

    def synchronize(self):
        return self._w[0].synchronize()

    def block_current_stream(self):
        return self._w[0].block_current_stream()

    def get_future_result(self):
        return self._w[0].get_future_result()

    @property
    def record(self) -> CollectiveRecord:
        return self._w[2]


class ObservedProcessGroup(dist.ProcessGroup):
    """A ProcessGroup that records each op, runs fault hooks, then forwards.

    Overrides every collective and p2p method of torch 2.13's ProcessGroup
    (the ones FSDP2, DTensor, pipelining and `dist.*` call, plus the rest);
    parameter names follow pybind's first overload so keyword calls work. `recorder` is reachable from any group,
    e.g. `mesh.get_group("tp").recorder`.
    """

    def __init__(self, store, rank, size, inner, global_ranks, recorder):
        super().__init__(rank, size)
        self._inner = inner
        self.recorder = recorder
        self.global_ranks = tuple(global_ranks)
        self._me = self.global_ranks[rank]
        self._st = recorder.add_group(self.global_ranks)
        if recorder.rank < 0:
            recorder.rank = self._me

    # --- naming -----------------------------------------------------------
    def _name_state(self, label=None) -> None:
        """Fill in the record name and torch's group name (set after creation)."""
        st = self._st
        st.gid = self.group_name
        if label is not None:
            st.name = label
            return
        desc = self.group_desc or ""
        if desc.startswith("mesh_") and desc != "mesh_default":
            st.name = desc[len("mesh_"):]
        elif desc == "default_pg":
            st.name = "world"
        else:
            st.name = "ranks[" + ",".join(map(str, self.global_ranks)) + "]"

    @property
    def label(self) -> str:
        """Name used in records: mesh dim name, "world", or "ranks[...]"."""
        if self._st.name is None:
            self._name_state()
        return self._st.name

    @label.setter
    def label(self, name: str) -> None:
        self._name_state(name)

    # --- core -------------------------------------------------------------
    def _go(self, op, kind, nbytes, fn, args, kwargs, p2p_peer=None, peers=None, wire=None):
        st = self._st
        if st.name is None:
            self._name_state()
        rec = self.recorder.begin(st, op, kind, nbytes, peers, p2p_peer, wire)
        try:
            work = fn(*args, **kwargs)
        except BaseException as e:
            st.fail(rec, e)
            raise
        return _ObservedWork(work, st, rec)

    def _p2p(self, op, tensors, peer, args, kwargs, fn):
        gpeer = self.global_ranks[peer] if peer >= 0 else -1
        peers = (self._me, gpeer) if op == "send" else (gpeer, self._me)
        return self._go(op, "send_recv", _nb(tensors), fn, args, kwargs, gpeer, peers)

    # --- collectives torch calls -------------------------------------------
    def allreduce(self, tensors, *a, **k):
        return self._go("allreduce", "all_reduce", _nb(tensors), self._inner.allreduce, (tensors,) + a, k)

    def allreduce_coalesced(self, tensors, *a, **k):
        return self._go("allreduce_coalesced", "all_reduce", _nb(tensors),
                        self._inner.allreduce_coalesced, (tensors,) + a, k)

    def all_gather_single(self, output, input, *a, **k):
        return self._go("all_gather_single", "all_gather", output.nbytes,
                        self._inner.all_gather_single, (output, input) + a, k)

    def all_gather_single_coalesced(self, outputs, inputs, *a, **k):
        return self._go("all_gather_single_coalesced", "all_gather", _nb(outputs),
                        self._inner.all_gather_single_coalesced, (outputs, inputs) + a, k)

    def allgather(self, output_tensors, input_tensors, *a, **k):
        return self._go("allgather", "all_gather", _nb(output_tensors),
                        self._inner.allgather, (output_tensors, input_tensors) + a, k)

    def allgather_coalesced(self, output_lists, input_list, *a, **k):
        return self._go("allgather_coalesced", "all_gather", _nb(output_lists),
                        self._inner.allgather_coalesced, (output_lists, input_list) + a, k)

    def reduce_scatter_single(self, outputTensor, inputTensor, *a, **k):
        return self._go("reduce_scatter_single", "reduce_scatter", inputTensor.nbytes,
                        self._inner.reduce_scatter_single, (outputTensor, inputTensor) + a, k)

    def reduce_scatter_single_coalesced(self, outputs, inputs, *a, **k):
        return self._go("reduce_scatter_single_coalesced", "reduce_scatter", _nb(inputs),
                        self._inner.reduce_scatter_single_coalesced, (outputs, inputs) + a, k)

    def reduce_scatter(self, output_tensors, input_tensors, *a, **k):
        return self._go("reduce_scatter", "reduce_scatter", _nb(input_tensors),
                        self._inner.reduce_scatter, (output_tensors, input_tensors) + a, k)

    def all_to_all_single(self, output, input, *a, **k):
        splits = a[1] if len(a) > 1 else k.get("input_split_sizes")
        return self._go("all_to_all_single", "all_to_all", input.nbytes,
                        self._inner.all_to_all_single, (output, input) + a, k,
                        wire=input.nbytes - _to_self(input, splits, self.rank(), self.size()))

    def alltoall(self, output_tensors, input_tensors, *a, **k):
        return self._go("alltoall", "all_to_all", _nb(input_tensors),
                        self._inner.alltoall, (output_tensors, input_tensors) + a, k)

    def broadcast(self, tensors, *a, **k):
        return self._go("broadcast", "broadcast", _nb(tensors), self._inner.broadcast, (tensors,) + a, k)

    def reduce(self, tensors, *a, **k):
        return self._go("reduce", "other", _nb(tensors), self._inner.reduce, (tensors,) + a, k)

    def gather(self, output_tensors, input_tensors, *a, **k):
        return self._go("gather", "other", _nb(input_tensors),
                        self._inner.gather, (output_tensors, input_tensors) + a, k)

    def scatter(self, output_tensors, input_tensors, *a, **k):
        return self._go("scatter", "other", _nb(output_tensors),
                        self._inner.scatter, (output_tensors, input_tensors) + a, k)

    def barrier(self, *a, **k):
        return self._go("barrier", "barrier", 0, self._inner.barrier, a, k)

    def send(self, tensors, dstRank, *a, **k):
        return self._p2p("send", tensors, dstRank, (tensors, dstRank) + a, k, self._inner.send)

    def recv(self, tensors, srcRank, *a, **k):
        return self._p2p("recv", tensors, srcRank, (tensors, srcRank) + a, k, self._inner.recv)

    def recv_anysource(self, tensors, *a, **k):
        return self._p2p("recv_anysource", tensors, -1, (tensors,) + a, k, self._inner.recv_anysource)

    # Older spellings some callers still use.
    alltoall_base = all_to_all_single
    _allgather_base = all_gather_single
    _reduce_scatter_base = reduce_scatter_single
    allgather_into_tensor_coalesced = all_gather_single_coalesced
    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def monitored_barrier(self, timeout=None, wait_all_ranks=False):
        """Barrier that names late ranks; runs on the inner gloo backend."""
        gloo = self._inner._get_backend(_CPU)
        if timeout is None:
            timeout = gloo.options._timeout  # the group's own timeout
        st = self._st
        if st.name is None:
            self._name_state()
        rec = self.recorder.begin(st, "monitored_barrier", "barrier", 0)
        try:
            gloo.monitored_barrier(timeout, wait_all_ranks=wait_all_ranks)
        except BaseException as e:
            st.fail(rec, e)
            raise
        st.end(rec)

    # --- plumbing -----------------------------------------------------------
    # C++ keeps a group's name and description on its backends; this group
    # has none, so the pybind trampoline's get/set overrides serve them.
    def getGroupName(self):
        return self._inner.group_name

    def setGroupName(self, name):
        self._inner._set_group_name(name)

    def getGroupDesc(self):
        return self._inner.group_desc

    def setGroupDesc(self, desc):
        self._inner._set_group_desc(desc)

    def getBackendName(self):
        return self._inner.name()

    def shutdown(self):
        self._inner.shutdown()

    def abort(self):
        self._inner.abort()

    def set_timeout(self, timeout):
        self._inner.set_timeout(timeout)

    def _get_sequence_number_for_group(self):
        return self._inner._get_sequence_number_for_group()

    # Device queries answer for the inner group so that helpers keyed on them
    # (object collectives, DCP async_save and rank-0 state-dict broadcast,
    # _set_pg_timeout) behave as on "cpu:gloo,cuda:nccl". A backend handed out
    # here is for configuration; ops issued on it directly are not recorded.
    @property
    def _device_types(self):
        return self._inner._device_types

    def _get_backend(self, device):
        return self._inner._get_backend(device)

    @property
    def bound_device_id(self):
        return None

    @bound_device_id.setter
    def bound_device_id(self, device):
        if device is not None:
            raise RuntimeError(
                "an observed group cannot be bound to a device: torch would split "
                "sub-groups off the real communicator, outside the wrapper")

    @property
    def inner(self) -> dist.ProcessGroup:
        """The real (unobserved) group; ops issued on it are not recorded."""
        return self._inner


def recorder_of(group) -> CollectiveRecorder | None:
    """The recorder an observed group feeds, or None for a plain group."""
    return getattr(group, "recorder", None) if isinstance(group, ObservedProcessGroup) else None


def name_mesh_groups(mesh) -> None:
    """Label each observed mesh group with its dim name.

    Needed where a dim spans the whole world: `init_device_mesh` then reuses
    the default group (described "default_pg", not "mesh_<dim>"). A group
    serving several dims gets the names joined with "+".
    """
    seen: dict = {}
    for dim in mesh.mesh_dim_names or ():
        g = mesh.get_group(dim)
        if isinstance(g, ObservedProcessGroup):
            seen.setdefault(id(g), (g, []))[1].append(dim)
    for g, dims in seen.values():
        g.label = "+".join(dims)


def monitored_barrier(group=None, timeout=None, wait_all_ranks=False) -> None:
    """`dist.monitored_barrier` that also works on observed groups."""
    g = group if group is not None else dist.distributed_c10d._get_default_group()
    if isinstance(g, ObservedProcessGroup):
        g.monitored_barrier(timeout, wait_all_ranks=wait_all_ranks)
    else:
        dist.monitored_barrier(group, timeout=timeout, wait_all_ranks=wait_all_ranks)
