"""Export a CausalLM to ONNX: a prefill graph and a one-token step graph, with every layer's state as tensors.

    export_onnx(model, "out_dir")    # writes out_dir/prefill.onnx, out_dir/step.onnx, out_dir/manifest.json

    prefill: input_ids (B, L) int64          -> logits (B, L, vocab), state_out.<layer>.<field> ...
    step:    token (B,) int64, state_in.*    -> logits (B, vocab),    state_out.* ...

State names and shapes are in manifest.json (see :mod:`ssmkit.export.onnx_step`); "batch" and, for attention
KV caches, "cache" (the number of cached tokens, growing by one per step) are dynamic axes. The step graph is
traced with ``torch.onnx.export`` (the torch.export-based exporter) from plain-torch step functions (the numba
kernels are not traceable); the prefill graph is an ONNX ``Loop`` over that step (:mod:`.onnx_graphs`).
:class:`OnnxLM` runs the pair in onnxruntime. The directory is written under a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.checkpoint import _new_temp_dir
from ..models.heads import CausalLM
from .onnx_graphs import LOGITS, STEP_TOKEN, prefill_from_step, state_in, state_out
from .onnx_step import StepModule, check_onnx_exportable

MANIFEST = "manifest.json"
FORMAT = "ssmkit-onnx"
OPSET = 18


def _require(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError as e:
        raise ImportError(f"ONNX export needs the package {name!r} (import failed: {e}); install it with "
                          f"pip install 'ssmkit[export]'") from e


def state_specs(model: CausalLM) -> list[dict[str, Any]]:
    """[{"name": "<layer>.<field>", "shape": [dims] ("batch", "cache" symbolic), "dtype"}] in graph order."""
    from .onnx_step import state_to_flat

    step = StepModule(model)
    flat = state_to_flat(model.init_state(1))
    specs, k = [], 0
    for i, fields in enumerate(step.fields):
        mixer = model.backbone.blocks[i].mixer
        for f in fields:
            t = flat[k]
            k += 1
            shape: list[Any] = ["batch", *t.shape[1:]]
            if f in ("k", "v"):
                shape[2] = "cache"
            specs.append({"name": f"{i}.{f}", "layer": i, "mixer": type(mixer).__name__, "field": f,
                          "shape": shape, "dtype": "int64" if f == "pos" else "float32"})
    return specs


def _example(specs: list[dict[str, Any]], batch: int, cache: int) -> list[torch.Tensor]:
    out = []
    for s in specs:
        shape = [batch if d == "batch" else cache if d == "cache" else int(d) for d in s["shape"]]
        if s["dtype"] == "int64":
            out.append(torch.full(shape, cache, dtype=torch.long))
        else:
            out.append(torch.randn(shape) * 0.1)
    return out


def _export_step(model: CausalLM, specs: list[dict[str, Any]], path: Path) -> None:
    _require("onnxscript")
    step = StepModule(model).eval()
    batch, cache = torch.export.Dim("batch", min=1), torch.export.Dim("cache", min=0)
    dyn = tuple({i: batch if d == "batch" else cache for i, d in enumerate(s["shape"]) if isinstance(d, str)}
                for s in specs)
    args = (torch.zeros(3, dtype=torch.long), *_example(specs, 3, 5))
    names_in = [STEP_TOKEN] + [state_in(s["name"]) for s in specs]
    names_out = [LOGITS] + [state_out(s["name"]) for s in specs]
    # the exporter prints progress lines, logs missing torchvision ops and warns about merged axis names; a
    # failure still raises
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(step, args, dynamo=True, dynamic_shapes=({0: batch}, dyn),
                                        input_names=names_in, output_names=names_out, opset_version=OPSET,
                                        verbose=False, report=False)
    finally:
        quiet.setLevel(level)
    program.save(str(path))


def export_onnx(model: CausalLM, out_dir: str | Path, *, tokenizer: str | None = None) -> Path:
    """Write prefill.onnx, step.onnx and manifest.json for ``model`` into ``out_dir`` (replaced if it holds an
    earlier export; any other non-empty directory is an error). Returns ``out_dir``."""
    check_onnx_exportable(model)
    onnx = _require("onnx")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise FileExistsError(f"export_onnx: {out} exists and is not an earlier ssmkit ONNX export; "
                              f"refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    specs = state_specs(model)
    tmp = _new_temp_dir(out)
    try:
        _export_step(model, specs, tmp / "step.onnx")
        step_proto = onnx.load(str(tmp / "step.onnx"))
        onnx.save(prefill_from_step(step_proto, specs), str(tmp / "prefill.onnx"))
        manifest = {"format": FORMAT, "version": 1, "opset": OPSET, "vocab_size": model.config.vocab_size,
                    "tokenizer": tokenizer, "pattern": list(model.backbone.mixer_names),
                    "prefill": {"inputs": ["input_ids"], "outputs": [LOGITS] + [state_out(s["name"])
                                                                             for s in specs]},
                    "step": {"inputs": [STEP_TOKEN] + [state_in(s["name"]) for s in specs],
                             "outputs": [LOGITS] + [state_out(s["name"]) for s in specs]},
                    "states": specs, "config": model.config.to_dict()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            old = _new_temp_dir(out, ".old")
            os.rmdir(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class OnnxLM:
    """Runs an exported directory in onnxruntime (CPU): ``prefill(ids)`` and ``step(tokens, states)``.

    States are a dict {"state_out.<layer>.<field>": array} as the graphs return them; ``step`` takes that
    dict and returns (logits (B, vocab), new states).
    """

    def __init__(self, directory: str | Path, *, threads: int | None = None) -> None:
        ort = _require("onnxruntime")
        d = Path(directory)
        path = d / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"OnnxLM: {path}: missing (not an ssmkit ONNX export directory?)")
        self.manifest = json.loads(path.read_text(encoding="utf-8"))
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"OnnxLM: {path}: format {self.manifest.get('format')!r} is not {FORMAT!r}")
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self.prefill_session = ort.InferenceSession(str(d / "prefill.onnx"), opts, providers=providers)
        self.step_session = ort.InferenceSession(str(d / "step.onnx"), opts, providers=providers)
        self.state_names = [s["name"] for s in self.manifest["states"]]

    def prefill(self, input_ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """input_ids (B, L) int64 -> (logits (B, L, vocab), states)."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] < 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"OnnxLM.prefill: input_ids must be integer (batch, length>=1), got {ids.shape} "
                             f"{ids.dtype}")
        outs = self.prefill_session.run(None, {"input_ids": ids.astype(np.int64)})
        return outs[0], {state_out(n): o for n, o in zip(self.state_names, outs[1:], strict=True)}

    def step(self, tokens: np.ndarray, states: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """tokens (B,) int64 and the states from prefill/step -> (logits (B, vocab), new states)."""
        feed = {STEP_TOKEN: np.asarray(tokens, dtype=np.int64)}
        for n in self.state_names:
            if state_out(n) not in states:
                raise ValueError(f"OnnxLM.step: states lack {state_out(n)!r}")
            feed[state_in(n)] = states[state_out(n)]
        outs = self.step_session.run(None, feed)
        return outs[0], {state_out(n): o for n, o in zip(self.state_names, outs[1:], strict=True)}
