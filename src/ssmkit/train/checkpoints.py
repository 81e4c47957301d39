"""Training checkpoints: a model checkpoint plus everything needed to resume exactly. Never pickled.

Layout under ``RUN_DIR/checkpoints/``::

    step-00000500/
        config.json, model.safetensors     the model (ssmkit.models.save_pretrained)
        trainer_state.safetensors          optimizer moments and RNG states (tensors)
        trainer_state.json                 step, optimizer hyper-parameters, scheduler, data position, Python
                                           RNG, counters, and the SHA-256 of trainer_state.safetensors
                                           (tensors inside the trainer state, e.g. a batch source's reward
                                           model, go to the safetensors file under "state.<n>", see
                                           :func:`pack_state`)
    latest                                 text: the name of the newest complete checkpoint directory

Writing is atomic: a step directory is written under a temporary name, fsynced and renamed into place
(``os.replace``), then ``latest`` is replaced atomically. A crash leaves either the old or the new checkpoint,
never a torn one; stale temporaries are ignored and cleaned up.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..models.checkpoint import _chmod_as_created, _fsync_dir, _new_temp_dir, _new_temp_file

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LATEST = "latest"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class ResumeError(ValueError):
    """A training checkpoint that cannot be resumed from (missing, corrupt or from another configuration)."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (mode 0666 minus the umask)."""
    path = Path(path)
    fd, tmp = _new_temp_file(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------- RNG
class RngStates:
    """The torch (CPU), numpy and Python RNG states a training run owns, kept apart from the process's.

    ``with rng.active():`` swaps them into the global generators for the block (model init, dropout, a batch
    source that draws from them) and, on exit, stores the advanced states back here and restores the caller's.
    So a run is reproducible from its seed and resumes exactly, while the caller's global RNGs are left as they
    were.
    """

    def __init__(self, torch_state: torch.Tensor, numpy_state: tuple, python_state: tuple) -> None:
        self.torch_state, self.numpy_state, self.python_state = torch_state, numpy_state, python_state
        self._active = False

    @classmethod
    def capture_global(cls) -> RngStates:
        return cls(torch.get_rng_state(), np.random.get_state(), random.getstate())

    @classmethod
    def seeded(cls, seed: int) -> RngStates:
        """The states the global generators would have after seeding each with ``seed`` (the caller's are
        untouched)."""
        saved = cls.capture_global()
        try:
            torch.default_generator.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            return cls.capture_global()
        finally:
            saved.apply_global()

    def apply_global(self) -> None:
        torch.set_rng_state(self.torch_state)
        np.random.set_state(self.numpy_state)
        random.setstate(self.python_state)

    def current(self) -> RngStates:
        """The run's states now: the global ones inside :meth:`active`, else the stored ones."""
        return RngStates.capture_global() if self._active else self

    @contextmanager
    def active(self) -> Iterator[RngStates]:
        if self._active:  # nested: already in place
            yield self
            return
        saved = RngStates.capture_global()
        self.apply_global()
        self._active = True
        try:
            yield self
        finally:
            self._active = False
            now = RngStates.capture_global()
            self.torch_state, self.numpy_state, self.python_state = now.torch_state, now.numpy_state, now.python_state
            saved.apply_global()

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON) for a training checkpoint."""
        np_state, py_state = self.numpy_state, self.python_state
        tensors = {"rng.torch": self.torch_state.clone(),
                   "rng.numpy.key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))}
        meta = {"numpy": {"algorithm": np_state[0], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                          "cached_gaussian": float(np_state[4])},
                "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]}}
        return tensors, meta

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> RngStates:
        n, p = meta["numpy"], meta["python"]
        key = tensors["rng.numpy.key"].numpy().astype(np.uint32)
        return cls(tensors["rng.torch"].clone(), (n["algorithm"], key, n["pos"], n["has_gauss"], n["cached_gaussian"]),
                   (p["version"], tuple(p["state"]), p["gauss_next"]))


# ------------------------------------------------------------------------------------------- state
_TENSOR, _ITEMS, _TUPLE, _NDARRAY = "__tensor__", "__items__", "__tuple__", "__ndarray__"


def pack_state(value: Any, tensors: dict[str, torch.Tensor], prefix: str = "state.") -> Any:
    """A JSON-serialisable copy of ``value`` whose tensors and numpy arrays are moved into ``tensors`` (under
    ``prefix<n>``) and replaced by references; dicts with non-string keys and tuples are tagged so that
    :func:`unpack_state` rebuilds them exactly. Other leaves must be JSON values (str, int, float, bool, None)."""
    if isinstance(value, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = value.detach().cpu().clone().contiguous()
        return {_TENSOR: key}
    if isinstance(value, np.ndarray):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {_NDARRAY: key}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not ({_TENSOR, _ITEMS, _TUPLE, _NDARRAY} & set(value)):
            return {k: pack_state(v, tensors, prefix) for k, v in value.items()}
        return {_ITEMS: [[pack_state(k, tensors, prefix), pack_state(v, tensors, prefix)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {_TUPLE: [pack_state(v, tensors, prefix) for v in value]}
    if isinstance(value, list):
        return [pack_state(v, tensors, prefix) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"pack_state: cannot store a {type(value).__name__} in a checkpoint (JSON values, tensors "
                    f"and numpy arrays only)")


def unpack_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack_state`."""
    if isinstance(value, dict):
        if len(value) == 1:
            (tag, inner), = value.items()
            if tag in (_TENSOR, _NDARRAY):
                if inner not in tensors:
                    raise ResumeError(f"checkpoint state refers to tensor {inner!r}, which is not in {STATE_TENSORS}")
                return tensors[inner] if tag == _TENSOR else tensors[inner].numpy()
            if tag == _ITEMS:
                return {_hashable(unpack_state(k, tensors)): unpack_state(v, tensors) for k, v in inner}
            if tag == _TUPLE:
                return tuple(unpack_state(v, tensors) for v in inner)
        return {k: unpack_state(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [unpack_state(v, tensors) for v in value]
    return value


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


# ------------------------------------------------------------------------------------------- optimizer
def _jsonable(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_jsonable(e) for e in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(e) for k, e in v.items()}
    if isinstance(v, torch.Tensor):
        raise TypeError("tensor in optimizer param_groups")
    return v


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as flat tensors ("optim.<index>.<key>") and JSON (param groups, non-tensor state)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().clone().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    groups = [{k: _jsonable(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Load what :func:`optimizer_to_flat` saved into ``opt`` (its groups must hold the same parameters)."""
    groups = meta["param_groups"]
    cur = opt.param_groups
    if len(groups) != len(cur):
        raise ResumeError(f"optimizer has {len(cur)} parameter groups but the checkpoint has {len(groups)}")
    for g, c in zip(groups, cur, strict=True):
        if g.get("param_names") != c.get("param_names"):
            raise ResumeError(f"optimizer group {c.get('name')!r} holds other parameters than the "
                              f"checkpoint's; was the model changed?")
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = t
    for idx, d in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(d)
    loaded_groups = []
    for g in groups:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        loaded_groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": loaded_groups})


# ------------------------------------------------------------------------------------------- save / load
def save_training_checkpoint(
    ckpt_root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    state: dict[str, Any], *, rng: RngStates | None = None, keep: int = 2,
) -> Path:
    """Write ``ckpt_root/step-XXXXXXXX`` atomically and point ``latest`` at it; keep the newest ``keep``.

    ``state``: trainer state (step, scheduler, data source, counters...): JSON values, plus tensors and numpy
    arrays anywhere inside, which are stored in the safetensors file (:func:`pack_state`). ``rng``: the run's
    RNG states (default: the process's global ones).
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = _new_temp_dir(final)
    try:
        model.save_pretrained(tmp)
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        rng_tensors, rng_meta = (rng or RngStates.capture_global()).to_checkpoint()
        state_tensors: dict[str, torch.Tensor] = {}
        packed = pack_state(dict(state), state_tensors)
        save_file({**opt_tensors, **rng_tensors, **state_tensors}, tmp / STATE_TENSORS, metadata={"format": "pt"})
        _chmod_as_created(tmp / STATE_TENSORS)
        meta = {"ssmkit_trainer_format": FORMAT, "step": step, "optimizer": opt_meta, "rng": rng_meta,
                "tensors_sha256": _sha256(tmp / STATE_TENSORS), **packed}
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():  # e.g. an interrupt right after a periodic save of the same step
            trash = _new_temp_dir(final, ".old")
            os.replace(final, trash / final.name)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    write_text_atomic(root / LATEST, final.name + "\n")
    _fsync_dir(root)
    _prune(root, keep, final.name)
    return final


def _prune(root: Path, keep: int, newest: str) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))
    for p in steps[:-keep] if keep > 0 else []:
        if p.name != newest:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():  # temporaries of interrupted saves
        if p.name.startswith(".") and p.name.endswith((".tmp", ".old")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest complete checkpoint directory (via ``latest``, else the highest step), or None."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text(encoding="utf-8").strip()
        if (cand / STATE_JSON).is_file():
            return cand
    steps = sorted(p for p in root.iterdir()
                   if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_JSON).is_file())
    return steps[-1] if steps else None


def read_training_state(ckpt: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(trainer_state.json contents, trainer_state.safetensors tensors) of a checkpoint, verified."""
    d = Path(ckpt)
    path = d / STATE_JSON
    if not path.is_file():
        raise ResumeError(f"{d}: no {STATE_JSON}; not a training checkpoint")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResumeError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("ssmkit_trainer_format") != FORMAT:
        raise ResumeError(f"{path}: not an ssmkit trainer state (format {FORMAT})")
    tpath = d / STATE_TENSORS
    if not tpath.is_file() or _sha256(tpath) != meta.get("tensors_sha256"):
        raise ResumeError(f"{tpath}: missing, or its SHA-256 does not match {STATE_JSON} (corrupt or torn)")
    try:
        tensors = load_file(tpath, device="cpu")
    except Exception as e:  # safetensors raises its own error type on bad files
        raise ResumeError(f"{tpath}: cannot read: {type(e).__name__}: {e}") from e
    return unpack_state(meta, tensors), tensors
