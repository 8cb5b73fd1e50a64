"""dist_train.interop: Hugging Face checkpoints in and out.

- `hf_config`: a transformers `config.json` <-> the `[model]` fields (what can be
  represented, and one line naming the key for what cannot);
- `hf_names`: the one table of parameter names and layouts (dist-train <-> HF Llama and
  Mixtral);
- `hf_import`: `model.init_from = "hf:PATH"`, loading safetensors into any layout, each
  rank reading only the slices its shards hold;
- `safetensors_stream`: a safetensors writer that takes one tensor at a time;
- `export`: `dist-train export RUN_DIR --format hf|torch`, a DCP checkpoint of any layout
  to config.json + safetensors (or one torch file), one tensor in memory at a time.
"""
from .errors import InteropError

__all__ = ["InteropError"]
