"""``ssmkit export``: write a trained run's (or a saved model's) language model as GGUF or ONNX."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import UsageError, removed_on_failure, setup_logging


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser("export", help="export a language model to GGUF (llama.cpp) or ONNX", formatter_class=fmt,
                       description=(
        "Export the newest checkpoint of RUN_DIR (or a checkpoint or save_pretrained directory).\n"
        "--format gguf writes one file llama.cpp loads (Mamba and Mamba-2 models with rmsnorm and no MLP);\n"
        "--format onnx writes a directory with prefill.onnx, step.onnx and manifest.json (Mamba, Mamba-2,\n"
        "S4D, GatedSSM, RG-LRU and attention layers). Outputs are written atomically."), epilog=(
        "examples:\n  ssmkit export runs/text --format gguf --quant q8_0 --out text-q8_0.gguf\n"
        "  ssmkit export runs/text --format onnx --out text-onnx"))
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or one of its checkpoints/step-* dirs), "
                                                      "or a model directory (config.json + model.safetensors)")
    p.add_argument("--format", required=True, choices=("gguf", "onnx"), help="output format")
    p.add_argument("--out", required=True, metavar="PATH", help="output file (gguf) or directory (onnx)")
    p.add_argument("--quant", choices=("f32", "f16", "q8_0", "q4_0"), default="f32",
                   help="GGUF weight type of the 2-D matrices (default f32, exact)")
    p.add_argument("--tokenizer", choices=("auto", "byte", "gpt2", "none"), default="auto",
                   help="tokenizer to embed in a GGUF file, or to name in the ONNX manifest (auto = the run's "
                        "text task tokenizer, else none: token ids only)")
    p.set_defaults(func=run)


def _load(path: str) -> tuple[Any, dict | None]:
    from ..models import load_pretrained
    from ..models.checkpoint import WEIGHTS_NAME
    from ..train.checkpoints import STATE_JSON
    from ..train.run_dir import read_config
    from .common import find_run

    p = Path(path)
    if (p / WEIGHTS_NAME).is_file() and not (p / STATE_JSON).is_file():
        return load_pretrained(p), None
    run_dir, ckpt = find_run(path)
    return load_pretrained(ckpt), read_config(run_dir)


def _tokenizer(choice: str, config: dict | None) -> tuple[str, str | None]:
    """(tokenizer name, bpe_dir) for the export."""
    task = (config or {}).get("task", {})
    bpe_dir = task.get("bpe_dir") or None
    if choice != "auto":
        return choice, bpe_dir
    name = task.get("tokenizer")
    if name is None:
        return "none", None
    if name not in ("byte", "gpt2"):
        raise UsageError(f"the run's tokenizer {name!r} cannot be embedded (supported: byte, gpt2); pass "
                         f"--tokenizer none to export token ids only")
    return name, bpe_dir


def run(args: argparse.Namespace) -> int:
    setup_logging(True)
    model, config = _load(args.run_dir)
    out = Path(args.out)
    if args.format == "gguf":
        tok, bpe_dir = _tokenizer(args.tokenizer, config)
        from ..export import check_exportable, to_gguf

        check_exportable(model)
        if out.is_dir():
            raise UsageError(f"--out {args.out}: is a directory; GGUF export writes one file")
        with removed_on_failure(out.parent, keep=lambda: False):  # parents made here go again on failure
            out.parent.mkdir(parents=True, exist_ok=True)
            to_gguf(model, out, quant=args.quant, tokenizer=tok, bpe_dir=bpe_dir)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB, {args.quant}, tokenizer {tok})")
        return 0
    if args.quant != "f32":
        raise UsageError(f"--quant {args.quant}: ONNX export writes float32 graphs only")
    from ..export.onnx import export_onnx
    from ..export.onnx_step import check_onnx_exportable

    check_onnx_exportable(model)
    # the graphs take token ids; the manifest records which tokenizer makes them
    tok = (config or {}).get("task", {}).get("tokenizer") if args.tokenizer == "auto" else args.tokenizer
    with removed_on_failure(out.parent, keep=lambda: False):
        export_onnx(model, out, tokenizer=None if tok == "none" else tok)
    print(f"wrote {out}/prefill.onnx, {out}/step.onnx and {out}/manifest.json")
    return 0
