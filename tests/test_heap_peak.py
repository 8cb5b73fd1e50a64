"""The CPU live-allocation peak (dist_train/heap_peak.py): it sees what a step holds at its
peak and not what glibc keeps after a free. Single-process; the trainer's records carry
it as peak_allocated_bytes (test_dp_equivalence checks the field)."""
from __future__ import annotations

import pytest
import torch

from dist_train import planner as P
from dist_train.config import load_config
from dist_train.heap_peak import HeapPeak
from dist_train.model import Transformer

heap = HeapPeak()
pytestmark = pytest.mark.skipif(not heap.available, reason="needs glibc's mallinfo2")


def test_in_use_follows_a_tensor_and_its_free():
    h = HeapPeak()
    before = h.in_use()
    x = torch.empty(16 * 2 ** 20 // 4)
    h.sample()
    assert h.peak - before >= 16 * 2 ** 20
    del x
    assert h.in_use() - before < 2 ** 20  # returned (the RSS peak would keep it)


def _model(checkpoint: str):
    cfg = load_config("configs/tiny.toml", ["model.dim=64", "model.n_layers=3", "data.seq_len=128"])
    a = P.model_args(cfg)
    torch.manual_seed(0)
    m = Transformer(a)
    for blk in m.layers.values():
        blk.checkpoint = checkpoint
    m.init_buffers()
    tokens = torch.randint(0, a.vocab_size, (8, 129))
    return a, m, tokens[:, :-1], tokens[:, 1:]


def test_peak_holds_the_saved_activations_after_backward_frees_them():
    a, m, x, y = _model("none")
    h = HeapPeak()
    h.watch(m)
    base = h.in_use()
    loss = m(x, y)
    held = h.in_use() - base          # the activations autograd keeps, at the end of forward
    loss.backward()
    del loss
    after = h.in_use() - base
    acts = 3 * P.block_activation_bytes(a, 8, 128, 1, "none", "torch", 4)
    assert held >= acts                # the formula's tensors are all there
    assert h.peak - base >= held       # the samples saw them
    assert h.peak - base - after >= 0.9 * acts  # and they are gone once backward ran


def test_peak_sees_the_recomputed_block_under_full_checkpointing():
    """Only block inputs are kept in forward; backward recomputes one block at a time, and
    the samples inside the recomputation see that block's activations."""
    a, m, x, y = _model("full")
    h = HeapPeak()
    h.watch(m)
    loss = m(x, y)
    at_forward_end = h.in_use()
    h.peak = at_forward_end
    loss.backward()
    one_block = P.block_activation_bytes(a, 8, 128, 1, "none", "torch", 4)
    assert h.peak - at_forward_end >= 0.5 * one_block
