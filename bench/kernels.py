"""Kernel benchmark: forward + backward time and peak memory of each op, ours against torch
eager and torch.compile.

    python bench/kernels.py                 # all ops; CUDA if available, else CPU
    python bench/kernels.py --ops linear_cross_entropy --repeats 3 --no-compile

On CUDA (bf16; dim 4096, vocab 128k, seq 4096) "ours" is the Triton path (backend="triton").
On the CPU Triton cannot run (the interpreter is a correctness tool, not a benchmark), so
"ours" exists only where our torch path differs from eager: the chunked linear +
cross-entropy. The CPU run's headline is that op's peak memory against the naive
`logits = x @ W.T; F.cross_entropy(logits, t)` at 4096 tokens, dim 512, vocab 32000 (goal
<= 0.3x).

Time: median of --repeats runs of forward + backward after one warm-up run (CUDA: with
synchronisation). Peak memory: the high-water mark of bytes held by torch's allocator during
one forward + backward beyond what was live before it (inputs and weights excluded, input
gradients included).
- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`.
- CPU: torch has no CPU allocator statistics, so the run is recorded with
  `torch.profiler.profile(profile_memory=True)` and the peak is the running sum of the raw
  allocation/free records (`kineto_results.events()` named "[memory]", one per c10 CPU
  allocation and free, in time order) — every tensor storage torch allocates, nothing else.
  For the cross-entropy case the result is cross-checked with the process's peak resident
  set (VmHWM from /proc/self/status after the run, reset through /proc/self/clear_refs just
  before it, minus VmRSS before it; one fresh subprocess per variant), which also counts
  allocator caching and anything outside torch.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from dist_train import kernels as K
from dist_train.kernels.dispatch import triton_runnable


# ----------------------------------------------------------------------------- cases


def _sizes(device: str, tiny: bool = False):
    if tiny:  # smoke test of the script itself, e.g. TRITON_INTERPRET=1 python bench/kernels.py --tiny
        return dict(dtype=torch.float32, tokens=64, dim=32, ffn=48, heads=4, kv_heads=2, head_dim=16, vocab=257,
                    experts=4, top_k=2)
    if device == "cuda":
        return dict(dtype=torch.bfloat16, tokens=4096, dim=4096, ffn=14336, heads=32, kv_heads=8, head_dim=128,
                    vocab=128256, experts=8, top_k=2)
    return dict(dtype=torch.float32, tokens=4096, dim=512, ffn=1536, heads=8, kv_heads=2, head_dim=64,
                vocab=32000, experts=8, top_k=2, attn_seq=1024)


def _naive_ce(x, w, t):
    return F.cross_entropy((x @ w.t()).float(), t)


def build_cases(device: str, tiny: bool = False):
    """name -> (make_inputs() -> list of tensors, {impl: fn(*inputs) -> output(s)})."""
    s = _sizes(device, tiny)
    dt, n, d = s["dtype"], s["tokens"], s["dim"]
    seq = s.get("attn_seq", n)

    def randn(*shape, grad=True, scale=1.0):
        t = (torch.randn(*shape, device=device) * scale).to(dt)
        return t.requires_grad_(grad)

    ours = "triton" if triton_runnable(device) else None
    cases = {}

    def add(name, make, eager, our_fn):
        impls = {"eager": eager}
        if ours:
            impls["ours"] = lambda *a: our_fn(*a, backend=ours)
        cases[name] = (make, impls)

    add("rms_norm", lambda: [randn(n, d), randn(d)],
        K.rms_norm_reference, lambda x, w, backend: K.rms_norm(x, w, backend=backend))
    add("swiglu", lambda: [randn(n, s["ffn"]), randn(n, s["ffn"])],
        K.swiglu_reference, lambda g, u, backend: K.swiglu(g, u, backend=backend))

    cos, sin = K.rope_tables(seq, s["head_dim"], device=device)
    add("rope", lambda: [randn(1, s["heads"], seq, s["head_dim"]), randn(1, s["kv_heads"], seq, s["head_dim"])],
        lambda q, k: K.apply_rope_reference(q, k, cos, sin),
        lambda q, k, backend: K.apply_rope(q, k, cos, sin, backend=backend))
    add("flash_attention", lambda: [randn(1, s["heads"], seq, s["head_dim"]),
                                    randn(1, s["kv_heads"], seq, s["head_dim"]),
                                    randn(1, s["kv_heads"], seq, s["head_dim"])],
        K.flash_attention_reference, lambda q, k, v, backend: K.flash_attention(q, k, v, backend=backend))

    gen = torch.Generator(device="cpu").manual_seed(0)
    target = torch.randint(0, s["vocab"], (n,), generator=gen).to(device)
    make_ce = lambda: [randn(n, d, scale=0.5), randn(s["vocab"], d, scale=0.02)]  # noqa: E731
    chunked_torch = lambda x, w: K.linear_cross_entropy(x, w, target, backend="torch")  # noqa: E731
    ce_impls = {"eager": lambda x, w: _naive_ce(x, w, target)}
    if ours:
        ce_impls["ours"] = lambda x, w: K.linear_cross_entropy(x, w, target, backend=ours)
        ce_impls["ours(torch chunked)"] = chunked_torch
    else:
        ce_impls["ours"] = chunked_torch
    cases["linear_cross_entropy"] = (make_ce, ce_impls)

    ids = torch.stack([torch.randperm(s["experts"], generator=gen)[: s["top_k"]] for _ in range(n)]).to(device)
    probs = torch.softmax(torch.randn(n, s["top_k"], generator=gen), -1).to(device=device, dtype=torch.float32)

    def moe(tokens, p, permute, unpermute):
        permuted, row_map, _ = permute(tokens, ids, s["experts"])
        return unpermute(permuted * 2, row_map, p)

    add("moe_permute+unpermute", lambda: [randn(n, d), probs.clone().requires_grad_()],
        lambda t, p: moe(t, p, K.moe_permute_reference, K.moe_unpermute_reference),
        lambda t, p, backend: moe(t, p, lambda *a: K.moe_permute(*a, backend=backend),
                                  lambda *a: K.moe_unpermute(*a, backend=backend)))
    return cases


# ----------------------------------------------------------------------------- measuring


def _outputs(out):
    return [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o.requires_grad]


def _step(fn, inputs, grads):
    for t in inputs:
        t.grad = None
    outs = _outputs(fn(*inputs))
    torch.autograd.backward(outs, grads)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, inputs, grads, repeats, device):
    _step(fn, inputs, grads)  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        _step(fn, inputs, grads)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cpu_peak_bytes(fn) -> int:
    """Peak of live bytes from torch's CPU allocator during fn(), relative to its start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    records.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in records:
        if str(e.device_type()).endswith("CPU"):
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def peak_bytes(fn, inputs, grads, device) -> int:
    for t in inputs:
        t.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(fn, inputs, grads)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return cpu_peak_bytes(lambda: _step(fn, inputs, grads))


