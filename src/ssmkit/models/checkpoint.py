"""Checkpoints: a directory with ``config.json`` and ``model.safetensors``. JSON and safetensors only; nothing
is ever unpickled.

config.json::

    {"ssmkit_format": 1, "head": "CausalLM", "dtype": "float32",
     "weights_sha256": "<hex digest of model.safetensors>", "config": {...ModelConfig.to_dict()...}}

Writing is atomic per file (a temporary name in the same directory, fsync, ``os.replace``, fsync of the
directory). The weights go first and the config records their SHA-256, so a config never silently pairs with
other weights: a torn update, a truncated file or flipped bytes all fail loading with the path in the error.

Tied weights (an LM head tied to the embedding) are saved once, under the embedding's name, and are tied again
by constructing the model from its config.

This module is the low level and knows no heads: callers pass the head's name (writing) and the name -> class
table (reading). :mod:`ssmkit.models.pretrained` binds the table of :mod:`ssmkit.models.heads`
(``save_pretrained`` / ``read_config`` / ``load_pretrained``); the import graph stays acyclic
(checkpoint <- heads <- pretrained).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
_META_KEYS = ("ssmkit_format", "head", "dtype", "weights_sha256", "config")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: bad config.json, unreadable weights or mismatched tensors."""


# ------------------------------------------------------------------------------------------- writing
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path, suffix: str) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"


