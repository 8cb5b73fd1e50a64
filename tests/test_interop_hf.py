"""HF import (`model.init_from = "hf:PATH"`): a random-initialised tiny LlamaForCausalLM
(untied head with Llama 3 RoPE scaling, tied head; grouped-query heads) gives the same
logits in dist-train as in transformers, on 1 rank (in this process) and under
tp = 2 x dp_shard = 2 and pp = 2 x dp_shard = 2 (one 4-rank launch; a tied head is
refused with pipelines); q/k loaded with Meta's rotary permutation by mistake fail the
same bound by orders of magnitude; config.json keys dist-train cannot represent, files
that do not match their config.json and fields that contradict it end in one line.

Bound (tests/equivalence.py's convention): the logits are c x eps32 x sqrt(n) of their
largest entry apart, n the longest reduction in front of them (the MLP's ffn_dim), c = 16
as for anything that passes through every layer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_cli
from tests.equivalence import C_GRAD, rtol

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from dist_train.config import load_config  # noqa: E402
from dist_train.errors import UserError  # noqa: E402
from dist_train.interop.hf_import import load_hf_weights  # noqa: E402
from dist_train.model import ModelArgs, Transformer, init_weights  # noqa: E402

SEQ = 32
SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
MODELS = {  # name: (tied, rope_parameters, max_shard_size: sharded files with an index, or one file)
    "untied": (False, LLAMA3, "40KB"),
    "tied": (True, None, None),
}
BOUND_N = SHAPE["intermediate_size"]


def save_hf(folder: Path, tied: bool, rope: dict | None, shard: str | None, seed: int = 0):
    torch.manual_seed(seed)
    kw = dict(SHAPE, tie_word_embeddings=tied, **({"rope_parameters": rope} if rope else {}))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: (root / name, save_hf(root / name, *spec)) for name, spec in MODELS.items()}


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def assert_logits_close(got, ref, what):
    # the equivalence bound, and never looser than issue 19's 1e-5 (fp32)
    bound = min(rtol(BOUND_N, C_GRAD) * ref.abs().max().item(), 1e-5)
    err = (got - ref).abs().max().item()
    print(f"{what}: logits within {err:.2e} (bound {bound:.2e})")
    assert err <= bound, f"{what}: logits differ by {err:.3e}, more than {bound:.3e}"
    return err, bound


def ours_one_rank(folder: Path, seq: int = SEQ):
    cfg = load_config(None, [f"model.init_from=hf:{folder}", f"data.seq_len={seq}"])
    args = ModelArgs.from_config(cfg.model, seq, 258)
    model = Transformer(args)
    init_weights(model, 0)
    load_hf_weights(model, cfg.model.init_from, args)
    return model


def ours_logits(model, tokens):
    with torch.no_grad():
        return model.logits(model(tokens))


def tokens(rows=2, vocab=SHAPE["vocab_size"]):
    return torch.randint(0, vocab, (rows, SEQ), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", list(MODELS))
def test_one_rank_logits_match_transformers(hf, name):
    folder, ref_model = hf[name]
    x = tokens()
    assert_logits_close(ours_logits(ours_one_rank(folder), x), hf_logits(ref_model, x), name)


def test_config_fields_come_from_config_json(hf):
    folder, _ = hf["untied"]
    m = load_config(None, [f"model.init_from=hf:{folder}"]).model
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim, m.vocab_size) == (64, 4, 4, 2, 160, 320)
    assert (m.rope_scaling, m.rope_theta, m.rope_factor, m.rope_original_max_len) == ("llama3", 500000.0, 8.0, 16)
    assert m.norm_eps == 1e-6 and m.tie_embeddings is False  # HF's default eps, not dist-train's 1e-5


def test_llama3_rope_frequencies_match_transformers():
    """kernels/rope.py's Llama3Scaling against transformers' own llama3 init, at Llama 3.2's
    parameters and head size: the same inverse frequencies to the last bit here, and within
    one ulp anywhere (their arithmetic is written in the same order)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from dist_train.kernels import Llama3Scaling

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_parameters=rope,
                                   max_position_embeddings=131072)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    head_dim = 64
    base = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    got = Llama3Scaling(32.0, 1.0, 4.0, 8192).apply(base)
    torch.testing.assert_close(got, ref, rtol=torch.finfo(torch.float32).eps, atol=0)
    assert not torch.equal(got, base)  # the scaling does something at these parameters


