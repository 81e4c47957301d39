"""Fused kernels called from several Python threads at once: no abort (numba's workqueue layer kills the process on
concurrent launches unless they are serialised), and every thread gets the single-threaded results bitwise. Runs
in a subprocess with a timeout, so an abort or a deadlock fails the test instead of killing pytest."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import threading
    import torch
    from ssmkit.ops import decode_linear, linear_scan, selective_scan
    from ssmkit.ops.mamba_step import MambaStackPlan, MambaStepWeights, mamba_stack_step

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(4, 2048, 256, generator=g), torch.randn(4, 2048, 256, generator=g)
    u, dt = torch.randn(2, 512, 192, generator=g), torch.randn(2, 512, 192, generator=g)
    A, B, C = -torch.rand(192, 8, generator=g), torch.randn(2, 512, 8, generator=g), torch.randn(2, 512, 8, generator=g)
    x, w = torch.randn(4, 512, generator=g), torch.randn(3000, 512, generator=g)
    di, n, r_, k, dm = 64, 8, 4, 4, 32
    def r(*shape, scale):
        return torch.randn(*shape, generator=g) * scale

    sw = MambaStepWeights(in_w=r(2 * di, dm, scale=dm ** -0.5), in_b=None, conv_w=r(di, k, scale=0.5), conv_b=None,
                          x_w=r(r_ + 2 * n, di, scale=di ** -0.5), dt_w=r(di, r_, scale=r_ ** -0.5),
                          dt_b=r(di, scale=1) - 2, a_log=r(di, n, scale=0.5), d=r(di, scale=1),
                          out_w=r(dm, di, scale=di ** -0.5), out_b=None)
    plan = MambaStackPlan([sw] * 4, final_weight=torch.ones(dm), final_eps=1e-5)
    h = torch.randn(8, dm, generator=g)
    convs, ssms = [torch.randn(8, di, k - 1, generator=g)] * 4, [torch.randn(8, di, n, generator=g)] * 4

    def work():
        ga = a.clone().requires_grad_()
        y = linear_scan(ga, b)
        y.square().sum().backward()
        gu = u.clone().requires_grad_()
        s = selective_scan(gu, dt, A, B, C, delta_softplus=True)
        s.sum().backward()
        with torch.no_grad():
            lin = decode_linear(x, w)
            step = mamba_stack_step(h, plan, convs, ssms)[0]
        return [y.detach(), ga.grad, s.detach(), gu.grad, lin, step]

    want = work()
    assert all(bool(t.isfinite().all()) for t in want)
    failures = []

    def run():
        try:
            for _ in range(3):
                for i, (got, ref) in enumerate(zip(work(), want, strict=True)):
                    if not torch.equal(got, ref):
                        failures.append(f"result {i} differs by {float((got - ref).abs().max())}")
        except BaseException as e:  # noqa: BLE001
            failures.append(repr(e))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    print("ok")
""")


def test_kernels_from_several_python_threads():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])
