"""llama.cpp's own converter against ssmkit's GGUF exporter, on the same weights (used by bench_llamacpp.py).

The model goes to a transformers checkpoint (``ssmkit.interop.to_transformers``), llama.cpp's
``convert_hf_to_gguf.py`` (from the llama-cpp-python sdist, run with its vendored ``gguf-py``) converts that, and
ssmkit's ``to_gguf`` writes the same model directly. The two files must hold the same tensors, bit for bit, under
the same names, types and shapes; metadata keys that differ are listed (the converter adds its GPT-NeoX vocabulary
and general.* keys).

    python benchmarks/llamacpp_convert.py [--cache DIR] [--arch mamba|mamba2]    # a small model, prints the check
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def converter_dir(cache: Path, version: str) -> Path:
    """The vendored llama.cpp directory of the unpacked sdist in ``cache``."""
    src = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (src / "convert_hf_to_gguf.py").exists():
        raise FileNotFoundError(f"llama.cpp's convert_hf_to_gguf.py is not in {src}: run bench_llamacpp.py once "
                                "(it downloads and unpacks the sdist)")
    return src


def convert_with_llamacpp(model, src: Path, out: Path, outtype: str = "f32") -> Path:
    """Write ``model`` (an ssmkit CausalLM) as a transformers checkpoint and convert it with llama.cpp's script."""
    from ssmkit.interop import to_transformers

    with tempfile.TemporaryDirectory() as tmp:
        to_transformers(model).save_pretrained(tmp)
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
        run = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), tmp, "--outtype", outtype,
                              "--outfile", str(out)], env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed (rc {run.returncode}): {run.stderr[-2000:]}")
    return out


def compare_gguf(ours: Path, theirs: Path) -> dict:
    """Tensor-by-tensor comparison of two GGUF files, plus the metadata keys only one of them has."""
    from gguf import GGUFReader

    a, b = GGUFReader(str(ours)), GGUFReader(str(theirs))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    differing = []
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        same = (x.tensor_type == y.tensor_type and list(x.shape) == list(y.shape)
                and np.array_equal(np.asarray(x.data), np.asarray(y.data)))
        if not same:
            differing.append(name)
    return {"tensors": len(ta), "only_ours": sorted(set(ta) - set(tb)), "only_theirs": sorted(set(tb) - set(ta)),
            "differing": differing, "identical": not differing and set(ta) == set(tb),
            "keys_only_ours": sorted(set(a.fields) - set(b.fields)),
            "keys_only_theirs": sorted(set(b.fields) - set(a.fields))}


def check(model, cache: Path, version: str, workdir: Path) -> dict:
    """Convert ``model`` both ways in ``workdir`` and compare the files (f32)."""
    from ssmkit.export.gguf import to_gguf

    src = converter_dir(cache, version)
    ours = to_gguf(model, workdir / "ours.gguf", ssmkit_keys=False)
    theirs = convert_with_llamacpp(model, src, workdir / "theirs.gguf")
    return {**compare_gguf(ours, theirs), "ours": str(ours), "theirs": str(theirs)}


def main() -> None:
    import torch

    from ssmkit.models import CausalLM, ModelConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=Path(os.path.expanduser("~/.cache/ssmkit/llamacpp")))
    p.add_argument("--version", default="0.3.36")
    p.add_argument("--arch", choices=["mamba", "mamba2"], default="mamba")
    args = p.parse_args()
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(d_model=64, pattern=f"{args.arch}*2", vocab_size=50280)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        result = check(model, args.cache, args.version, Path(tmp))
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