def _grads_for(fn, inputs):
    outs = _outputs(fn(*inputs))
    return [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in outs]


# ----------------------------------------------------------------------------- RSS cross-check


def _rss_child(variant: str) -> None:
    """Run one CE variant once in this fresh process; print the rise of peak RSS."""
    torch.manual_seed(0)
    s = _sizes("cpu")
    x = (torch.randn(s["tokens"], s["dim"]) * 0.5).requires_grad_()
    w = (torch.randn(s["vocab"], s["dim"]) * 0.02).requires_grad_()
    t = torch.randint(0, s["vocab"], (s["tokens"],))
    fn = _naive_ce if variant == "naive" else (lambda x, w, t: K.linear_cross_entropy(x, w, t, backend="torch"))
    before = _status_kib("VmRSS") * 1024
    try:  # reset the peak (VmHWM) to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    fn(x, w, t).backward()
    after = _status_kib("VmHWM") * 1024
    print(json.dumps({"variant": variant, "rss_rise": after - before}))


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB. (Not getrusage's ru_maxrss: Linux carries the
    parent's high-water mark into a child started with fork + exec.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_rise(variant: str) -> int:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-child", variant], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["rss_rise"]


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--ops", nargs="*", help="subset of ops (default: all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--no-rss", action="store_true", help="skip the CPU RSS cross-check subprocesses")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test of this script")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        _rss_child(args.rss_child)
        return 0
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    s = _sizes(device, args.tiny)
    print(f"device={device} dtype={s['dtype']} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"triton={'yes' if triton_runnable(device) else 'no (CPU: ours = our torch path where it differs)'}")
    print(f"sizes: {s}")
    cases = build_cases(device, args.tiny)
    known = set(cases) | {name.split("+")[0] for name in cases}
    unknown = sorted(set(args.ops or ()) - known)
    if unknown:
        ap.error(f"--ops: unknown op(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    rows = []
    for name, (make, impls) in cases.items():
        if args.ops and name not in args.ops and name.split("+")[0] not in args.ops:
            continue
        impls = dict(impls)
        if not args.no_compile:
            impls["compile"] = torch.compile(impls["eager"])
        inputs = make()
        grads = _grads_for(impls["eager"], inputs)
        results = {}
        for impl, fn in impls.items():
            try:
                ms = time_ms(fn, inputs, grads, args.repeats, device)
                peak = peak_bytes(fn, inputs, grads, device)
                results[impl] = (ms, peak)
            except Exception as e:  # e.g. torch.compile without a working toolchain
                results[impl] = None
                print(f"  {name}/{impl}: failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        base = results.get("eager")
        for impl, r in results.items():
            if r is None:
                continue
            ms, peak = r
            rows.append((name, impl, ms, peak / 2**20, ms / base[0] if base else float("nan"),
                         peak / base[1] if base and base[1] else float("nan")))
        del inputs, grads
    print(f"\n{'op':24s} {'impl':22s} {'fwd+bwd ms':>11s} {'peak MiB':>10s} {'time/eager':>11s} {'mem/eager':>10s}")
    for name, impl, ms, mib, tr, mr in rows:
        print(f"{name:24s} {impl:22s} {ms:11.2f} {mib:10.1f} {tr:11.2f} {mr:10.3f}")
    ce = {impl: (ms, mib) for name, impl, ms, mib, _, _ in rows if name == "linear_cross_entropy"}
    if device == "cpu" and not args.tiny and "eager" in ce and "ours" in ce:
        ratio = ce["ours"][1] / ce["eager"][1]
        print(f"\nlinear+CE peak memory (torch allocator), chunked / naive: {ce['ours'][1]:.1f} / "
              f"{ce['eager'][1]:.1f} MiB = {ratio:.3f}x (goal <= 0.3x: {'met' if ratio <= 0.3 else 'NOT met'})")
        if not args.no_rss:
            naive, chunked = rss_rise("naive"), rss_rise("chunked")
            ratio = f"{chunked / naive:.3f}x" if naive > 0 else "n/a"
            print(f"cross-check, peak RSS rise in a fresh process: chunked / naive: {chunked / 2**20:.1f} / "
                  f"{naive / 2**20:.1f} MiB = {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
