"""``ssmkit generate`` on a model converted from transformers, with a tokenizer.json: the text equals
transformers' greedy continuation (a small random MambaForCausalLM and a tokenizer built here; no download)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ssmkit.cli import main  # noqa: E402
from ssmkit.data import get_tokenizer  # noqa: E402
from ssmkit.interop.models import from_transformers  # noqa: E402
from tests.data.test_tokenizers import build_tokenizer_json  # noqa: E402

transformers = pytest.importorskip("transformers")


def test_generate_text_from_a_converted_model_dir(tmp_path, capsys):
    tj = build_tokenizer_json(tmp_path / "tokenizer.json")
    tok = get_tokenizer(str(tj))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = transformers.MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=2,
                                       vocab_size=tok.vocab_size + 3, pad_token_id=None, bos_token_id=None,
                                       eos_token_id=None)
        hf = transformers.MambaForCausalLM(cfg).eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(torch.randn(p.shape) * 0.3)
    model_dir = tmp_path / "mamba-tiny"
    from_transformers(hf).save_pretrained(model_dir)
    prompt = "the cat sat"
    ids = torch.tensor([tok.encode(prompt)])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        new = hf.generate(ids, max_new_tokens=10, eos_token_id=tok.eos_id)[0, ids.shape[1]:].tolist()
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id) + 1]

    assert main(["generate", str(model_dir), "--tokenizer", str(tj), "--prompt", prompt,
                 "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert f"prompt ({ids.shape[1]} tokens): {prompt!r}" in out
    assert f"generated ({len(new)} tokens): {tok.decode(new)!r}" in out
    (model_dir / "tokenizer.json").write_bytes(tj.read_bytes())  # a model directory's own tokenizer is used
    assert main(["generate", str(model_dir), "--prompt", prompt, "--max-new-tokens", "10"]) == 0
    def same(text: str) -> list[str]:  # everything but the checkpoint path and the (timing) tokens/s line
        return [x for x in text.splitlines()[1:] if "tokens/s" not in x]

    assert same(capsys.readouterr().out) == same(out)

    # a bare model directory has no task for --example; a tokenizer larger than the model is refused
    assert main(["generate", str(model_dir), "--example", "0"]) == 2
    assert "--example needs a run directory with a task" in capsys.readouterr().err
    tiny_vocab = tmp_path / "tiny-vocab"
    from_transformers(transformers.MambaForCausalLM(transformers.MambaConfig(
        hidden_size=8, state_size=2, num_hidden_layers=1, vocab_size=16))).save_pretrained(tiny_vocab)
    assert main(["generate", str(tiny_vocab), "--tokenizer", str(tj), "--prompt", "a"]) == 2
    assert f"has {tok.vocab_size} tokens, more than the model's vocab_size=16" in capsys.readouterr().err


def test_generate_with_a_draft_prints_the_same_tokens_and_the_acceptance(tmp_path, capsys):
    """--draft (another model directory or self:N), --num-draft and --tree: the generated ids equal plain greedy
    decoding's (float64 models), and the acceptance rate and tokens/s are printed; bad flags are one-line errors."""
    from tests.infer.util import tiny_model

    target, draft = tmp_path / "target", tmp_path / "draft"
    tiny_model("mamba,attn,mamba2").save_pretrained(target)
    tiny_model("mamba", seed=3).save_pretrained(draft)
    base = ["generate", str(target), "--prompt", "1 5 2 7", "--max-new-tokens", "12"]
    assert main(base) == 0
    plain = [x for x in capsys.readouterr().out.splitlines() if x.startswith("generated")]
    assert len(plain) == 1
    for extra in (["--draft", str(draft)], ["--draft", str(draft), "--num-draft", "3"],
                  ["--draft", str(draft), "--tree", "2,2"], ["--draft", "self:2", "--num-draft", "2"]):
        assert main(base + extra) == 0, extra
        out = capsys.readouterr().out
        assert [x for x in out.splitlines() if x.startswith("generated")] == plain, extra
        assert "tokens/s, acceptance rate " in out and "tokens per target pass" in out
    bad = [(["--num-draft", "2"], "--num-draft and --tree need --draft"),
           (["--draft", str(draft), "--tree", "2"], "--tree must be B,D"),
           (["--draft", "self:3"], "n_layers must be an int in [1, 2]"),
           (["--draft", str(draft), "--tree", "2,2", "--temperature", "0.5"], "greedy decoding only")]
    from ssmkit.models import CausalLM, ModelConfig

    CausalLM(ModelConfig(d_model=8, pattern="mamba", vocab_size=5)).save_pretrained(tmp_path / "v5")
    bad.append((["--draft", str(tmp_path / "v5")], "has vocab_size=5 but the model has"))
    for extra, msg in bad:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, (extra, err)
