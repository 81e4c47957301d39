"""Registry, parameter validation and the string parsing the CLI uses."""

from __future__ import annotations

import pytest

from ssmkit.data import (
    TASKS,
    MissingDataError,
    format_task_list,
    get_task,
    get_task_class,
    list_tasks,
    parse_task_params,
)

EXPECTED = {"mqar", "phonebook", "selective_copy", "induction_heads", "copying", "joint_recall", "listops",
            "sdigits", "sfashion", "ucr", "forecast", "text"}


def test_registry_names_and_listing():
    assert set(TASKS) == EXPECTED
    infos = {i.name: i for i in list_tasks()}
    assert set(infos) == EXPECTED
    for name, info in infos.items():
        cls = TASKS[name]
        assert info.kind in ("lm", "classification", "forecast")
        assert info.description and "\n" not in info.description
        assert info.metric == cls.metric
        assert cls.__doc__ and "chance" in cls.__doc__.lower()  # the metric and its chance level are documented
        names = [p.name for p in info.params]
        assert names == sorted(names, key=lambda n: n in cls.Params.common_fields)  # task's own params first
        for p in info.params:
            assert p.help, (name, p.name)
    mqar = {p.name: p for p in infos["mqar"].params}
    assert mqar["vocab_size"].default == 8192 and mqar["vocab_size"].type == "int"
    assert mqar["vocab_size"].constraint == ">= 4"
    assert mqar["num_train"].common
    text = {p.name: p for p in infos["text"].params}
    assert text["path"].required and text["path"].default is None
    listing = format_task_list()
    for name in EXPECTED:
        assert name in listing
    assert "REQUIRED" in listing and "num_train (int)" not in listing
    assert "num_train (int)" in format_task_list(common=True)


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="unknown task 'nope'") as e:
        get_task("nope")
    for name in EXPECTED:
        assert name in str(e.value)


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown parameter") as e:
        get_task("mqar", vocab=64)
    assert "vocab_size" in str(e.value) and "num_pairs" in str(e.value)
    with pytest.raises(ValueError, match="valid parameters"):
        parse_task_params("copying", {"lagg": "3"})


@pytest.mark.parametrize(
    "task, params, pattern",
    [
        ("mqar", {"vocab_size": 2}, r"mqar: vocab_size=2 is invalid: must be >= 4"),
        ("mqar", {"vocab_size": 64, "seq_len": 32, "num_pairs": 17}, r"num_pairs=17 is invalid: need 2\*num_pairs"),
        ("mqar", {"vocab_size": 64, "seq_len": 32, "num_pairs": 9}, r"seq_len=32 is invalid: .*seq_len >= 36"),
        ("phonebook", {"num_entries": 2, "max_queries": 3}, r"max_queries=3 is invalid: need max_queries <= num_"),
        ("mqar", {"vocab_size": 64, "seq_len": 64}, r"seq_len=64 is invalid: need seq_len < vocab_size=64"),
        ("mqar", {"power_a": 0.0}, r"power_a=0.0 is invalid: must be > 0.0"),
        ("selective_copy", {"seq_len": 4, "num_tokens": 5}, r"num_tokens=5 is invalid"),
        ("joint_recall", {"num_contexts": 2, "num_pairs": 2, "num_queries": 5}, r"num_queries=5 is invalid"),
        ("phonebook", {"min_queries": 3, "max_queries": 2}, r"max_queries=2 is invalid"),
        ("phonebook", {"question": "middle"}, r"question='middle' is invalid: must be one of 'before'"),
        ("listops", {"min_length": 10, "max_length": 5}, r"max_length=5 is invalid"),
        ("listops", {"min_length": 100, "max_depth": 2, "max_args": 3}, r"min_length=100 is invalid: .*at most 5"),
        ("forecast", {"season": 100, "context": 50}, r"season=100 is invalid"),
        ("forecast", {"source": "csv"}, r"path='' is invalid"),
        ("text", {"path": ""}, r"path='' is invalid"),
        ("copying", {"num_train": 0}, r"num_train=0 is invalid: must be >= 1"),
    ],
)
def test_bad_values_name_parameter_value_and_constraint(task, params, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_task(task, **params)


def test_wrong_types_are_type_errors():
    with pytest.raises(TypeError, match=r"mqar: seq_len='64' is invalid: expected int, got str"):
        get_task("mqar", seq_len="64")
    with pytest.raises(TypeError, match="expected int, got bool"):
        get_task("copying", lag=True)
    with pytest.raises(TypeError, match="expected bool"):
        get_task("sdigits", permute=1)
    with pytest.raises(TypeError, match="path=None"):
        get_task("text", path=None)
    with pytest.raises(TypeError, match=r"^text: parameter 'path' is required \(text file"):
        get_task("text")  # a required parameter


def test_parse_task_params_and_round_trip():
    parsed = parse_task_params("mqar", {"vocab_size": "128", "seq_len": "64", "power_a": "0.5"})
    assert parsed == {"vocab_size": 128, "seq_len": 64, "power_a": 0.5}
    assert parse_task_params("sdigits", {"permute": "yes", "mode": "pixel"}) == {"permute": True, "mode": "pixel"}
    with pytest.raises(ValueError, match=r"mqar: seq_len='6x4' is invalid: expected int"):
        parse_task_params("mqar", {"seq_len": "6x4"})
    with pytest.raises(ValueError, match="expected bool"):
        parse_task_params("sdigits", {"permute": "maybe"})
    task = get_task("mqar", **parsed)
    d = task.to_dict()
    assert d["name"] == "mqar" and d["params"]["vocab_size"] == 128
    again = get_task(d["name"], **d["params"])
    assert again.params == task.params
    assert "MQAR(vocab_size=128" in repr(task)
    assert get_task_class("listops") is TASKS["listops"]


def test_missing_data_error_names_the_install(tmp_path):
    with pytest.raises(MissingDataError, match="apt-get install dataset-fashion-mnist"):
        get_task("sfashion", data_dir=str(tmp_path))


def test_int_accepted_for_float_and_stored_as_float():
    task = get_task("mqar", vocab_size=64, seq_len=32, num_pairs=2, power_a=1)
    assert isinstance(task.params.power_a, float)
