"""Self-check: run every op in every mode on a small input and print its max errors against the oracles.

    python -m ssmkit.selfcheck [--dtype float32|float64] [--seed 0]

Each row compares a fast path (fused CPU kernel, or the pure-PyTorch path other devices use) with the loop
oracle in :mod:`ssmkit.ops.reference`, for the output, the final state and the gradients of every input. The exit
status is 1 if any error exceeds its tolerance.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from ssmkit.ops import fft_conv, fused_kernels, linear_scan, reference, selective_scan, ssd


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _compare(fast: Callable, ref: Callable, inputs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Max relative error of the outputs and of all input gradients (same random cotangents for both)."""
    outs, grads = [], []
    for fn in (fast, ref):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
        res = fn(**leaves)
        res = res if isinstance(res, tuple) else (res,)
        g = torch.Generator().manual_seed(1)
        loss = sum(
            (r * torch.randn(r.shape, generator=g, dtype=r.real.dtype).to(r.dtype).conj()).real.sum() for r in res
        )
        grads.append(torch.autograd.grad(loss, list(leaves.values())))
        outs.append(res)
    out_err = max(_rel(a, b) for a, b in zip(outs[0], outs[1], strict=True))
    grad_err = max(_rel(a, b) for a, b in zip(grads[0], grads[1], strict=True))
    return out_err, grad_err


def _cases(dtype: torch.dtype, seed: int) -> list[tuple[str, str, Callable, Callable, dict]]:
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype) * scale

    cplx = torch.complex128 if dtype == torch.float64 else torch.complex64
    b, L, d, n = 2, 75, 40, 8
    reset = torch.rand(b, L, generator=g) < 0.08
    cases = []

    # linear_scan: real and complex, every flag
    a_r = torch.rand(b, L, 3, 5, generator=g, dtype=torch.float64).to(dtype) * 1.8 - 0.9
    a_c = torch.polar(torch.rand(b, L, 6, generator=g, dtype=torch.float64) * 0.95,
                      torch.rand(b, L, 6, generator=g, dtype=torch.float64) * 6).to(cplx)
    for kind, a, bb, h0 in (("real", a_r, rn(b, L, 3, 5), rn(b, 3, 5)),
                            ("complex", a_c, torch.complex(rn(b, L, 6), rn(b, L, 6)),
                             torch.complex(rn(b, 6), rn(b, 6)))):
        for rev in (False, True):
            kw = {"reset": reset, "reverse": rev, "return_final_state": True}
            mode = f"{kind}, h0, reset{', reverse' if rev else ''}"
            cases.append(("linear_scan", mode,
                          lambda a, b_, h0, kw=kw: linear_scan(a, b_, initial_state=h0, **kw),
                          lambda a, b_, h0, kw=kw: reference.linear_scan(a, b_, initial_state=h0, **kw),
                          {"a": a, "b_": bb, "h0": h0}))

    # selective_scan: groups, D, z, bias/softplus, state, reset, reverse
    for groups in (None, 2):
        for rev in (False, True):
            bc = (b, L, n) if groups is None else (b, L, groups, n)
            inp = {"u": rn(b, L, d), "delta": rn(b, L, d, scale=0.5), "A": -rn(d, n).abs(), "B": rn(*bc),
                   "C": rn(*bc), "D": rn(d), "z": rn(b, L, d), "bias": rn(d, scale=0.3), "h0": rn(b, d, n)}
            kw = {"delta_softplus": True, "reset": reset, "reverse": rev, "return_final_state": True}

            def fast(u, delta, A, B, C, D, z, bias, h0, kw=kw):
                return selective_scan(u, delta, A, B, C, D, z, delta_bias=bias, initial_state=h0, **kw)

            def ref(u, delta, A, B, C, D, z, bias, h0, kw=kw):
                return reference.selective_scan(u, delta, A, B, C, D, z, delta_bias=bias, initial_state=h0, **kw)

            def torch_path(fast=fast, **inputs):
                with fused_kernels(False):
                    return fast(**inputs)

            mode = f"groups={groups or 'shared'}, D, z, softplus, h0, reset{', reverse' if rev else ''}"
            cases.append(("selective_scan", mode + " [fused]", fast, ref, inp))
            cases.append(("selective_scan", mode + " [torch path]", torch_path, ref, inp))

    # ssd: chunked vs recurrence, groups, state, reset, ragged last chunk
    heads, hd = 4, 3
    for groups in (1, 2):
        inp = {"x": rn(b, L, heads, hd), "dt": torch.nn.functional.softplus(rn(b, L, heads)),
               "A": -rn(heads).abs(), "B": rn(b, L, groups, n), "C": rn(b, L, groups, n), "D": rn(heads),
               "h0": rn(b, heads, hd, n)}
        kw = {"reset": reset, "return_final_state": True}
        cases.append(("ssd", f"groups={groups}, D, h0, reset, chunk 16 (ragged)",
                      lambda x, dt, A, B, C, D, h0, kw=kw: ssd(x, dt, A, B, C, D=D, chunk_size=16,
                                                               initial_state=h0, **kw),
                      lambda x, dt, A, B, C, D, h0, kw=kw: reference.ssd(x, dt, A, B, C, D=D, initial_state=h0,
                                                                         **kw),
                      inp))

    # fft_conv: causal and bidirectional, kernels shorter and longer than the input
    for bidir in (False, True):
        for klen in (7, 2 * L):
            kshape = (2, d, klen) if bidir else (d, klen)
            inp = {"u": rn(b, L, d), "k": rn(*kshape, scale=0.2), "D": rn(d)}
            cases.append(("fft_conv", f"{'bidirectional' if bidir else 'causal'}, kernel_len={klen}, D",
                          lambda u, k, D, bd=bidir: fft_conv(u, k, D=D, bidirectional=bd),
                          lambda u, k, D, bd=bidir: reference.fft_conv(u, k, D=D, bidirectional=bd), inp))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    print(f"ssmkit self-check: every op in every mode against its loop oracle ({args.dtype}, tolerance {tol:g})")
    print("(the first call of each fused kernel compiles it with numba; later runs load it from the cache)\n")
    header = f"{'op':<15} {'mode':<66} {'max rel err y':>14} {'max rel err grad':>17}  ok"
    print(header)
    print("-" * len(header))
    failed = 0
    t0 = time.perf_counter()
    for op, mode, fast, ref, inputs in _cases(dtype, args.seed):
        out_err, grad_err = _compare(fast, ref, inputs)
        ok = out_err <= tol and grad_err <= tol
        failed += not ok
        print(f"{op:<15} {mode:<66} {out_err:>14.2e} {grad_err:>17.2e}  {'yes' if ok else 'NO'}")
    print(f"\n{'all checks passed' if not failed else f'{failed} checks FAILED'} in {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
