"""GGUF (llama.cpp's file format) for Mamba and Mamba-2 language models: the name mapping and the reader.

An ssmkit CausalLM whose layers are all "mamba" (all "mamba2"), with RMSNorm and no MLP, is llama.cpp's
``mamba`` (``mamba2``) architecture. Tensors, in ggml's order of dims reversed (numpy shape shown):

    backbone.embedding.weight           token_embd.weight          (vocab, d_model)
    backbone.final_norm.weight          output_norm.weight
    lm_head.weight                      output.weight              (absent when tied to the embedding)
    blocks.{i}.norm.weight              blk.{i}.attn_norm.weight
    blocks.{i}.mixer.in_proj.weight     blk.{i}.ssm_in.weight
    blocks.{i}.mixer.conv1d.weight      blk.{i}.ssm_conv1d.weight  (channels, 1, K) -> (channels, K)
    blocks.{i}.mixer.conv1d.bias        blk.{i}.ssm_conv1d.bias
    blocks.{i}.mixer.x_proj.weight      blk.{i}.ssm_x.weight       (Mamba)
    blocks.{i}.mixer.dt_proj.weight     blk.{i}.ssm_dt.weight      (Mamba)
    blocks.{i}.mixer.dt_proj.bias       blk.{i}.ssm_dt.bias        (Mamba; Mamba-2: mixer.dt_bias)
    blocks.{i}.mixer.A_log              blk.{i}.ssm_a              A = -exp(A_log); Mamba-2: (nheads, 1)
    blocks.{i}.mixer.D                  blk.{i}.ssm_d              Mamba-2: (nheads, 1)
    blocks.{i}.mixer.norm.weight        blk.{i}.ssm_norm.weight    (Mamba-2; (ngroups, d_inner / ngroups))
    blocks.{i}.mixer.out_proj.weight    blk.{i}.ssm_out.weight

ssmkit also writes keys llama.cpp ignores: ``ssmkit.config`` (the ModelConfig as JSON), ``ssmkit.tokenizer``
and ``ssmkit.blk.{i}.a_log`` (A_log itself, since log(-A) does not give back A_log bit for bit), so that
ssmkit -> GGUF -> ssmkit is exact in float32. Files without them (e.g. from llama.cpp's converter) get their
config from the llama.cpp keys and A_log = log(-A) computed in float64.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..models.checkpoint import load_state
from ..models.config import ModelConfig
from ..models.heads import CausalLM

ARCHS = ("mamba", "mamba2")
CONFIG_KEY = "ssmkit.config"
TOKENIZER_KEY = "ssmkit.tokenizer"
A_LOG_KEY = "ssmkit.blk.{bid}.a_log"

#: per-layer (ssmkit name under backbone.blocks.{i}, gguf MODEL_TENSOR name, suffix) for each architecture
_COMMON = [("norm.weight", "ATTN_NORM", "weight"), ("mixer.in_proj.weight", "SSM_IN", "weight"),
           ("mixer.conv1d.weight", "SSM_CONV1D", "weight"), ("mixer.conv1d.bias", "SSM_CONV1D", "bias"),
           ("mixer.A_log", "SSM_A", None), ("mixer.D", "SSM_D", None),
           ("mixer.out_proj.weight", "SSM_OUT", "weight")]
_LAYER_TENSORS = {
    "mamba": _COMMON + [("mixer.x_proj.weight", "SSM_X", "weight"), ("mixer.dt_proj.weight", "SSM_DT", "weight"),
                        ("mixer.dt_proj.bias", "SSM_DT", "bias")],
    "mamba2": _COMMON + [("mixer.dt_bias", "SSM_DT", "bias"), ("mixer.norm.weight", "SSM_NORM", "weight")],
}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"GGUF needs the package 'gguf' (import failed: {e}); install it with "
                          f"pip install 'ssmkit[export]'") from e
    return gguf


def tensor_names(arch: str, n_layers: int, tied: bool) -> dict[str, str]:
    """{ssmkit parameter name: GGUF tensor name} for a CausalLM of ``arch`` ("mamba" | "mamba2")."""
    gguf = _gguf()
    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    out = {"backbone.embedding.weight": names[T.TOKEN_EMBD] + ".weight",
           "backbone.final_norm.weight": names[T.OUTPUT_NORM] + ".weight"}
    if not tied:
        out["lm_head.weight"] = names[T.OUTPUT] + ".weight"
    for i in range(n_layers):
        for ours, kind, suffix in _LAYER_TENSORS[arch]:
            base = names[getattr(T, kind)].format(bid=i)
            out[f"backbone.blocks.{i}.{ours}"] = base + (f".{suffix}" if suffix else "")
    return out


# ------------------------------------------------------------------------------------------- reading
def _fail(path: Path, msg: str) -> ValueError:
    return ValueError(f"from_gguf: {path}: {msg}")


def _open(path: Path) -> Any:
    gguf = _gguf()
    if not path.is_file():
        raise FileNotFoundError(f"from_gguf: {path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise _fail(path, f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on damaged files
        raise _fail(path, f"corrupt or truncated GGUF ({type(e).__name__}: {e})") from None


def _fields(reader: Any) -> dict[str, Any]:
    out = {}
    for name, field in reader.fields.items():
        try:
            out[name] = field.contents()
        except Exception:  # a value we cannot decode is one we do not read
            continue
    return out


def _key(kv: dict[str, Any], path: Path, key: str) -> Any:
    if key not in kv:
        raise _fail(path, f"missing metadata key {key!r}")
    return kv[key]


def _config_from_keys(kv: dict[str, Any], arch: str, path: Path, vocab: int, tied: bool) -> ModelConfig:
    """The ModelConfig that llama.cpp's keys determine (other settings at ssmkit's defaults)."""
    def k(name: str) -> int:
        return int(_key(kv, path, f"{arch}.{name}"))

    d_model, n_layers = k("embedding_length"), k("block_count")
    d_inner, d_state, d_conv, rank = k("ssm.inner_size"), k("ssm.state_size"), k("ssm.conv_kernel"), \
        k("ssm.time_step_rank")
    # stored as float32: take the shortest decimal that gives the same float32 (1e-05, not 9.9999997e-06)
    eps = float(str(np.float32(_key(kv, path, f"{arch}.attention.layer_norm_rms_epsilon"))))
    expand = d_inner // d_model if d_inner % d_model == 0 else d_inner / d_model
    opts: dict[str, Any] = {"d_state": d_state, "d_conv": d_conv, "expand": expand}
    if arch == "mamba":
        if kv.get(f"{arch}.ssm.dt_b_c_rms"):
            raise _fail(path, "ssm.dt_b_c_rms=true (Falcon-Mamba's extra norms) is not supported by ssmkit")
        opts["dt_rank"] = rank
    else:
        if d_inner % rank:
            raise _fail(path, f"ssm.time_step_rank={rank} (the number of heads) must divide ssm.inner_size="
                              f"{d_inner}")
        opts.update(headdim=d_inner // rank, ngroups=k("ssm.group_count"), norm_eps=eps)
    return ModelConfig(d_model=d_model, n_layers=n_layers, pattern=arch, vocab_size=vocab,
                       mixer_options={arch: opts}, norm="rmsnorm", norm_eps=eps, mlp="none",
                       tie_embeddings=tied, dropout=0.0)


def _dequantize(t: Any) -> np.ndarray:
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
    data = np.asarray(t.data)
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16,
                 gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)
    raise ValueError(f"tensor {t.name!r} has type {qtype.name}; supported: F32, F16, BF16, Q8_0, Q4_0")


def read_gguf(path: str | Path) -> tuple[CausalLM, dict[str, Any]]:
    """(model, metadata) from a Mamba / Mamba-2 GGUF file; see :func:`from_gguf`."""
    path = Path(path)
    reader = _open(path)
    kv = _fields(reader)
    arch = kv.get("general.architecture")
    if arch not in ARCHS:
        raise _fail(path, f"architecture {arch!r} is not supported; ssmkit reads {', '.join(map(repr, ARCHS))}")
    tensors = {t.name: t for t in reader.tensors}
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise _fail(path, "missing tensor 'token_embd.weight'")
    vocab = int(emb.shape[-1])  # ggml order: (d_model, vocab)
    tied = "output.weight" not in tensors
    if CONFIG_KEY in kv:
        try:
            config = ModelConfig.from_dict(json.loads(kv[CONFIG_KEY]))
        except (ValueError, TypeError) as e:
            raise _fail(path, f"bad {CONFIG_KEY}: {e}") from None
        if config.vocab_size != vocab or config.tie_embeddings != tied:
            raise _fail(path, f"{CONFIG_KEY} (vocab_size={config.vocab_size}, tie_embeddings="
                              f"{config.tie_embeddings}) disagrees with the tensors (vocab {vocab}, tied={tied})")
    else:
        config = _config_from_keys(kv, arch, path, vocab, tied)
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the global RNG untouched
        try:
            model = CausalLM(config)
        except ValueError as e:
            raise _fail(path, f"cannot build the model its metadata describes: {e}") from None
    names = tensor_names(arch, config.n_layers, config.tie_embeddings)
    if set(model.backbone.mixer_names) != {arch}:
        raise _fail(path, f"{CONFIG_KEY} describes layers {model.backbone.mixer_names}, not all {arch!r}")
    extra = sorted(set(tensors) - set(names.values()))
    if extra:
        raise _fail(path, f"unexpected tensors for architecture {arch!r}: {', '.join(extra[:5])}")
    want = {k: v for k, v in model.state_dict().items() if k not in model.tied_weights}
    out: dict[str, Tensor] = {}
    for ours, theirs in names.items():
        if theirs not in tensors:
            raise _fail(path, f"missing tensor {theirs!r}")
        try:
            arr = _dequantize(tensors[theirs])
        except ValueError as e:
            raise _fail(path, str(e)) from None
        shape = tuple(want[ours].shape)
        if arr.size != math.prod(shape):
            raise _fail(path, f"tensor {theirs!r} has shape {tuple(arr.shape)}; expected {math.prod(shape)} "
                              f"values for {ours} {shape}")
        t = torch.from_numpy(arr.copy()).reshape(shape)
        if ours.endswith("A_log"):
            try:
                t = _a_log(t, kv.get(A_LOG_KEY.format(bid=ours.split(".")[2])))
            except ValueError as e:
                raise _fail(path, f"{theirs}: {e}") from None
        out[ours] = t
    load_state(model, out, where=f"GGUF {path}")
    return model.eval(), kv


def _a_log(a: Tensor, stored: Any) -> Tensor:
    """A_log from A = -exp(A_log): ssmkit's stored copy when it reproduces A exactly, else log(-A) in float64."""
    if stored is not None and len(stored) == a.numel():
        a_log = torch.tensor(np.asarray(stored, dtype=np.float32)).reshape(a.shape)
        if torch.equal(-torch.exp(a_log), a):
            return a_log
    if bool((a >= 0).any()):
        raise ValueError("ssm_a has entries >= 0; A = -exp(A_log) must be negative")
    return torch.log(-a.double()).float()


