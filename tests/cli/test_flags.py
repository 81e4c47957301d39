"""Every numeric flag is range-checked by the parser: bad values give one line and status 2, before any work."""

from __future__ import annotations

import json

import pytest

from ssmkit.cli import build_parser, main


def _subparsers():
    return build_parser()._subparsers._group_actions[0].choices


def test_no_numeric_flag_takes_raw_int_or_float():
    """A flag with type=int or type=float would accept -1, 0 or nan unchecked; every numeric flag must use a
    range-checking parser (ssmkit.cli.common.int_at_least / float_in)."""
    numeric = []
    for name, sub in _subparsers().items():
        for action in sub._actions:
            assert action.type not in (int, float), (name, action.option_strings)
            if action.type is not None:
                numeric.append((name, action.option_strings[-1]))
    assert sorted(numeric) == sorted(BAD_VALUES_BY_FLAG)  # every numeric flag is exercised below


BAD_VALUES_BY_FLAG = {
    ("eval", "--batch-size"): [("0", "expected an int >= 1, got 0"), ("x", "expected an int >= 1, got 'x'")],
    ("eval", "--max-batches"): [("-1", "expected an int >= 0 (0 = all), got -1")],
    ("generate", "--example"): [("-1", "expected an int >= 0, got -1")],
    ("generate", "--max-new-tokens"): [("0", "expected an int >= 1, got 0")],
    ("generate", "--temperature"): [("-0.5", "got -0.5"), ("nan", "got nan"), ("inf", "got inf")],
    ("generate", "--top-k"): [("0", "expected an int >= 1, got 0")],
    ("generate", "--top-p"): [("0", "expected a finite number in (0, 1], got 0"), ("1.5", "got 1.5")],
    ("generate", "--seed"): [("-3", "expected an int >= 0, got -3")],
    ("models", "--vocab-size"): [("0", "expected an int >= 1, got 0")],
    ("train", "--nproc"): [("0", "expected an int >= 1, got 0")],
    ("train", "--dist-timeout"): [("0", "expected a finite number in (0, inf), got 0"), ("nan", "got nan")],
    ("generate", "--num-draft"): [("0", "expected an int >= 1, got 0")],
    ("reproduce", "--seeds"): [("0", "expected an int >= 1, got 0")],
    ("reproduce", "--steps"): [("0", "expected an int >= 1, got 0")],
    ("forecast", "--horizon"): [("0", "expected an int >= 1, got 0")],
    ("forecast", "--season"): [("0", "expected an int >= 1, got 0")],
    ("forecast", "--context"): [("1", "expected an int >= 2, got 1")],
    ("forecast", "--steps"): [("0", "expected an int >= 1, got 0")],
    ("forecast", "--seeds"): [("0", "expected an int >= 1, got 0")],
    ("forecast", "--threads"): [("0", "expected an int >= 1, got 0")],
}


@pytest.mark.parametrize("flag", sorted(BAD_VALUES_BY_FLAG))
def test_bad_numeric_values_are_one_line_errors(flag, capsys, tmp_path):
    command, option = flag
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval_val.json").write_text('{"metrics": {"accuracy": 0.5}}')
    for value, needle in BAD_VALUES_BY_FLAG[flag]:
        argv = [command, *([str(run)] if command in ("eval", "generate") else []), f"{option}={value}"]
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert out == "" and len(lines) == 1, err
        assert lines[0].startswith(f"ssmkit {command}: error: argument {option}: ") and needle in lines[0], lines
    assert json.loads((run / "eval_val.json").read_text()) == {"metrics": {"accuracy": 0.5}}  # untouched
