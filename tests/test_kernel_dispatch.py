"""Backend resolution: torch on a CPU without the interpreter, Triton under it (whenever triton
was imported), errors rather than silent fallbacks."""
import pytest
import torch

from dist_train.kernels import KernelBackendError, rms_norm
from dist_train.kernels.dispatch import resolve, triton_runnable

BOTH = ("torch", "triton")


def test_cpu_without_interpreter_uses_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve("auto", "cpu", BOTH) == "torch"
    assert resolve("torch", "cpu", BOTH) == "torch"
    assert resolve("auto", "cpu", ("torch",)) == "torch"
    with pytest.raises(KernelBackendError):
        resolve("triton", "cpu", BOTH)
    with pytest.raises(KernelBackendError):
        resolve("fast", "cpu", BOTH)


def test_interpreter_toggled_at_call_time(monkeypatch):
    """TRITON_INTERPRET is read per call: a fixture can scope it, whenever triton was imported
    (here it already is, for the compiler: `torch.compile` or pipelining may import it first)."""
    pytest.importorskip("triton")
    x, w = torch.randn(3, 8), torch.rand(8)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_runnable("cpu") and resolve("auto", "cpu", BOTH) == "triton"
    with pytest.raises(KernelBackendError):
        resolve("triton", "cpu", ("torch",))  # an op without a kernel
    torch.testing.assert_close(rms_norm(x, w, backend="auto"), rms_norm(x, w, backend="torch"))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_runnable("cpu") and resolve("auto", "cpu", BOTH) == "torch"


def test_auto_takes_torch_inside_a_compiled_region(monkeypatch):
    """train.compile: inside a block torch.compile traces, "auto" resolves to the torch
    implementation even where Triton could run; outside it, to Triton as before."""
    from dist_train.kernels import dispatch

    monkeypatch.setattr(dispatch, "triton_runnable", lambda device_type=None: True)

    @torch.compile(backend="eager", fullgraph=True)
    def traced(x):
        return x + (1.0 if dispatch.resolve("auto", "cuda", ("torch", "triton")) == "torch" else 2.0)

    assert traced(torch.zeros(1)).item() == 1.0
    assert dispatch.resolve("auto", "cuda", ("torch", "triton")) == "triton"
