"""Backend choice for the kernel ops: Triton where it can run, plain torch elsewhere.

Each op module registers its implementations by backend name; `resolve` turns the
caller's request (None = the configured default, from `[kernels] backend`) into the
backend that will run. "auto" picks Triton on CUDA or under TRITON_INTERPRET=1 (the
interpreter runs kernels on CPU tensors, used by the tests) and torch elsewhere, and
torch inside a region torch.compile traces (a compiled block).
Asking for "triton" where it cannot run is an error, never a silent fallback.

TRITON_INTERPRET is read when an op is called (here) and when its kernel is launched
(`_triton.kernel`), so setting it around a few calls — a test fixture — is enough, whenever
triton itself was imported. The one combination that cannot work is the reverse: compiled
kernels after triton was imported with TRITON_INTERPRET=1 (its library is then wrapped for
the interpreter); `triton_runnable` reports that instead of letting a launch fail.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys

BACKENDS = ("auto", "torch", "triton")


class KernelBackendError(RuntimeError):
    """A kernel backend was asked for where it cannot run."""


_default = "auto"  # the process's configured default; a setting, not state of any group


def set_default_backend(name: str) -> None:
    """Set the backend used when an op is called with backend=None (`[kernels] backend`)."""
    global _default
    if name not in BACKENDS:
        raise KernelBackendError(
            f"kernels.backend = {name!r} is not a backend; use one of {', '.join(BACKENDS)}"
        )
    if name == "triton":
        _require_triton()
    _default = name


def default_backend() -> str:
    return _default


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_library_mode() -> str | None:
    """How the imported triton wrapped its own library functions (`tl.sum`, ...): "interpret"
    when TRITON_INTERPRET=1 was set at `import triton`, "compile" otherwise, None when triton
    has not been imported yet."""
    standard = sys.modules.get("triton.language.standard")
    if standard is None:
        return None
    kind = type(getattr(standard, "sum", None)).__name__
    return {"InterpretedFunction": "interpret", "JITFunction": "compile"}.get(kind)


def triton_runnable(device_type: str | None = None) -> bool:
    """Triton compiles for CUDA devices; its interpreter runs on CPU tensors."""
    if not triton_installed():
        return False
    if interpreting():
        return True
    if triton_library_mode() == "interpret":  # imported under TRITON_INTERPRET=1, now unset
        return False
    import torch

    if device_type is None:
        return torch.cuda.is_available()
    return device_type == "cuda"


def _require_triton(device_type: str | None = None) -> None:
    if not triton_installed():
        raise KernelBackendError(
            "kernels.backend = 'triton' but the triton package is not installed; "
            "install the extra (pip install 'dist-train[triton]') or set kernels.backend = 'auto'"
        )
    if not triton_runnable(device_type):
        if triton_library_mode() == "interpret" and device_type != "cpu":
            raise KernelBackendError(
                "kernels.backend = 'triton': triton was imported with TRITON_INTERPRET=1 and the "
                "variable is unset now; compiled kernels need triton imported without it"
            )
        where = device_type or "this machine"
        raise KernelBackendError(
            f"kernels.backend = 'triton' cannot run on {where}: Triton needs a CUDA device "
            "(or TRITON_INTERPRET=1 for the CPU interpreter); set kernels.backend = 'auto' or 'torch'"
        )


def resolve(backend: str | None, device_type: str, implemented: tuple[str, ...]) -> str:
    """The backend that runs an op on `device_type`, given the op's implementations."""
    name = _default if backend is None else backend
    if name not in BACKENDS:
        raise KernelBackendError(f"backend={name!r} is not one of {', '.join(BACKENDS)}")
    if name == "torch":
        return "torch"
    if name == "triton":
        _require_triton(device_type)
        if "triton" not in implemented:
            raise KernelBackendError("this op has no Triton kernel yet; use backend='torch'")
        return "triton"
    if "triton" in implemented and not _compiling() and triton_runnable(device_type):
        return "triton"
    return "torch"


def _compiling() -> bool:
    """Inside a region torch.compile traces (`train.compile`): "auto" takes the torch
    implementation there, which the compiler fuses into kernels of its own; the Triton
    kernels run in eager code."""
    import torch

    return torch.compiler.is_compiling()
