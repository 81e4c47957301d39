"""``ssmkit import-gguf``: load a llama.cpp Mamba / Mamba-2 GGUF file into an ssmkit model directory."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import UsageError, setup_logging


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser("import-gguf", help="convert a Mamba / Mamba-2 GGUF file into an ssmkit model directory",
                       formatter_class=fmt, description=(
        "Read a llama.cpp 'mamba' or 'mamba2' GGUF file (F32, F16, BF16, Q8_0 or Q4_0 tensors, dequantized to\n"
        "float32) and write an ssmkit model directory (config.json + model.safetensors) that `ssmkit generate`\n"
        "and ssmkit.models.load_pretrained read. A GPT-2-style BPE vocabulary is written as tokenizer.json."),
        epilog="example:\n  ssmkit import-gguf mamba-130m.Q8_0.gguf --out models/mamba-130m")
    p.add_argument("file", metavar="FILE", help="the .gguf file")
    p.add_argument("--out", required=True, metavar="DIR", help="model directory to write (must not hold files)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..interop.gguf import read_gguf, tokenizer_json, tokenizer_of
    from ..train.checkpoints import write_text_atomic

    setup_logging(True)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {args.out}: exists and is not an empty directory")
    model, kv = read_gguf(args.file)
    name = tokenizer_of(kv)
    text = None if name is not None else tokenizer_json(kv)  # before anything is written
    model.save_pretrained(out)
    hint = ""
    if name is not None:
        hint = f"; generate with --tokenizer {name}"
    elif text is not None:
        write_text_atomic(out / "tokenizer.json", text)
        hint = f"; generate with --tokenizer {out / 'tokenizer.json'}"
    print(f"wrote {out} ({model.summary()}){hint}")
    return 0