def _rotary_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta -> HF's q/k row permutation (interleaved pairs to halves): what an importer that
    assumed an interleaved RoPE would apply."""
    out, dim = w.shape
    return w.view(heads, 2, out // heads // 2, dim).transpose(1, 2).reshape(out, dim)


def test_qk_permuted_by_mistake_fails_the_bound(hf):
    folder, ref_model = hf["untied"]
    model = ours_one_rank(folder)
    with torch.no_grad():
        for block in model.layers.values():
            block.attention.wq.weight.copy_(_rotary_permute(block.attention.wq.weight, SHAPE["num_attention_heads"]))
            block.attention.wk.weight.copy_(_rotary_permute(block.attention.wk.weight, SHAPE["num_key_value_heads"]))
    x = tokens()
    ref = hf_logits(ref_model, x)
    err = (ours_logits(model, x) - ref).abs().max().item()
    # the equivalence bound, and never looser than issue 19's 1e-5 (fp32)
    bound = min(rtol(BOUND_N, C_GRAD) * ref.abs().max().item(), 1e-5)
    print(f"permuted q/k: {err:.2e} off (bound {bound:.2e})")
    assert err > 100 * bound, f"permuted q/k gave logits only {err:.3e} off (bound {bound:.3e}): the test cannot fail"


# ----------------------------------------------------------------------------- layouts

LAYOUT_RUNS = {  # run name: (model, overrides)
    "untied_tp2_dps2": ("untied", {"parallel.tp": 2, "parallel.dp_shard": 2}),
    "tied_tp2_dps2": ("tied", {"parallel.tp": 2, "parallel.dp_shard": 2}),
    "untied_pp2_dps2": ("untied", {"parallel.pp": 2, "parallel.dp_shard": 2, "parallel.pp_schedule": "1f1b"}),
}


@pytest.fixture(scope="module")
def layouts(hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    runs = []
    for name, (model, sets) in LAYOUT_RUNS.items():
        base = {"run.name": name, "run.dir": str(out / "runs"), "model.init_from": f"hf:{hf[model][0]}",
                "data.seq_len": SEQ, "train.global_batch": 8, "train.micro_batch": 2, "metrics.progress": "false",
                "data.verify": "off"}
        runs.append([f"{k}={v}" for k, v in {**base, **sets}.items()])
    spec = out / "runs.json"
    spec.write_text(json.dumps(runs))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                           str(REPO / "tests" / "interop_logits_worker.py"), str(out), str(spec)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out


@pytest.mark.parametrize("run", list(LAYOUT_RUNS))
def test_layout_logits_match_transformers(hf, layouts, run):
    saved = torch.load(layouts / f"{run}.pt")
    _, ref_model = hf[LAYOUT_RUNS[run][0]]
    assert_logits_close(saved["logits"], hf_logits(ref_model, saved["tokens"]), run)


# ----------------------------------------------------------------------------- refusals


def _edited_copy(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("change, words", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, ["model_type = 'mistral'", "not a Llama"]),
    ({"rope_parameters": {"rope_type": "yarn"}}, ["rope_parameters.rope_type = 'yarn'"]),
    ({"attention_bias": True}, ["attention_bias = True", "no bias"]),
    ({"head_dim": 32}, ["head_dim = 32", "16"]),
    ({"hidden_act": "gelu"}, ["hidden_act = 'gelu'"]),
    ({"partial_rotary_factor": 0.5}, ["partial_rotary_factor = 0.5"]),
])
def test_unrepresentable_config_is_one_line_naming_the_key(hf, tmp_path, change, words):
    folder = _edited_copy(hf["untied"][0], tmp_path / "edited", **change)
    with pytest.raises(UserError) as e:
        load_config(None, [f"model.init_from=hf:{folder}"])
    for w in words:
        assert w in str(e.value), str(e.value)


def test_cli_refuses_in_one_line(hf, tmp_path):
    folder = _edited_copy(hf["untied"][0], tmp_path / "edited", rope_parameters={"rope_type": "dynamic"})
    proc = run_cli("train", "--set", f"model.init_from=hf:{folder}", check=False, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dist-train: error: ") and "rope_type = 'dynamic'" in lines[0]


def test_field_contradicting_config_json_is_refused(hf):
    with pytest.raises(UserError, match=r"model.dim = 128 conflicts with model.init_from.*hidden_size = 64"):
        load_config(None, [f"model.init_from=hf:{hf['untied'][0]}", "model.dim=128"])


def test_vocabulary_is_the_config_json_one_exactly(hf):
    """No padding to a multiple of 64 with init_from; data with more ids is refused."""
    from dist_train.layout import check_layout

    cfg = load_config(None, [f"model.init_from=hf:{hf['untied'][0]}"])
    assert ModelArgs.from_config(cfg.model, SEQ, 258).vocab_size == 320
    with pytest.raises(UserError, match=r"model.vocab_size = 320 .* smaller than the data's vocabulary of 1000"):
        check_layout(cfg, 1, 1, tokenizer_vocab=1000)


def test_files_that_do_not_match_config_json(hf, tmp_path):
    from safetensors.torch import load_file, save_file

    from dist_train.interop import InteropError

    src, _ = hf["tied"]
    cases = {
        "missing": lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"),
        "shape": lambda sd: sd.update({"model.norm.weight": torch.ones(65)}),
        "bias": lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
    }
    words = {"missing": "no *.safetensors file holds 'model.layers.1.mlp.up_proj.weight'",
             "shape": "model.norm.weight has shape [65]", "bias": "holds 'model.layers.0.self_attn.q_proj.bias'"}
    for case, edit in cases.items():
        folder = _edited_copy(src, tmp_path / case)
        sd = load_file(folder / "model.safetensors")
        edit(sd)
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(InteropError, match=words[case].replace("[", r"\[").replace("*", r"\*")):
            ours_one_rank(folder)
