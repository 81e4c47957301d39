"""Sequence-parallel chunked training, 1 process vs P processes (gloo, one thread each), on one long sequence.

    python benchmarks/bench_distributed.py [--models mamba mamba2] [--lengths 262144 1048576]
                                           [--nprocs 1 2] [--chunk-len 32768] [--timeout 3600] [--quick]
                                           [--d-model 256] [--n-layers 2] [--malloc-mmap-threshold BYTES]
                                           [--phases]
    python benchmarks/bench_distributed.py --layer-memory --lengths 65536   # one layer, unchunked

``--layer-memory``: one mixer layer (d_model 256, the mixers below), forward + backward of the whole sequence,
unchunked: P = 1 runs the plain layer, P > 1 ``SequenceParallel(layer)`` on each rank's shard; growth of each rank's
peak RSS over its RSS before the step, and the ratio to one process.

Model: the 2-layer d_model-256 CausalLM of bench_longseq.py (byte vocabulary, tied embeddings, RMSNorm, no MLP,
float32, batch 1, random weights and tokens), with Mamba (d_state 16, expand 2) or Mamba2 (d_state 128, expand 2,
headdim 64) mixers. One training step (forward + backward) of the whole sequence:

- P = 1: :func:`ssmkit.train.chunked.chunked_loss_backward` with ``chunk_len``;
- P > 1: :func:`ssmkit.distributed.sequence_chunked.sequence_parallel_chunked_backward` with the same
  ``chunk_len`` (each rank runs chunk_len / P positions of every chunk), P fresh processes joined through a file
  rendezvous with a bounded timeout; every rank's gradient is the one-process gradient.

Per run: wall time and tokens/s, each rank's peak RSS (VmHWM) and its growth over the RSS before the step, the
bytes each rank handed to collectives and point-to-point sends (counted by wrapping torch.distributed), the loss
(equal across P up to float32 rounding), scaling efficiency = tokens/s(P) / (P × tokens/s(1)) and the memory ratio
peak(P) / peak(1). Writes benchmarks/results/bench_distributed.json. Timings are wall clock on a shared machine
(the load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import current_rss_bytes, peak_rss_bytes, print_table, write_json  # noqa: E402

D_MODEL, N_LAYERS, VOCAB = 256, 2, 256
MIXERS = {"mamba": {"d_state": 16, "expand": 2, "d_conv": 4},
          "mamba2": {"d_state": 128, "expand": 2, "d_conv": 4, "headdim": 64}}
MIB = 1 << 20
SCRIPT = Path(__file__).resolve()


def _model(name: str, d_model: int = D_MODEL, n_layers: int = N_LAYERS):
    from ssmkit.models import CausalLM, ModelConfig

    cfg = ModelConfig(d_model=d_model, n_layers=n_layers, pattern=name, vocab_size=VOCAB,
                      mixer_options={name: MIXERS[name]})
    return CausalLM(cfg)


def _tokens(length: int):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (1, length), generator=g)
    return x, torch.cat([x[:, 1:], torch.full((1, 1), -100)], 1)


def _count_bytes() -> dict:
    """Wrap torch.distributed's collectives and sends: bytes of the tensors this rank hands to them."""
    import torch.distributed as dist

    counts = {"collective": 0, "p2p": 0}

    def nbytes(t) -> int:
        return t.numel() * t.element_size()

    def wrap(name: str, kind: str, arg: int):
        real = getattr(dist, name)

        def f(*a, **k):
            t = a[arg] if len(a) > arg else None
            if t is not None:
                counts[kind] += nbytes(t)
            return real(*a, **k)
        setattr(dist, name, f)

    wrap("all_gather", "collective", 1)
    wrap("all_reduce", "collective", 0)
    wrap("send", "p2p", 0)
    wrap("isend", "p2p", 0)
    return counts


