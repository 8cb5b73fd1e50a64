"""The peak of memory held by live allocations on a CPU rank: the counterpart of CUDA's
`max_memory_allocated`, reported as the record's `peak_allocated_bytes`.

Why not the resident set (`peak_memory_bytes` on CPU is the max RSS): it counts the shared
libraries' pages, and glibc keeps freed heap memory for reuse, 110-160 MiB a rank in the
planner's measurement (docs/benchmarks.md), by an amount set by the order of allocations
rather than by what the layout holds. Torch keeps no CPU allocator statistics and glibc has
no allocation hook, so this reads glibc's `mallinfo2()` (bytes in allocated chunks of every
arena, `uordblks`, plus malloc's mmapped chunks, `hblkhd`; 7 us here) at the points where
a step's live memory peaks and keeps the maximum: before and after the forward of the model
(or this rank's stages), the head, every transformer block and each module inside it (so
also in activation checkpointing's recomputation, which stops inside the block's last
matmul once it has what backward needs: that matmul's pre-forward sample sees the rest);
when each of their outputs' gradients arrives in backward; and after each backward and
optimizer step (the trainer calls `sample`). A temporary that lives only inside one op is
not seen, nor are Python's small objects (pymalloc maps its own arenas) or memory a library
maps itself. Off glibc (no `mallinfo2`) `available` is False and the trainer reports -1.
The hooks cost about 1% of a forward and backward of the planner bench's model (8 blocks,
dim 256, 1024 tokens: 420 ms against 415 ms).
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo2():
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None
    fn.restype, fn.argtypes = _MallInfo2, []
    return fn


class HeapPeak:
    def __init__(self):
        self._read = _mallinfo2()
        self.peak = 0
        self._handles: list = []
        self.sample()

    @property
    def available(self) -> bool:
        return self._read is not None

    def in_use(self) -> int:
        info = self._read()
        return int(info.uordblks + info.hblkhd)

    def sample(self) -> None:
        if self._read is not None:
            self.peak = max(self.peak, self.in_use())

    def watch(self, model: nn.Module, *, inside_blocks: bool = True) -> None:
        """Sample around the forward (and at the output gradient) of every Transformer (the
        model, or this rank's pipeline stages) in `model`, its blocks, its head and, with
        `inside_blocks` (off under torch.compile, which compiles each block's forward
        whole), every module inside the blocks."""
        from .model import Block, Head, Transformer

        mods = []
        for m in model.modules():
            if isinstance(m, (Transformer, Head)):
                mods.append(m)
            elif isinstance(m, Block):
                mods += list(m.modules()) if inside_blocks else [m]
        for m in mods:
            self._handles.append(m.register_forward_pre_hook(self._before))
            self._handles.append(m.register_forward_hook(self._after))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _before(self, module, args) -> None:
        self.sample()

    def _after(self, module, args, output) -> None:
        self.sample()
        if isinstance(output, torch.Tensor) and output.requires_grad and torch.is_grad_enabled():
            output.register_hook(self._at_grad)

    def _at_grad(self, grad) -> None:
        self.sample()
