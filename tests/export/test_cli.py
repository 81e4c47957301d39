"""``ssmkit export`` and ``ssmkit import-gguf`` in process: round trip, tokenizer choice, one-line errors."""

import pytest
import torch

from ssmkit.cli import main
from ssmkit.cli.common import UsageError
from ssmkit.cli.export import _tokenizer
from ssmkit.interop import from_gguf
from ssmkit.models import load_pretrained

from .conftest import small_lm


def _one_line_error(capsys, *needles):
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1, err
    for n in needles:
        assert n in err[0], (n, err[0])


@pytest.mark.parametrize("cmd", ["export", "import-gguf"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: ssmkit {cmd}")


def test_export_then_import_round_trip(tmp_path, capsys):
    model = small_lm("mamba2*2", vocab=264)
    model.save_pretrained(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), "--format", "gguf", "--out", str(tmp_path / "m.gguf"),
                 "--tokenizer", "byte"]) == 0
    assert "f32, tokenizer byte" in capsys.readouterr().out
    assert main(["import-gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back")]) == 0
    assert "--tokenizer byte" in capsys.readouterr().out
    back = load_pretrained(tmp_path / "back")
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert main(["export", str(tmp_path / "model"), "--format", "gguf", "--quant", "q8_0", "--out",
                 str(tmp_path / "q.gguf")]) == 0
    q = from_gguf(tmp_path / "q.gguf")
    ids = torch.randint(0, 264, (1, 20))
    with torch.no_grad():
        assert (q(ids).logits - model(ids).logits).abs().max() < 0.2


def test_errors_are_one_line(tmp_path, capsys):
    small_lm("s4d").save_pretrained(tmp_path / "s4d")
    assert main(["export", str(tmp_path / "s4d"), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    _one_line_error(capsys, "GGUF export supports", "'mamba'", "['s4d']")
    assert main(["export", str(tmp_path / "s4d"), "--format", "onnx", "--quant", "q8_0", "--out",
                 str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "--quant q8_0", "float32")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 20)
    assert main(["import-gguf", str(bad), "--out", str(tmp_path / "never")]) == 2
    _one_line_error(capsys, "corrupt or truncated GGUF")
    assert not (tmp_path / "never").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert main(["import-gguf", str(bad), "--out", str(tmp_path / "full")]) == 2
    _one_line_error(capsys, "not an empty directory")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "o").exists()


def test_tokenizer_choice_from_the_run():
    assert _tokenizer("auto", None) == ("none", None)
    assert _tokenizer("auto", {"task": {"name": "mqar"}}) == ("none", None)
    assert _tokenizer("auto", {"task": {"tokenizer": "gpt2", "bpe_dir": "/x"}}) == ("gpt2", "/x")
    assert _tokenizer("none", {"task": {"tokenizer": "byte"}}) == ("none", None)
    with pytest.raises(UsageError, match=r"tokenizer 'tok.json' cannot be embedded .* --tokenizer none"):
        _tokenizer("auto", {"task": {"tokenizer": "tok.json"}})