def from_gguf(path: str | Path) -> CausalLM:
    """An ssmkit CausalLM (float32, eval mode) from a llama.cpp ``mamba`` / ``mamba2`` GGUF file (tensors in
    F32, F16, BF16, Q8_0 or Q4_0, dequantized with gguf's own code). ssmkit's own exports come back exactly
    (f32) or as their dequantized values; other files get their config from llama.cpp's metadata keys."""
    return read_gguf(path)[0]


def tokenizer_of(kv: dict[str, Any]) -> str | None:
    """The ssmkit tokenizer name recorded by ssmkit's exporter ('byte', 'gpt2'), if any."""
    name = kv.get(TOKENIZER_KEY)
    return name if name in ("byte", "gpt2") else None


def tokenizer_json(kv: dict[str, Any]) -> str | None:
    """A Hugging Face tokenizer.json (byte-level BPE) rebuilt from a GGUF ``gpt2`` vocabulary with merges, or
    None for other vocabularies. Needs the ``tokenizers`` package. Merges that cannot produce a token of the
    vocabulary are left out."""
    if kv.get("tokenizer.ggml.model") != "gpt2" or "tokenizer.ggml.merges" not in kv:
        return None
    import tokenizers

    tokens = list(kv["tokenizer.ggml.tokens"])
    types = list(kv.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = []
    for m in kv["tokenizer.ggml.merges"]:
        cut = m.find(" ", 1)
        a, b = m[:cut], m[cut + 1:]
        # a merge whose parts or result are not tokens (e.g. a vocabulary cut to the model's size) never yields a
        # token: llama.cpp falls back to smaller pieces there, and the tokenizers library rejects it
        if cut > 0 and a in vocab and b in vocab and a + b in vocab:
            merges.append((a, b))
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tokenizers.decoders.ByteLevel()
    control = 3  # gguf.TokenType.CONTROL
    special = [tokenizers.AddedToken(t, special=True) for t, ty in zip(tokens, types, strict=False)
               if int(ty) == control]
    if special:
        tok.add_special_tokens(special)
    return tok.to_str()
