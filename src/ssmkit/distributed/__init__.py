"""Scale-out on ``torch.distributed``: data parallel training and exact sequence parallelism (docs/distributed.md).

:mod:`ssmkit.distributed.env` finds this process's rank and world size (from torchrun's environment) and joins
or leaves the process group with a bounded timeout; :mod:`ssmkit.distributed.data_parallel` shards global
batches, wraps models in ``DistributedDataParallel`` and shares values between ranks;
:mod:`ssmkit.distributed.sequence` splits sequences over ranks (:class:`SequenceParallel`, :func:`shard_sequence`).
"""

from .data_parallel import (
    average_gradients,
    broadcast_from_main,
    check_global_batch,
    data_parallel_layout,
    gather_to_main,
    rank_seed,
    run_on_main,
    sequence_parallel_group,
    shard_rows,
    sum_over_ranks,
    wrap_model,
)
from .env import BACKENDS, DistEnv, current, detect, init_process_group, process_group, resolve_backend
from .sequence import SequenceParallel, gather_sequence, shard_sequence

__all__ = [
    "BACKENDS", "DistEnv", "average_gradients", "broadcast_from_main", "check_global_batch", "current",
    "data_parallel_layout", "detect", "gather_to_main", "init_process_group", "process_group", "rank_seed",
    "resolve_backend", "run_on_main", "sequence_parallel_group", "shard_rows", "sum_over_ranks", "wrap_model",
    "SequenceParallel", "gather_sequence", "shard_sequence",
]
