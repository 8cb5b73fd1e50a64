"""The one table of parameter names and layouts: dist-train <-> HF Llama (and Mixtral).

Every tensor keeps its layout: torch `nn.Linear` weights are [out, in] on both sides, so
nothing is transposed, and nothing is permuted:

| dist-train                              | HF (`LlamaForCausalLM`)                        | shape                           |
|-----------------------------------------|------------------------------------------------|---------------------------------|
| tok_embeddings.weight                   | model.embed_tokens.weight                      | [vocab, dim]                    |
| layers.{i}.attention_norm.weight        | model.layers.{i}.input_layernorm.weight        | [dim]                           |
| layers.{i}.attention.wq.weight          | model.layers.{i}.self_attn.q_proj.weight       | [heads x head_dim, dim]         |
| layers.{i}.attention.wk.weight          | model.layers.{i}.self_attn.k_proj.weight       | [kv_heads x head_dim, dim]      |
| layers.{i}.attention.wv.weight          | model.layers.{i}.self_attn.v_proj.weight       | [kv_heads x head_dim, dim]      |
| layers.{i}.attention.wo.weight          | model.layers.{i}.self_attn.o_proj.weight       | [dim, heads x head_dim]         |
| layers.{i}.ffn_norm.weight              | model.layers.{i}.post_attention_layernorm.weight | [dim]                         |
| layers.{i}.feed_forward.w1.weight       | model.layers.{i}.mlp.gate_proj.weight          | [ffn, dim]                      |
| layers.{i}.feed_forward.w3.weight       | model.layers.{i}.mlp.up_proj.weight            | [ffn, dim]                      |
| layers.{i}.feed_forward.w2.weight       | model.layers.{i}.mlp.down_proj.weight          | [dim, ffn]                      |
| norm.weight                             | model.norm.weight                              | [dim]                           |
| output.weight (untied head only)        | lm_head.weight                                 | [vocab, dim]                    |

- q/k: kernels/rope.py rotates halves (element j with j + head_dim/2) as transformers'
  Llama does, so HF's q_proj/k_proj rows load as they are. Meta's original checkpoints and
  TorchTitan interleave pairs (2j, 2j+1) and need a permutation; applying one here would
  be wrong (tests/test_interop_hf.py shows the logits then differ).
- Grouped-query heads: query head h reads kv head h // (heads / kv_heads) on both sides
  (our attention repeat_interleaves kv heads, transformers' repeat_kv does the same).
- Tied head (`tie_embeddings`, HF `tie_word_embeddings`): there is no output.weight;
  save_pretrained leaves lm_head.weight out (if a file has it anyway, it is not read).

MoE blocks export as Mixtral (`MixtralForCausalLM`), whose files keep one tensor per
expert (transformers 5 fuses them when it loads):

| dist-train                              | HF (`MixtralForCausalLM`)                                  | shape          |
|-----------------------------------------|------------------------------------------------------------|----------------|
| layers.{i}.feed_forward.router.weight   | model.layers.{i}.block_sparse_moe.gate.weight              | [experts, dim] |
| layers.{i}.feed_forward.experts.w1[e]   | model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight    | [ffn, dim]     |
| layers.{i}.feed_forward.experts.w3[e]   | model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight    | [ffn, dim]     |
| layers.{i}.feed_forward.experts.w2[e]   | model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight    | [dim, ffn]     |

(attention, norms, embedding and head as for Llama).
"""
from __future__ import annotations

TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
MOE_BLOCK = {
    "feed_forward.router.weight": "block_sparse_moe.gate.weight",
}
EXPERTS = {  # stacked [experts, ...] here, one tensor per expert there
    "feed_forward.experts.w1": "block_sparse_moe.experts.{e}.w1.weight",
    "feed_forward.experts.w3": "block_sparse_moe.experts.{e}.w3.weight",
    "feed_forward.experts.w2": "block_sparse_moe.experts.{e}.w2.weight",
}
# tensors some HF files hold that carry no weights of ours (old Llama files saved RoPE's buffer)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def split_block(name: str) -> tuple[int, str] | None:
    """("layers.3.attention.wq.weight") -> (3, "attention.wq.weight"); None off the blocks."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None


def to_hf(name: str, n_experts: int = 0) -> list[tuple[str, int | None]]:
    """HF tensor name(s) of one dist-train parameter: [(hf_name, None)] for a tensor kept
    whole, or [(hf_name_e, e) for each expert e] for a stacked expert tensor (slice e of
    dim 0). KeyError for a name with no HF counterpart."""
    if name in TOP:
        return [(TOP[name], None)]
    block = split_block(name)
    if block is None:
        raise KeyError(name)
    i, rest = block
    prefix = f"model.layers.{i}."
    if rest in BLOCK:
        return [(prefix + BLOCK[rest], None)]
    if rest in MOE_BLOCK:
        return [(prefix + MOE_BLOCK[rest], None)]
    if rest in EXPERTS:
        return [(prefix + EXPERTS[rest].format(e=e), e) for e in range(n_experts)]
    raise KeyError(name)
