"""Every Triton kernel compiles for a CUDA GPU (sm_90), with the argument types and
constexprs the wrappers really pass — checked on a machine without a GPU.

The interpreter tests run the kernels' logic on the CPU but are laxer than the compiler
(types of loop-carried values, `tl.dot` shapes, constexpr branches) and never see the GPU
code path (bf16 operands fed to `tl.dot` as they are). This test runs, in a subprocess with
TRITON_INTERPRET unset, each op's forward and backward with kernel launches replaced by
`triton.compile(...)` for `GPUTarget("cuda", 90, 32)` (through PTX to a cubin with the
bundled ptxas). Outputs are never computed there; only compilation is checked.
"""
import os
import subprocess
import sys
import time

import pytest
import torch

CHECKS = ["rms_norm", "swiglu", "rope", "attention", "cross_entropy", "moe", "quantize"]
KERNELS = {  # every Triton kernel of every op file
    "rms_norm": {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"},
    "swiglu": {"_swiglu_fwd_kernel", "_swiglu_bwd_kernel"},
    "rope": {"_rope_kernel"},
    "attention": {"_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"},
    "cross_entropy": {"_ce_stats_kernel", "_ce_grad_kernel"},
    "moe": {"_moe_scatter_kernel", "_moe_gather_sum_kernel"},
    "quantize": {"_quantize_kernel", "_dequantize_kernel"},
}


def test_kernel_list_is_every_kernel_in_the_op_files():
    """KERNELS names each @kernel of each file of the package, so a new kernel or op file fails
    here until the compile check covers it."""
    import importlib
    import pkgutil

    from dist_train import kernels
    from dist_train.kernels._triton import LazyKernel

    assert set(KERNELS) == set(CHECKS)
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"dist_train.kernels.{info.name}")
        found = {name for name, value in vars(module).items() if isinstance(value, LazyKernel)}
        assert found == KERNELS.get(info.name, set()), info.name


def test_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    compiled = [line for line in proc.stdout.splitlines() if line.startswith("compiled ")]
    names = {line.split()[1] for line in compiled}
    assert names == set().union(*KERNELS.values()), proc.stdout  # every kernel of every op file
    print("\n".join(compiled))


# ----------------------------------------------------------------------------- subprocess side

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32", torch.int8: "i8", torch.bool: "i1"}


def _install_compiler():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dist_train.kernels import _triton, dispatch

    dispatch.triton_runnable = lambda device_type=None: True  # resolve() lets "triton" through on CPU
    target = GPUTarget("cuda", 90, 32)
    seen = set()

    def launcher(self, grid):
        def launch(*args, **constexprs):
            options = {k: constexprs.pop(k) for k in ("num_warps", "num_stages") if k in constexprs}
            fn = self.jitted()
            names = fn.arg_names
            sig, key = {}, [self.__name__]
            for name, arg in zip(names, args):
                if isinstance(arg, torch.Tensor):
                    sig[name] = "*" + _TYPES[arg.dtype]
                elif isinstance(arg, bool):
                    sig[name] = "i1"
                elif isinstance(arg, int):
                    sig[name] = "i32" if -2**31 <= arg < 2**31 else "i64"
                elif isinstance(arg, float):
                    sig[name] = "fp32"
                else:
                    raise TypeError(f"{self.__name__}: unexpected argument {name}={arg!r}")
                key.append(sig[name])
            for name, value in constexprs.items():
                sig[name] = "constexpr"
                key.append(f"{name}={value}")
            key += [f"{k}={v}" for k, v in options.items()]
            key = tuple(key)
            # a variant whose true flags are a subset of a compiled one's adds nothing (saves time)
            flags = frozenset(k for k, v in constexprs.items() if v is True)
            shape_key = (self.__name__, tuple(k for k in key[1:] if "=" not in k or k.split("=")[1] not in
                                              ("True", "False")))
            if not any(sk == shape_key and flags <= f for sk, f in seen):
                seen.add((shape_key, flags))
                t0 = time.perf_counter()
                triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=target, options=options)
                print("compiled", self.__name__, " ".join(key[1:]), f"{time.perf_counter() - t0:.1f}s", flush=True)
        return launch

    _triton.LazyKernel.__getitem__ = launcher


def _run_op(name, dtype):
    from dist_train import kernels as K

    def rand(*shape, dt=dtype):
        return torch.randn(*shape).to(dt).requires_grad_()

    if name == "rms_norm":
        K.rms_norm(rand(2, 3, 96), rand(96), backend="triton").sum().backward()
    elif name == "swiglu":
        K.swiglu(rand(3, 40), rand(3, 40), backend="triton").sum().backward()
    elif name == "rope":
        cos, sin = K.rope_tables(8, 64)
        q, k = K.apply_rope(rand(1, 4, 8, 64), rand(1, 2, 8, 64), cos, sin, backend="triton")
        (q.sum() + k.sum()).backward()
    elif name == "attention":
        d = 128 if dtype == torch.bfloat16 else 64
        o = K.flash_attention(rand(1, 4, 100, d), rand(1, 2, 100, d), rand(1, 2, 100, d), backend="triton")
        if dtype == torch.bfloat16:  # fp32 (3xTF32 dots): the forward shows the upcast path compiles
            o.float().sum().backward()
    elif name == "cross_entropy":
        K.linear_cross_entropy(rand(10, 32), rand(300, 32), torch.randint(0, 300, (10,)), label_smoothing=0.1,
                               backend="triton").backward()
    elif name == "moe":
        ids = torch.randint(0, 4, (6, 2))
        permuted, row_map, _ = K.moe_permute(rand(6, 48), ids, 4, backend="triton")
        out = K.moe_unpermute(permuted, row_map, torch.rand(6, 2, requires_grad=True), backend="triton")
        out.float().sum().backward()
    elif name == "quantize":
        q, scales = K.quantize_int8(torch.randn(1000), backend="triton")
        K.dequantize_int8(q, scales, backend="triton")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    _install_compiler()
    for op in CHECKS:
        # bf16 is the GPU training dtype (native bf16 tl.dot); fp32 takes the upcast/ieee dot path
        for dt in ((torch.bfloat16, torch.float32) if op == "attention" else (torch.bfloat16,)):
            _run_op(op, dt)
