"""Fused linear + cross-entropy: both backends against the unfused F.cross_entropy(x @ W.T),
loss and both gradients; the memory claim (never the full logits) measured; the vocab-parallel
variant on 2 real gloo processes."""
import math
import socket
import weakref

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dist_train.kernels import linear_cross_entropy, linear_cross_entropy_reference
from dist_train.kernels.cross_entropy import IMPLEMENTED
from dist_train.kernels.dispatch import resolve
from tests.conftest import kernel_tol

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("triton_interpret")  # kernels run in the CPU interpreter


def _naive(x, w, t, ignore_index=-100, label_smoothing=0.0):
    logits = x.reshape(-1, x.shape[-1]).float() @ w.float().t()
    tt = t.reshape(-1)
    if (tt == ignore_index).all():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, tt, ignore_index=ignore_index, label_smoothing=label_smoothing)


def _run(fn, x, w, t, **kw):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    loss = fn(x, w, t, **kw)
    (loss * 1.7).backward()  # a non-unit incoming gradient
    return loss, x.grad, w.grad


def _inputs(shape, dim, vocab, dtype=torch.float32, seed=0, n_ignored=3, ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, dim, generator=gen) * 0.5).to(dtype)
    w = (torch.randn(vocab, dim, generator=gen) * 0.5).to(dtype)
    t = torch.randint(0, vocab, shape, generator=gen)
    flat = t.view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[:n_ignored]] = ignore_index
    return x, w, t


def test_auto_picks_triton_under_interpreter():
    assert resolve("auto", "cpu", IMPLEMENTED) == "triton"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape,dim,vocab,chunk,ls,ignore_index", [
    ((3, 13), 24, 97, 16, 0.0, -100),    # ragged last chunk, odd vocab
    ((3, 13), 24, 97, None, 0.1, -100),  # default chunk, label smoothing
    ((1,), 8, 33, None, 0.0, -100),      # one token
    ((2, 5), 16, 1500, 4, 0.2, 0),       # vocab over one Triton block; ignore_index is a real id
])
def test_linear_cross_entropy_fp32(backend, shape, dim, vocab, chunk, ls, ignore_index):
    x, w, t = _inputs(shape, dim, vocab, n_ignored=min(3, len(shape) and int(torch.tensor(shape).prod()) - 1),
                      ignore_index=ignore_index)
    ours = _run(linear_cross_entropy, x, w, t, ignore_index=ignore_index, label_smoothing=ls, chunk_size=chunk,
                backend=backend)
    ref = _run(_naive, x, w, t, ignore_index=ignore_index, label_smoothing=ls)
    for name, a, r in zip(("loss", "dx", "dw"), ours, ref):
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_cross_entropy_all_ignored_is_zero(backend):
    x, w, t = _inputs((2, 3), 8, 11, n_ignored=6)
    loss, dx, dw = _run(linear_cross_entropy, x, w, t, backend=backend)
    assert loss.item() == 0.0
    assert torch.count_nonzero(dx) == 0 and torch.count_nonzero(dw) == 0


