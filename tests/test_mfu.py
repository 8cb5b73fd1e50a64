"""MFU: the peak-FLOPs table by device name and dtype, n/a off it, and the value by hand."""
from __future__ import annotations

import pytest
import torch

from dist_train.mfu import mfu, peak_flops
from dist_train.model import ModelArgs, flops_per_token


def test_peak_table_by_device_name_and_dtype():
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4e12
    assert peak_flops("NVIDIA H200", torch.bfloat16) == 989.4e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) == 156e12
    assert peak_flops("NVIDIA B200", torch.bfloat16) == 2250e12
    assert peak_flops(None, torch.bfloat16) is None  # a CPU
    assert peak_flops("NVIDIA GeForce RTX 4090", torch.bfloat16) is None  # not in the table: n/a
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.float16) is None
    assert mfu(1e5, 1e9, 8, None) is None


def test_mfu_equals_the_hand_computed_value():
    """A dense Llama shape at seq 2048 on 8 H100s at 30k tokens/s: 6 x matmul parameters plus
    12 x layers x dim x seq per token, over 8 x 989.4 TFLOP/s."""
    a = ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim=8192, max_seq_len=2048)
    head_dim = 64
    per_layer = 2 * 2048 * 32 * head_dim + 2 * 2048 * 8 * head_dim + 3 * 2048 * 8192  # q,o + k,v + gate,up,down
    matmul = 16 * per_layer + 128256 * 2048  # the output head is a matmul; the embedding lookup is not
    by_hand = 6 * matmul + 12 * 16 * 2048 * 2048
    assert flops_per_token(a, 2048) == by_hand
    peak = peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16)
    assert mfu(30_000, flops_per_token(a, 2048), 8, peak) == pytest.approx(30_000 * by_hand / (8 * 989.4e12), rel=1e-12)