def _phase_hooks(model, phases: dict) -> None:
    """Per layer i, the RSS at and the peak RSS up to: its forward start/end with grad ("Li fwd<" / "Li fwd>"), its
    backward start/end ("Li bwd<" / "Li bwd>"); the peak restarts at every mark (Linux ``clear_refs``). ``phases``
    gets the largest of each over the chunks, in bytes over ``phases["base"]``."""
    import torch

    def mark(tag: str) -> None:
        rss, peak = current_rss_bytes() - phases["base"], peak_rss_bytes() - phases["base"]
        old = phases.setdefault(tag, [rss, peak])
        phases[tag] = [max(old[0], rss), max(old[1], peak)]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    for i, block in enumerate(model.backbone.blocks):
        def hook(tag: str, grad_only: bool):
            return lambda *_: mark(tag) if "base" in phases and (torch.is_grad_enabled() or not grad_only) else None
        block.mixer.register_forward_pre_hook(hook(f"L{i} fwd<", True))
        block.mixer.register_forward_hook(hook(f"L{i} fwd>", True))
        block.mixer.register_full_backward_pre_hook(hook(f"L{i} bwd<", False))
        block.mixer.register_full_backward_hook(hook(f"L{i} bwd>", False))


def worker(name: str, length: int, chunk_len: int, nproc: int, rank: int, init_file: str, timeout: float,
           d_model: int = D_MODEL, n_layers: int = N_LAYERS, phases: bool = False) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _model(name, d_model, n_layers)
    x, labels = _tokens(length)
    counts = None
    if nproc > 1:
        from datetime import timedelta

        import torch.distributed as dist

        from ssmkit.distributed.sequence_chunked import sequence_parallel_chunked_backward

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=nproc,
                                timeout=timedelta(seconds=timeout))
        counts = _count_bytes()
        warm = min(length, 1024)  # numba kernels load/compile outside the measurement
        sequence_parallel_chunked_backward(model, {"input_ids": x[:, :warm], "labels": labels[:, :warm]}, 512)

        def step():
            return sequence_parallel_chunked_backward(model, {"input_ids": x, "labels": labels}, chunk_len)
    else:
        from ssmkit.train.chunked import chunked_loss_backward

        chunked_loss_backward(model, {"input_ids": x[:, :1024], "labels": labels[:, :1024]}, 512)

        def step():
            return chunked_loss_backward(model, {"input_ids": x, "labels": labels}, chunk_len)
    model.zero_grad(set_to_none=True)
    if counts is not None:
        counts.update(collective=0, p2p=0)
    marks: dict = {}
    if phases:
        _phase_hooks(model, marks)
    base = marks["base"] = current_rss_bytes()
    t0, c0 = time.perf_counter(), time.process_time()
    stats = step()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"model": name, "d_model": d_model, "n_layers": n_layers, "length": length, "chunk_len": chunk_len,
           "cpu_seconds": cpu, "nproc": nproc, "rank": rank, "params": sum(p.numel() for p in model.parameters()),
           "seconds": seconds, "peak_rss": peak_rss_bytes(), "base_rss": base, "loss": stats["loss"],
           "chunks": stats["chunks"], "grad_norm": float(sum(p.grad.double().pow(2).sum()
                                                             for p in model.parameters()) ** 0.5)}
    if phases:  # each mark restarted the peak: the step's peak is the largest since any mark
        out["phases_MiB"] = {k: [round(v / MIB, 1) for v in vals] for k, vals in marks.items() if k != "base"}
        out["peak_rss"] = max([out["peak_rss"]] + [base + v[1] for k, v in marks.items() if k != "base"])
    if counts is not None:
        out.update(collective_bytes=counts["collective"], p2p_bytes=counts["p2p"])
        import torch.distributed as dist

        dist.destroy_process_group()
    return out


