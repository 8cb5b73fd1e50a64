"""dist_train.data: tokenizers, token shards, datasets and the distributed sampler.

The trainer calls `ensure_prepared` for `data.source` (data/sources.py: shard folders, the
bundled corpus, Megatron .bin/.idx pairs, parquet/jsonl globs), builds a `TokenDataset` on the
result and draws each step's micro-batches from a `DistributedBatchSampler` (with `data.mix`,
a `MixtureDataset` over every source and a `MixtureSampler`: data/mixture.py); the CLI's
`dist-train prepare` calls `prepare_command`.
"""

from .corpus import DEFAULT_MAX_BYTES, iter_bundled_documents, iter_bundled_files
from .dataset import TokenDataset, collate
from .documents import expand_inputs, iter_documents
from .errors import DataError
from .megatron import MegatronTokens, MegatronWriter, megatron_dtype
from .mixture import MixtureDataset, MixtureSampler, prepare_sources
from .prepare import (PrepareResult, default_cache_dir, ensure_prepared, prepare,
                      prepare_bundled, prepare_command)
from .sampler import DistributedBatchSampler, epoch_permutation
from .sources import open_tokens, source_vocab_size
from .shards import (INDEX_NAME, BackgroundVerifier, ShardIndex, ShardInfo, TokenShards, read_index, read_shard,
                     token_dtype, verify_shard, verify_shards, write_index, write_shard)
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer, tokenizer_fingerprint
from .writer import DEFAULT_SHARD_TOKENS, ShardWriter

__all__ = [
    "DEFAULT_MAX_BYTES", "DEFAULT_SHARD_TOKENS", "INDEX_NAME", "BackgroundVerifier", "ByteTokenizer", "DataError",
    "DistributedBatchSampler", "HFTokenizer", "MegatronTokens", "MixtureDataset", "MixtureSampler", "prepare_sources", "MegatronWriter", "PrepareResult", "ShardIndex", "ShardInfo",
    "ShardWriter", "TokenDataset", "TokenShards", "Tokenizer", "collate", "default_cache_dir",
    "ensure_prepared", "epoch_permutation", "expand_inputs", "iter_bundled_documents",
    "iter_bundled_files", "iter_documents", "load_tokenizer", "megatron_dtype", "open_tokens", "prepare",
    "prepare_bundled", "source_vocab_size",
    "prepare_command", "read_index", "read_shard", "token_dtype", "tokenizer_fingerprint",
    "verify_shard", "verify_shards", "write_index", "write_shard",
]
