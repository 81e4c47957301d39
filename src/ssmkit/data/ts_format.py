"""Reader for the .ts time-series classification format (UCR/UEA archive, as shipped by aeon).

Format: optional ``#`` comment lines; ``@key value`` header lines (``@problemName``, ``@timeStamps``,
``@univariate``, ``@dimensions``, ``@equalLength``, ``@seriesLength``, ``@classLabel true l1 l2 ...``,
``@missing``) up to ``@data``; then one case per line: the dimensions separated by ``:``, values inside a
dimension by ``,`` (``?`` = missing), and, when ``@classLabel true``, the label as the last ``:`` field.
Only numpy is imported here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_ts(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Parse a .ts file -> (X (cases, dims, length) float64 with NaN for '?', labels (cases,) str, header).

    Raises ValueError (naming the file and line) for time-stamped data, unequal lengths or dimension counts,
    non-numeric values or a label outside the declared ``@classLabel`` list.
    """
    header: dict[str, str] = {}
    rows: list[list[list[float]]] = []
    labels: list[str] = []
    in_data = False
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{path}:{lineno}"
            if not in_data:
                if not line.startswith("@"):
                    raise ValueError(f"{where}: expected a @header line or @data before the data")
                key, _, value = line[1:].partition(" ")
                key = key.lower()
                if key == "data":
                    in_data = True
                    if header.get("timestamps", "false").lower() == "true":
                        raise ValueError(f"{path}: time-stamped .ts data is not supported")
                else:
                    header[key] = value.strip()
                continue
            fields = line.split(":")
            has_label = header.get("classlabel", "false").split(" ")[0].lower() == "true"
            if has_label:
                if len(fields) < 2:
                    raise ValueError(f"{where}: expected dimensions followed by ':label'")
                labels.append(fields[-1].strip())
                fields = fields[:-1]
            case = []
            for dim in fields:
                try:
                    case.append([float("nan") if v.strip() == "?" else float(v) for v in dim.split(",")])
                except ValueError:
                    raise ValueError(f"{where}: non-numeric value in {dim[:40]!r}") from None
            if rows and (len(case) != len(rows[0]) or any(len(c) != len(rows[0][0]) for c in case)):
                raise ValueError(
                    f"{where}: case has {len(case)} dimension(s) of length(s) {sorted({len(c) for c in case})}, "
                    f"but the first case has {len(rows[0])} of length {len(rows[0][0])}; unequal-length series "
                    "are not supported (resample them to one length)"
                )
            if len(case) > 1 and len({len(c) for c in case}) > 1:
                raise ValueError(f"{where}: dimensions of unequal length")
            rows.append(case)
    if not rows:
        raise ValueError(f"{path}: no data cases found")
    declared = header.get("classlabel", "").split()[1:]
    if declared:
        unknown = sorted(set(labels) - set(declared))
        if unknown:
            raise ValueError(f"{path}: labels {unknown} are not in the declared @classLabel list {declared}")
    return np.asarray(rows, dtype=np.float64), np.asarray(labels, dtype=str), header


def find_ts_files(directory: str | Path, dataset: str) -> dict[str, Path]:
    """{"train": ..., "test": ...} for ``DATASET_TRAIN.ts``/``DATASET_TEST.ts`` in ``directory`` or its
    ``DATASET/`` subdirectory (the archive's layout); missing splits are left out."""
    out = {}
    for split in ("train", "test"):
        for base in (Path(directory), Path(directory) / dataset):
            candidate = base / f"{dataset}_{split.upper()}.ts"
            if candidate.is_file():
                out[split] = candidate
                break
    return out
