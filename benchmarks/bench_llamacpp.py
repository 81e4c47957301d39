"""ssmkit against llama.cpp on the same weights, in one run: decode and prefill tokens/s, as ratios.

    python benchmarks/bench_llamacpp.py [--arch mamba|mamba2] [--cache DIR] [--threads 2] [--layers 24] [--jobs 2]
                                        [--no-prefill]

1. Builds llama.cpp's ``llama-bench`` once into ``--cache`` (default ~/.cache/ssmkit/llamacpp): the sdist of
   llama-cpp-python (``pip download llama-cpp-python==VERSION --no-binary :all: --no-deps``) carries llama.cpp in
   vendor/llama.cpp; cmake with GGML_NATIVE=OFF and explicit AVX2/AVX-512 flags (the native build turned on AMX,
   whose quantized products died with 'illegal instruction' on this machine's VM), static, no curl.
2. Checks the exporter against llama.cpp's own ``convert_hf_to_gguf.py`` (llamacpp_convert.py): a small model of
   the same family, converted both ways, must give bit-identical tensors.
3. Builds a 130M-shaped Mamba or Mamba-2 (d_model 768, 24 layers, vocab 50280, random weights; Mamba-2 with
   d_state 128 and head width 64 as mamba2-130m) in ssmkit and exports it with ``ssmkit.export.gguf.to_gguf`` as
   f32, q8_0 and q4_0.
4. Times ``llama-bench`` (decode: -p 0 -n 128; prefill: -p 2048 -n 0) and ssmkit (decode: 128 greedy steps at
   batch 1 of the float32, int8 and int4-g32 models, the quantized ones with float activations and with int8
   activations (``a8``: ``quantize_weights(..., activations="int8")``, integer products as llama.cpp's);
   prefill: the backbone forward over 2048 tokens plus the LM head on the last one) with the same threads, and
   measures the read bandwidth in the same process. ``--no-prefill``: decode only.
Writes benchmarks/results/bench_llamacpp.json. Not part of the tests (it builds C++ for minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_quant import read_bandwidth, time_decode, weight_bytes  # noqa: E402
from common import print_table, write_json  # noqa: E402
from llamacpp_convert import check as converter_check  # noqa: E402

from ssmkit.export.gguf import to_gguf  # noqa: E402
from ssmkit.infer.quantize import quantize_weights  # noqa: E402
from ssmkit.models import CausalLM, ModelConfig  # noqa: E402

VERSION = "0.3.36"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
               "-DGGML_BMI2=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AMX_TILE=OFF",
               "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF", "-DGGML_OPENMP=OFF"]


def build_llama_bench(cache: Path, jobs: int) -> Path:
    """Path of the cached llama-bench, building it first if missing."""
    exe = cache / "build" / "bin" / "llama-bench"
    if exe.exists():
        return exe
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-binary",
                        ":all:", "--no-deps", "-d", str(cache)], check=True)
    src = cache / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not src.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    build = cache / "build"
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], check=True)
    subprocess.run(["cmake", "--build", str(build), "-j", str(jobs), "--target", "llama-bench"], check=True)
    if not exe.exists():
        raise RuntimeError(f"bench_llamacpp: the build finished but {exe} is missing")
    return exe


def llama_bench(exe: Path, model: Path, threads: int, prompt: int, gen: int) -> float:
    """Tokens/s of llama-bench's best repetition (of 3; ssmkit's rows are best-of too), or its mean when the
    JSON has no samples."""
    out = subprocess.run([str(exe), "-m", str(model), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
                          "-r", "3", "-o", "json"], check=True, capture_output=True, text=True)
    rows = json.loads(out.stdout)
    samples = rows[0].get("samples_ts") or [rows[0]["avg_ts"]]
    return float(max(samples))


@torch.no_grad()
def prefill_tok_per_s(model, length: int, repeat: int = 2) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for _ in range(repeat + 1):
        t = time.perf_counter()
        hidden, _ = model.backbone(ids, return_final_state=True, input_name="input_ids")
        model.lm_head(hidden[:, -1])
        best = min(best, time.perf_counter() - t)
    return length / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=Path(os.path.expanduser("~/.cache/ssmkit/llamacpp")))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arch", choices=["mamba", "mamba2"], default="mamba")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs for the one-time build")
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--no-prefill", action="store_true", help="time decode only")
    args = p.parse_args()
    if shutil.which("cmake") is None:
        p.error("cmake is not on PATH")
    exe = build_llama_bench(args.cache, args.jobs)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    options = {"mamba2": {"d_state": 128, "headdim": 64}} if args.arch == "mamba2" else {}
    small = CausalLM(ModelConfig(d_model=64, pattern=f"{args.arch}*2", vocab_size=50280,
                                 mixer_options=options)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        convert = converter_check(small, args.cache, VERSION, Path(tmp))
    print(f"llama.cpp's converter and ssmkit's exporter: {convert['tensors']} tensors, "
          f"bit-identical: {convert['identical']}")
    model = CausalLM(ModelConfig(d_model=768, pattern=f"{args.arch}*{args.layers}", vocab_size=50280,
                                 mixer_options=options)).eval()
    files = {}
    for quant in ("f32", "q8_0", "q4_0"):
        files[quant] = args.cache / f"{args.arch}-{args.layers}l-{quant}.gguf"
        if not files[quant].exists():
            to_gguf(model, files[quant], quant=quant)
    ours = {"f32": model, "q8_0": quantize_weights(model), "q4_0": quantize_weights(model, bits=4, group_size=32),
            "q8_0 a8": quantize_weights(model, activations="int8"),
            "q4_0 a8": quantize_weights(model, bits=4, group_size=32, activations="int8")}
    bw = read_bandwidth(args.threads)  # a 1 GiB sweep: DRAM alone (reported)
    rows, ll = [], {}
    for name, m in ours.items():
        quant = name.split()[0]
        if quant not in ll:
            ll[quant] = (llama_bench(exe, files[quant], args.threads, 0, args.gen),
                         None if args.no_prefill else llama_bench(exe, files[quant], args.threads, args.prefill, 0))
        ll_dec, ll_pre = ll[quant]
        our_dec = 1 / time_decode(m, args.gen, repeat=2)
        our_pre = None if args.no_prefill or name.endswith("a8") else prefill_tok_per_s(m, args.prefill)
        # the bound over this model's own bytes: a working set that fits partly in the last-level cache is
        # partly re-read from it every token, which a 1 GiB sweep does not see
        bound = read_bandwidth(args.threads, nbytes=weight_bytes(m)) / weight_bytes(m)
        ours_name = "float32" if quant == "f32" else quant[:2].replace("q", "int") + (" a8" if "a8" in name else "")
        rows.append({"precision": f"{quant} (ssmkit {ours_name})",
                     "decode_ssmkit": our_dec, "decode_llamacpp": ll_dec, "decode_ratio": our_dec / ll_dec,
                     "decode_bound": bound, "weight_bytes": weight_bytes(m), "ssmkit_of_bound": our_dec / bound,
                     "prefill_ssmkit": our_pre, "prefill_llamacpp": ll_pre,
                     "prefill_ratio": None if our_pre is None else our_pre / ll_pre})
        print(rows[-1], flush=True)
    load = os.getloadavg()[0]
    print(f"{args.arch}, threads {args.threads}, read bandwidth {bw / 1e9:.1f} GB/s, load average {load:.1f}")
    print_table(rows, list(rows[0]))
    name = "bench_llamacpp" if args.arch == "mamba" else f"bench_llamacpp_{args.arch}"
    write_json(name, {"arch": args.arch, "threads": args.threads, "layers": args.layers, "read_bandwidth_Bps": bw,
                      "load_average": load, "llama_cpp_python": VERSION, "cmake_flags": CMAKE_FLAGS,
                      "converter_check": {k: v for k, v in convert.items() if k not in ("ours", "theirs")},
                      "rows": rows})


if __name__ == "__main__":
    main()