def _new_temp_file(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """(fd open for writing, name) of a new empty file next to ``path``. Unlike ``tempfile.mkstemp`` (mode
    0600) it is created with mode 0666 minus the umask, like any file ``open()`` creates, so the file renamed
    into place has the usual permissions."""
    for _ in range(100):
        tmp = _temp_name(path, suffix)
        try:
            return os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")


def _new_temp_dir(path: Path, suffix: str = ".tmp") -> Path:
    """A new empty directory next to ``path`` with mode 0777 minus the umask (``tempfile.mkdtemp``: 0700)."""
    for _ in range(100):
        tmp = _temp_name(path, suffix)
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary directory next to {path}")


def _umask() -> int:
    """The process's umask, read without changing it where /proc allows (else set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_as_created(path: str | Path) -> None:
    """Give ``path`` the mode ``open()`` would have created it with (0666 minus the umask): writers such as
    safetensors' ``save_file`` create their files with mode 0600."""
    os.chmod(path, 0o666 & ~_umask())


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, fsync it, rename it over ``path``. The
    file gets mode 0666 minus the umask, whatever ``write`` does."""
    fd, tmp = _new_temp_file(path)
    os.close(fd)
    try:
        write(tmp)
        _chmod_as_created(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(model: nn.Module, directory: str | Path, *, head: str) -> Path:
    """Write ``model``'s config.json (recording ``head``, the name its class is registered under) and
    model.safetensors into ``directory`` (created if needed). ``model`` has ``config`` (a ModelConfig) and
    ``tied_weights``, as every ssmkit head does. Returns the directory.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tied = model.tied_weights
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()
               if k not in tied}
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    names = {v: k for k, v in _DTYPES.items()}
    dtype = names.get(next(iter(float_dtypes))) if len(float_dtypes) == 1 else None
    weights = d / WEIGHTS_NAME
    header = {"format": "pt", "ssmkit_head": head}
    _atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata=header))
    meta = {"ssmkit_format": FORMAT_VERSION, "head": head, "dtype": dtype, "weights_sha256": _sha256(weights),
            "config": model.config.to_dict()}
    text = json.dumps(meta, indent=2) + "\n"
    _atomic_write(d / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    _fsync_dir(d)
    return d


# ------------------------------------------------------------------------------------------- reading
def read_checkpoint_config(directory: str | Path, heads: Collection[str]) -> tuple[str, ModelConfig, dict]:
    """Parse and validate ``directory/config.json``: (head name, ModelConfig, the whole metadata dict); the head
    must be one of ``heads``."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such checkpoint directory")
    path = d / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing {CONFIG_NAME} (not an ssmkit checkpoint directory?)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON (truncated or corrupt?): {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    unknown = [k for k in meta if k not in _META_KEYS]
    if unknown:
        raise CheckpointError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                              f"{', '.join(_META_KEYS)}")
    missing = [k for k in ("ssmkit_format", "head", "config") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {', '.join(map(repr, missing))}")
    if meta["ssmkit_format"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: ssmkit_format {meta['ssmkit_format']!r} is not supported (expected "
                              f"{FORMAT_VERSION})")
    if meta["head"] not in heads:
        raise CheckpointError(f"{path}: unknown head {meta['head']!r}; expected one of {', '.join(heads)}")
    if meta.get("dtype") is not None and meta["dtype"] not in _DTYPES:
        raise CheckpointError(f"{path}: unknown dtype {meta['dtype']!r}; expected one of "
                              f"{', '.join(_DTYPES)}")
    try:
        config = ModelConfig.from_dict(meta["config"])
    except ValueError as e:
        raise CheckpointError(f"{path}: config: {e}") from e
    return meta["head"], config, meta


def _read_weights(path: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing {WEIGHTS_NAME}")
    if sha256 is not None and _sha256(path) != sha256:
        raise CheckpointError(f"{path}: SHA-256 does not match the one recorded in {CONFIG_NAME}; the file "
                              f"is corrupt, truncated or from another save")
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError/ValueError) on bad files
        raise CheckpointError(f"{path}: cannot read safetensors weights (truncated or corrupt file?): "
                              f"{type(e).__name__}: {e}") from e


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: str = "weights") -> None:
    """Copy ``tensors`` into ``model`` after checking names, shapes and dtypes; tied aliases are not expected
    (they follow their source). Errors list every missing, unexpected and mismatched name."""
    tied = model.tied_weights
    want = {k: v for k, v in model.state_dict().items() if k not in tied}
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    bad_shape = [f"{k} {tuple(tensors[k].shape)} (expected {tuple(want[k].shape)})"
                 for k in sorted(set(want) & set(tensors)) if tensors[k].shape != want[k].shape]
    bad_dtype = [f"{k} {tensors[k].dtype} (expected {want[k].dtype})"
                 for k in sorted(set(want) & set(tensors))
                 if tensors[k].shape == want[k].shape and tensors[k].dtype != want[k].dtype]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if bad_shape:
        problems.append(f"mis-shaped tensors: {', '.join(bad_shape)}")
    if bad_dtype:
        problems.append(f"wrong dtypes: {', '.join(bad_dtype)}")
    if problems:
        raise CheckpointError(f"{where} do not match {type(model).__name__}: " + "; ".join(problems))
    with torch.no_grad():
        for k, t in want.items():
            t.copy_(tensors[k])


def load_checkpoint(
    directory: str | Path,
    heads: Mapping[str, type[nn.Module]],
    *,
    expected: type[nn.Module] | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Load a checkpoint written by :func:`save_checkpoint`, building ``heads[name]`` for the head name recorded
    in config.json.

    ``expected``: the head class the caller wants (``Model.from_pretrained`` passes its class); a checkpoint
    of another head fails. The model comes back in eval mode, in the saved dtype, on ``device`` (default CPU).
    """
    d = Path(directory)
    head, config, meta = read_checkpoint_config(d, heads)
    cls = heads[head]
    if expected is not None and cls is not expected:
        raise CheckpointError(f"{d / CONFIG_NAME}: the checkpoint holds a {head}, not a {expected.__name__}; "
                              f"use ssmkit.models.load_pretrained to load whatever head it holds")
    tensors = _read_weights(d / WEIGHTS_NAME, meta.get("weights_sha256"))
    try:
        model = cls(config)
    except ValueError as e:
        raise CheckpointError(f"{d / CONFIG_NAME}: cannot build a {head} from its config: {e}") from e
    if meta.get("dtype") is not None:
        model = model.to(_DTYPES[meta["dtype"]])
    if device is not None:
        model = model.to(device)
    load_state(model, tensors, where=str(d / WEIGHTS_NAME))
    return model.eval()
