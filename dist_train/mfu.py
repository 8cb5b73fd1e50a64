"""Model FLOPs utilisation: achieved training FLOPs over the devices' peak.

MFU = tokens/s x training FLOPs per token (model.flops_per_token: 6 x the matmul
parameters a token passes through, MoE counting its routed experts only, plus causal
attention) / (ranks x the peak FLOP/s of one device in the compute dtype).

The peak table holds dense (no sparsity) tensor-core figures from NVIDIA's datasheets, in
TFLOP/s; fp32 means TF32 tensor-core math where the datasheet gives it, since that is what
fp32 matmuls run as with TF32 enabled, else plain FP32. A device or dtype not in the table
(any CPU) has no MFU: `n/a`, never an estimate.
"""
from __future__ import annotations

import torch

# (name fragment as torch.cuda.get_device_name reports it, dtype) -> dense TFLOP/s
PEAK_TFLOPS = {
    # A100 SXM4 80GB datasheet: BF16 312, TF32 156
    ("A100", torch.bfloat16): 312.0, ("A100", torch.float32): 156.0,
    # H100 SXM5 datasheet: BF16 989.4 (1979 with sparsity), TF32 494.7
    ("H100", torch.bfloat16): 989.4, ("H100", torch.float32): 494.7,
    # H200 SXM datasheet: the H100's compute (BF16 989, TF32 494.7), more and faster memory
    ("H200", torch.bfloat16): 989.4, ("H200", torch.float32): 494.7,
    # B200 (HGX B200 datasheet, per GPU): BF16 2250 dense (4500 with sparsity), TF32 1100 dense
    ("B200", torch.bfloat16): 2250.0, ("B200", torch.float32): 1100.0,
}


def peak_flops(device_name: str | None, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one device named `device_name` in `dtype`, or None if not in the table."""
    if not device_name:
        return None
    for (fragment, kind), tflops in PEAK_TFLOPS.items():
        if fragment in device_name and kind == dtype:
            return tflops * 1e12
    return None


def device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def mfu(tokens_per_s: float, flops_per_token: float, ranks: int, peak: float | None) -> float | None:
    """The fraction of `ranks` devices' peak the step achieved; None without a peak."""
    if peak is None or ranks < 1:
        return None
    return tokens_per_s * flops_per_token / (ranks * peak)