def test_linear_cross_entropy_bf16_against_fp32():
    rows, dim, vocab, chunk = 18, 32, 101, 5
    x, w, t = _inputs((2, 9), dim, vocab, dtype=torch.bfloat16, seed=3)
    ours = _run(linear_cross_entropy, x, w, t, label_smoothing=0.1, chunk_size=chunk, backend="triton")
    ref = _run(_naive, x.float(), w.float(), t, label_smoothing=0.1)
    # The Triton path keeps each chunk's logits z and their gradient dz in bf16, statistics in
    # fp32. Rounding z moves each by up to eps/2 * |z|, so lse and the target logit by up to
    # that of max |z|: the loss by up to eps * max |z|, and each softmax probability relatively
    # by as much. dz is rounded once more; dx = dz @ W is rounded once; dw adds one bf16
    # product per chunk into fp32 and is rounded once at the end. The errors of dz (and of the
    # chunk products) are of the size of the terms of dx and dw (term_roundings).
    eps = torch.finfo(torch.bfloat16).eps
    max_z = (x.float().reshape(rows, dim) @ w.float().t()).abs().max().item()
    n_chunks = -(-rows // chunk)
    k = dim + 2 * vocab + rows  # fp32 sums: logits, softmax, then dx (over vocab) or dw (rows)
    term_roundings = {"dx": math.ceil(max_z) + 1, "dw": math.ceil(max_z) + 1 + n_chunks}
    for name, a, r in zip(("loss", "dx", "dw"), ours, ref):
        assert a.dtype == (torch.float32 if name == "loss" else torch.bfloat16), name
        if name == "loss":
            tol = kernel_tol(torch.float32, k=k, scale=r.item())
            tol["atol"] += eps * max_z
        else:
            tol = kernel_tol(torch.bfloat16, k=k, scale=r.abs().max().item(), term_roundings=term_roundings[name])
        torch.testing.assert_close(a.float(), r, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_cross_entropy_rejects_out_of_vocab_target(backend):
    x, w, t = _inputs((5,), 8, 11, n_ignored=1)
    t[0] = 11
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_cross_entropy(x, w, t, backend=backend)


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_reference_chunked_equals_full_logits(ls):
    """The chunked torch reference (8 chunks of 5 rows, the last of 2; odd dim and vocab) gives
    the loss and both gradients of F.cross_entropy on the full logits."""
    rows, dim, vocab = 37, 23, 97
    x, w, t = _inputs((rows,), dim, vocab, seed=4)
    ours = _run(linear_cross_entropy_reference, x, w, t, label_smoothing=ls, chunk_size=5)
    ref = _run(_naive, x, w, t, label_smoothing=ls)
    # reductions on the way: the logits (dim), the softmax over the vocab, then the mean over
    # rows (loss), dz @ W over the vocab (dx) or dz^T x over the rows (dw)
    for name, a, r in zip(("loss", "dx", "dw"), ours, ref):
        tol = kernel_tol(torch.float32, k=dim + 2 * vocab + rows, scale=r.abs().max().item())
        torch.testing.assert_close(a, r, **tol, msg=lambda m: f"{name}: {m}")


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops create (below autograd, so forward and backward),
    held at once: a storage counts from the op that first returns it until the last tensor
    returned on it is freed. `peak` and `largest` (one storage) over the mode's lifetime;
    storages of the tensors passed in (inputs made before) are not counted."""

    def __init__(self, *outside):
        super().__init__()
        self.outside = {t.untyped_storage().data_ptr() for t in outside}
        self.live, self.now, self.peak, self.largest = {}, 0, 0, 0

    def _release(self, ptr):
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in tree_flatten(out)[0]:
            if not isinstance(o, torch.Tensor):
                continue
            storage = o.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in self.outside:
                continue
            if ptr not in self.live:
                self.live[ptr] = [storage.nbytes(), 0]
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                self.largest = max(self.largest, storage.nbytes())
            self.live[ptr][1] += 1
            weakref.finalize(o, self._release, ptr)
        return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunked_path_never_holds_the_full_logits(backend):
    """Forward + backward of the chunked loss: no tensor larger than one chunk of logits, and at
    most a fifth of one full logits tensor held at any time; the naive loss measured the same way
    holds the full logits (so the measurement can fail)."""
    rows, dim, vocab, chunk = 128, 4, 1024, 8
    x, w, t = _inputs((rows,), dim, vocab, seed=5)
    full = rows * vocab * 4  # fp32 logits
    one_chunk = chunk * vocab * 4  # = full * chunk / rows = full / 16
    # the largest tensors the chunked path makes are one chunk of logits (softmax and gradient
    # are written over it) and the x- and w-sized gradients, which are smaller here
    assert x.nbytes < one_chunk and w.nbytes <= one_chunk
    # held at once, at most: the next chunk's logits beside the last one's (2 chunks), the
    # gradients made in forward and their scaled copies in backward (2 x (x + w)), and a few
    # per-row vectors (target, mask, scale, statistics: under 16 of 8 bytes a row)
    peak_bound = 2 * one_chunk + 2 * (x.nbytes + w.nbytes) + 16 * 8 * rows
    assert peak_bound < full / 4

    measured = {}
    for name in ("ours", "naive"):
        xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
        with _LiveBytes(xs, ws, t) as mode:
            if name == "ours":
                loss = linear_cross_entropy(xs, ws, t, chunk_size=chunk, backend=backend)
            else:
                loss = _naive(xs, ws, t)
            loss.backward()
            del loss
        measured[name] = dict(largest=mode.largest, peak=mode.peak)
    assert measured["ours"]["largest"] <= one_chunk < full <= measured["naive"]["largest"], measured
    assert measured["ours"]["peak"] <= peak_bound < full <= measured["naive"]["peak"], measured


# ----------------------------------------------------------------------------- vocab parallel

VP_CASES = [  # (backend, label_smoothing, ignore_index, chunk_size, reduce_grad_input)
    ("torch", 0.0, -100, 4, True),
    ("torch", 0.1, -100, None, False),
    ("triton", 0.0, -100, 4, True),
    ("triton", 0.1, 2, 5, True),
]
VP_SHAPE, VP_DIM, VP_VOCAB, VP_SPLIT = (2, 7), 12, 37, 19  # rank 0: rows [0, 19), rank 1: [19, 37)


def _vp_worker(rank, world, port):
    import torch.distributed as dist

    from dist_train.kernels.cross_entropy import vocab_parallel_linear_cross_entropy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group = dist.new_group([0, 1])  # a group passed in, not the default one
        lo, hi = (0, VP_SPLIT) if rank == 0 else (VP_SPLIT, VP_VOCAB)
        for backend, ls, ignore_index, chunk, reduce_dx in VP_CASES:
            x, w, t = _inputs(VP_SHAPE, VP_DIM, VP_VOCAB, seed=7, ignore_index=ignore_index)
            ref_loss, ref_dx, ref_dw = _run(_naive, x, w, t, ignore_index=ignore_index, label_smoothing=ls)
            xs = x.clone().requires_grad_()
            ws = w[lo:hi].clone().requires_grad_()
            loss = vocab_parallel_linear_cross_entropy(xs, ws, t, group, lo, ignore_index, ls, chunk_size=chunk,
                                                       reduce_grad_input=reduce_dx, backend=backend)
            (loss * 1.7).backward()
            case = f"rank {rank} {backend} ls={ls} ignore={ignore_index} chunk={chunk}"
            torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, msg=lambda m: f"{case} loss: {m}")
            torch.testing.assert_close(ws.grad, ref_dw[lo:hi], atol=1e-5, rtol=1e-5, msg=lambda m: f"{case} dw: {m}")
            dx = xs.grad
            if not reduce_dx:  # the caller reduces the partial input gradients
                dist.all_reduce(dx, group=group)
            torch.testing.assert_close(dx, ref_dx, atol=1e-5, rtol=1e-5, msg=lambda m: f"{case} dx: {m}")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vocab_parallel_two_gloo_ranks(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_vp_worker, args=(2, _free_port()), nprocs=2, join=True)
