"""A model step through the Triton kernels (CPU interpreter) equals the torch path:
same loss, same gradient for every parameter."""
import pytest
import torch

from dist_train import kernels
from dist_train.model import ModelArgs, Transformer, init_weights

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("triton_interpret")  # kernels run in the CPU interpreter


@pytest.fixture(autouse=True)
def _default_backend():
    """The tests switch the process-wide default backend; put it back for later modules."""
    yield
    kernels.set_default_backend("auto")


def _step(backend: str, tokens, targets):
    kernels.set_default_backend(backend)
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, ffn_dim=48,
                              max_seq_len=19))
    init_weights(m, seed=5)
    loss = m(tokens, targets)
    return loss.detach(), dict(zip([n for n, _ in m.named_parameters()],
                                   torch.autograd.grad(loss, list(m.parameters()))))


def test_model_step_triton_equals_torch():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 61, (2, 19), generator=gen)
    targets = torch.randint(0, 61, (2, 19), generator=gen)
    loss_t, grads_t = _step("torch", tokens, targets)
    loss_k, grads_k = _step("triton", tokens, targets)
    import importlib

    from dist_train.kernels import dispatch

    for name in ("attention", "cross_entropy", "rms_norm", "rope", "swiglu"):  # the step really ran Triton
        op = importlib.import_module(f"dist_train.kernels.{name}")
        assert dispatch.resolve(None, "cpu", op.IMPLEMENTED) == "triton", name
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-6)
    for name, g in grads_t.items():
        torch.testing.assert_close(grads_k[name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