def layer_worker(name: str, length: int, nproc: int, rank: int, init_file: str, timeout: float) -> dict:
    """Peak RSS growth of one layer's forward + backward on this rank's shard (P = 1: the plain layer)."""
    import torch

    from ssmkit.layers import Mamba, Mamba2

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = (Mamba if name == "mamba" else Mamba2)(D_MODEL, **{k: v for k, v in MIXERS[name].items()})
    x = torch.randn(1, length, D_MODEL)
    run = layer
    if nproc > 1:
        from datetime import timedelta

        import torch.distributed as dist

        from ssmkit.distributed.sequence import SequenceParallel, shard_sequence

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=nproc,
                                timeout=timedelta(seconds=timeout))
        x = shard_sequence(x).clone()
        run = SequenceParallel(layer)
    run(x[:, :256].clone().requires_grad_()).sum().backward()  # kernels load outside the measurement
    layer.zero_grad(set_to_none=True)
    x.requires_grad_()
    base = current_rss_bytes()
    t0 = time.perf_counter()
    run(x).sum().backward()
    seconds = time.perf_counter() - t0
    return {"model": name, "length": length, "nproc": nproc, "rank": rank, "seconds": seconds,
            "peak_rss": peak_rss_bytes(), "base_rss": base}


def launch(name: str, length: int, chunk_len: int, nproc: int, timeout: float, kind: str = "--worker",
           extra: tuple[str, ...] = (), mmap_threshold: int | None = None) -> list[dict]:
    """``nproc`` fresh worker processes; every one is killed at the deadline. ``mmap_threshold``: glibc's
    ``MALLOC_MMAP_THRESHOLD_`` for the workers (None: glibc's default, a dynamic threshold)."""
    env = dict(os.environ)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        procs = [subprocess.Popen([sys.executable, str(SCRIPT), kind, name, str(length), str(chunk_len),
                                   str(nproc), str(r), init, str(timeout), *extra], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for r in range(nproc)]
        deadline = time.monotonic() + timeout
        results = []
        for r, p in enumerate(procs):
            try:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                return [{"rank": r, "error": f"timed out after {timeout:.0f} s"}]
            if p.returncode != 0:
                for q in procs:
                    q.kill()
                return [{"rank": r, "error": (err.strip().splitlines() or ["failed"])[-1]}]
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        n, length, chunk, nproc, rank, init, timeout, d_model, n_layers, phases = sys.argv[2:]
        print(json.dumps(worker(n, int(length), int(chunk), int(nproc), int(rank), init, float(timeout),
                                int(d_model), int(n_layers), phases == "1")))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--layer-worker":
        n, length, _, nproc, rank, init, timeout = sys.argv[2:]
        print(json.dumps(layer_worker(n, int(length), int(nproc), int(rank), init, float(timeout))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mamba", "mamba2"], choices=sorted(MIXERS))
    ap.add_argument("--lengths", type=int, nargs="+", default=[1 << 18, 1 << 20])
    ap.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--chunk-len", type=int, default=32768)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before a run's processes are killed")
    ap.add_argument("--out", default="bench_distributed", help="results file name (benchmarks/results/NAME.json)")
    ap.add_argument("--d-model", type=int, default=D_MODEL, help="model width (default: bench_longseq's 256)")
    ap.add_argument("--n-layers", type=int, default=N_LAYERS, help="mixer layers (default 2)")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="set glibc's MALLOC_MMAP_THRESHOLD_ in every worker (P = 1 and P > 1 alike): blocks above "
                         "it are mmapped and returned on free, so RSS follows the live tensors (default: glibc's)")
    ap.add_argument("--phases", action="store_true", help="per layer, RSS and peak RSS at its forward and backward "
                    "(growth over the RSS before the step, MiB; the largest over the chunks), printed per rank")
    ap.add_argument("--quick", action="store_true", help="small lengths (a smoke test of this script)")
    ap.add_argument("--layer-memory", action="store_true", help="one layer, unchunked (see the module docstring)")
    a = ap.parse_args()
    if a.quick:
        a.lengths, a.chunk_len = [8192], 2048
    if a.d_model < 1 or a.n_layers < 1:
        ap.error(f"--d-model and --n-layers must be positive, got {a.d_model} and {a.n_layers}")
    if a.layer_memory:
        layer_memory(a)
        return
    load_start = os.getloadavg()
    rows, runs = [], []
    for name in a.models:
        for length in a.lengths:
            base = None
            for nproc in a.nprocs:
                res = launch(name, length, a.chunk_len, nproc, a.timeout,
                             extra=(str(a.d_model), str(a.n_layers), str(int(a.phases))),
                             mmap_threshold=a.malloc_mmap_threshold)
                runs.append(res)
                if "error" in res[0]:
                    print(f"{name} L={length} P={nproc}: FAILED: {res[0]['error']}", flush=True)
                    continue
                secs = max(r["seconds"] for r in res)
                peak = max(r["peak_rss"] for r in res)
                grow = max(r["peak_rss"] - r["base_rss"] for r in res)
                row = {"model": name, "d_model": a.d_model, "n_layers": a.n_layers, "length": length, "P": nproc,
                       "time_s": secs, "cpu_s": max(r["cpu_seconds"] for r in res), "tok_per_s": length / secs,
                       "peak_rss_MiB": peak / MIB, "growth_MiB": grow / MIB,
                       "coll_MiB/rank": max(r.get("collective_bytes", 0) for r in res) / MIB,
                       "p2p_KiB/rank": max(r.get("p2p_bytes", 0) for r in res) / 1024,
                       "loss": res[0]["loss"], "eff": None, "mem_ratio": None, "growth_ratio": None}
                if nproc == 1:
                    base = row
                elif base is not None:
                    row["eff"] = row["tok_per_s"] / (nproc * base["tok_per_s"])
                    row["mem_ratio"] = peak / (base["peak_rss_MiB"] * MIB)
                    row["growth_ratio"] = grow / (base["growth_MiB"] * MIB)
                rows.append(row)
                print(json.dumps(row), flush=True)
                for r in res if a.phases else []:
                    print(f"  rank {r['rank']} phases (rss, peak since the previous mark), MiB:",
                          json.dumps(r["phases_MiB"]), flush=True)
    print()
    print_table(rows, ["model", "length", "P", "time_s", "cpu_s", "tok_per_s", "peak_rss_MiB", "growth_MiB",
                       "coll_MiB/rank", "p2p_KiB/rank", "loss", "eff", "mem_ratio", "growth_ratio"])
    payload = {"model": {"d_model": a.d_model, "n_layers": a.n_layers, "vocab_size": VOCAB, "mixers": MIXERS,
                         "dtype": "float32", "batch": 1},
               "chunk_len": a.chunk_len, "malloc_mmap_threshold": a.malloc_mmap_threshold, "runs": runs,
               "table": rows, "loadavg_start": load_start,
               "loadavg_end": os.getloadavg()}
    path = write_json(a.out + ("_quick" if a.quick else ""), payload)
    print(f"\nwrote {path} (load average {load_start[0]:.1f} -> {payload['loadavg_end'][0]:.1f})")


def layer_memory(a: argparse.Namespace) -> None:
    rows = []
    for name in a.models:
        for length in a.lengths:
            base = None
            for nproc in a.nprocs:
                res = launch(name, length, 0, nproc, a.timeout, "--layer-worker")
                if "error" in res[0]:
                    print(f"{name} L={length} P={nproc}: FAILED: {res[0]['error']}", flush=True)
                    continue
                grow = max(r["peak_rss"] - r["base_rss"] for r in res)
                row = {"layer": name, "length": length, "P": nproc, "growth_MiB/rank": grow / MIB,
                       "time_s": max(r["seconds"] for r in res), "ratio": None}
                if nproc == 1:
                    base = grow
                elif base:
                    row["ratio"] = grow / base
                rows.append(row)
                print(json.dumps(row), flush=True)
    print_table(rows, ["layer", "length", "P", "growth_MiB/rank", "time_s", "ratio"])
    write_json(a.out + "_layer_memory" + ("_quick" if a.quick else ""), {"table": rows, "loadavg": os.getloadavg()})


if __name__ == "__main__":
    main()
