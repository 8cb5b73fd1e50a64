"""Triton plumbing shared by the kernel files: a lazy import and launch-time jit.

Two facts of triton 3.x shape this file:
- `triton.jit` decides between the compiler and the CPU interpreter when it wraps a function,
  from TRITON_INTERPRET as it is at that moment;
- triton's own library functions (`tl.sum`, `tl.max`, `tl.zeros`, ...) are wrapped the same
  way once, when `triton` is first imported.
Decorating our kernels at import time would tie them to the environment at the moment
`dist_train.kernels` was imported. `kernel` instead wraps the plain function at its first
launch (once per mode), and triton itself is imported only then — so importing
`dist_train.kernels` never imports triton.

If triton was imported for the compiler (TRITON_INTERPRET unset; `torch.compile` and
`torch.distributed.pipelining` import it, for instance) and a kernel is then run in the
interpreter, its library functions would refuse to run ("Cannot call @triton.jit'd outside of
the scope of a kernel"). Kernels therefore see `tl` through `_InterpreterLanguage`, which hands
out interpreter-wrapped copies of those functions and everything else unchanged. Nothing of
triton's own state is modified, so compiled kernels in the same process are unaffected.

Kernel functions refer to `tl` as a module global; it is bound in the kernel's module at each
launch, to `triton.language` (or the view above). Kernels may not call other jit functions
of ours (they are not registered with triton under their names): each kernel is
self-contained.
"""
from __future__ import annotations

from .dispatch import interpreting, triton_library_mode


class _InterpreterLanguage:
    """`triton.language` for kernels run by the interpreter when triton's library functions
    were wrapped for the compiler: those are re-wrapped for the interpreter."""

    def __init__(self, language):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        self._language = language
        self._jit_type = JITFunction
        self._interpreted = InterpretedFunction
        self._cache = {}

    def __getattr__(self, name):
        value = getattr(self._language, name)  # looked up each time: the interpreter patches builtins
        if isinstance(value, self._jit_type):
            wrapped = self._cache.get(name)
            if wrapped is None:
                wrapped = self._cache[name] = self._interpreted(value.fn)
            return wrapped
        return value


_shim = None


def _language(interpret: bool):
    global _shim
    import triton.language

    if interpret and triton_library_mode() == "compile":
        if _shim is None:
            _shim = _InterpreterLanguage(triton.language)
        return _shim
    return triton.language


class LazyKernel:
    """A kernel function wrapped by `triton.jit` at first launch, once per interpreter mode."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._wrapped = {}

    def jitted(self):
        mode = interpreting()
        g = self.fn.__globals__
        g["tl"] = _language(mode)
        if mode:  # the interpreter wants the real module visible in the kernel's globals
            import triton.language

            g["_triton_language"] = triton.language
        fn = self._wrapped.get(mode)
        if fn is None:
            import triton

            fn = self._wrapped[mode] = triton.jit(self.fn)
        return fn

    def __getitem__(self, grid):
        return self.jitted()[grid]


def kernel(fn) -> LazyKernel:
    return LazyKernel(fn)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_warps_for(block_elements: int) -> int:
    """Warps for a one-tile-per-program kernel: more threads for wider tiles (about 16-32
    fp32 values per thread). A starting point, not tuned on hardware."""
    if block_elements <= 2048:
        return 4
    if block_elements <= 8192:
        return 8
    return 16
