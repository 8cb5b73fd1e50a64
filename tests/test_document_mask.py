"""data.document_mask: attention block-diagonal over the EOS-delimited documents packed into a
sample, RoPE positions restarting at each document.

- model level (one process): a document's logits do not depend on another document's tokens,
  bit for bit on the torch path and within 1e-6 through the Triton kernels (CPU interpreter);
  they equal the document's logits on its own (positions restart); the Triton model step
  equals the torch one (loss, every gradient);
- through the real trainer on 4 gloo ranks: tp (sequence parallel) x dp_shard and pp x dp_shard give
  the single-process reference's losses, gradient norms and parameters (tests/equivalence.py)
  on a corpus of short documents, while the unmasked run differs from it.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from dist_train import kernels
from dist_train.model import ModelArgs, Transformer, init_weights
from tests.conftest import kernel_tol, sweep
from tests.equivalence import SGD, assert_run_matches, metric, rtol

EOS, VOCAB, SEQ = 0, 61, 40
LENGTHS = (11, 17, 12)  # documents of the packed row; each but the last ends with EOS


@pytest.fixture(autouse=True)
def _default_backend():
    yield
    kernels.set_default_backend("auto")


def _model() -> Transformer:
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, ffn_dim=48,
                              max_seq_len=SEQ))
    init_weights(m, seed=7)
    return m


def _packed(seed: int) -> torch.Tensor:
    """One row of three documents; only the first document's tokens depend on `seed`."""
    g1, g = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(99)
    docs = [torch.randint(1, VOCAB, (n,), generator=g1 if i == 0 else g) for i, n in enumerate(LENGTHS)]
    for d in docs[:-1]:
        d[-1] = EOS
    return torch.cat(docs)[None]


def _logits(m, tokens, masked: bool = True):
    docs = kernels.document_ids(tokens, EOS) if masked else None
    with torch.no_grad():
        return m.logits(m(tokens, docs=docs))


def _doc(i: int) -> slice:
    start = sum(LENGTHS[:i])
    return slice(start, start + LENGTHS[i])


def test_other_documents_do_not_change_a_documents_logits_torch():
    kernels.set_default_backend("torch")
    m = _model()
    a, b = _packed(1), _packed(2)
    assert not torch.equal(a[:, _doc(0)], b[:, _doc(0)]) and torch.equal(a[:, _doc(0).stop:], b[:, _doc(0).stop:])
    la, lb = _logits(m, a), _logits(m, b)
    for i in (1, 2):
        assert torch.equal(la[:, _doc(i)], lb[:, _doc(i)]), f"document {i}"
    # without the mask document 2 sees document 1 (so the check above can fail)
    assert not torch.allclose(_logits(m, a, False)[:, _doc(1)], _logits(m, b, False)[:, _doc(1)])


def test_positions_restart_at_each_document():
    """Document 2 packed after document 1 gives the logits of document 2 alone at position 0
    (different sequence lengths block the sums differently: fp32 bounds over the summed sizes)."""
    kernels.set_default_backend("torch")
    m = _model()
    tokens = _packed(1)
    packed = _logits(m, tokens)[:, _doc(1)]
    alone = _logits(m, tokens[:, _doc(1)], masked=False)
    scale = alone.abs().max().item()
    torch.testing.assert_close(packed, alone, **kernel_tol(torch.float32, k=32 + 48 + SEQ, scale=scale, roundings=0))
    # one document spanning the row is plain causal attention
    one = torch.randint(1, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(m, one), _logits(m, one, masked=False),
                               **kernel_tol(torch.float32, k=32 + 48 + SEQ, scale=scale, roundings=0))


@pytest.fixture
def _interpret(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels.set_default_backend("triton")


@pytest.mark.usefixtures("_interpret")
def test_other_documents_do_not_change_a_documents_logits_triton():
    m = _model()
    la, lb = _logits(m, _packed(1)), _logits(m, _packed(2))
    for i in (1, 2):
        assert (la[:, _doc(i)] - lb[:, _doc(i)]).abs().max().item() <= 1e-6, f"document {i}"


@pytest.mark.usefixtures("_interpret")
def test_masked_model_step_triton_equals_torch():
    """Loss and every parameter's gradient with document ids through the Triton kernels (the
    autograd wrapper's backward included) against the torch path; bounds as the unmasked
    model step's (tests/test_kernel_model.py)."""
    tokens = _packed(1)
    targets = torch.randint(0, VOCAB, tokens.shape, generator=torch.Generator().manual_seed(8))
    docs = kernels.document_ids(tokens, EOS)
    out = {}
    for backend in ("torch", "triton"):
        kernels.set_default_backend(backend)
        m = _model()
        loss = m(tokens, targets, docs=docs)
        out[backend] = loss.detach(), dict(zip([n for n, _ in m.named_parameters()],
                                               torch.autograd.grad(loss, list(m.parameters()))))
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-6)
    for name, g in out["torch"][1].items():
        torch.testing.assert_close(out["triton"][1][name], g, rtol=1e-4, atol=1e-6, msg=lambda s, n=name: f"{n}: {s}")


# ----------------------------------------------------------------------------- through the trainer

STEPS, GB = 3, 8
TOKENS = GB * 128  # per step: global batch x seq_len (configs/tiny.toml)
LAYOUTS = {  # name: (ranks, overrides)
    "tp2_dps2": (4, {"parallel.tp": 2, "parallel.dp_shard": 2}),
    "pp2_dps2": (4, {"parallel.pp": 2, "parallel.dp_shard": 2, "parallel.pp_schedule": "1f1b"}),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A jsonl corpus of short documents (about 4 per 129-token sample), the single-process
    reference with and without the mask, and every layout in one 4-rank launch."""
    root = tmp_path_factory.mktemp("docmask")
    rng = random.Random(0)
    words = ["def", "return", "x", "yield", "import", "class", "self", "None", "for", "in", "if", "=", "+"]
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(400):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))}) + "\n")
    common = {"data.source": f"jsonl:{root / 'docs.jsonl'}", "data.document_mask": "true", "data.verify": "off",
              "train.global_batch": GB, "train.steps": STEPS, "checkpoint.every": STEPS, **SGD}
    sweep(root, 1, {"ref": {}, "unmasked": {"data.document_mask": "false"}}, common)
    sweep(root, 4, {name: sets for name, (_, sets) in LAYOUTS.items()}, common)
    return root


def test_reference_packs_several_documents_and_the_mask_matters(root):
    from dist_train.data import TokenDataset, ensure_prepared
    from tests.equivalence import read_config

    cfg = read_config(root / "ref")
    data = TokenDataset(ensure_prepared(cfg.data.source, cfg.data.cache_dir or None, cfg.data.tokenizer),
                        cfg.data.seq_len, cfg.data.tokenizer)
    x, _ = data.batch(range(8))
    assert (x == data.eos_id).sum(1).min().item() >= 2  # every sample holds 3 or more documents
    masked, plain = metric(root / "ref", "loss", STEPS), metric(root / "unmasked", "loss", STEPS)
    assert masked[0] != plain[0] and abs(masked[-1] - plain[-1]) > rtol(TOKENS, 4.0) * abs(plain[-1])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_masked_layout_matches_single_process(root, name):
    assert_run_matches(root / name, root / "ref", STEPS, TOKENS)
