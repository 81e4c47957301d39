"""Numba kernel of the int8 weight-only matrix-vector product (decode-time linear layers)."""

from __future__ import annotations

import numba as nb
import numpy as np

_ROWS = 64  # output rows per parallel task


@nb.njit(parallel=True, fastmath=True, cache=True)
def int8_gemv(x, w, scale, out):
    """out[b, o] = scale[o] * sum_k x[b, k] * w[o, k]; x (B, K) float32, w (O, K) int8, scale (O,) float32.

    Each weight row is read once from memory for all B inputs (B is small: decode batches), so the product
    moves a quarter of the bytes of a float32 one.
    """
    nrows, k_dim = x.shape
    o_dim = w.shape[0]
    for task in nb.prange((o_dim + _ROWS - 1) // _ROWS):
        for o in range(task * _ROWS, min(o_dim, task * _ROWS + _ROWS)):
            s = scale[o]
            for b in range(nrows):
                acc = np.float32(0.0)
                for k in range(k_dim):
                    acc += x[b, k] * np.float32(w[o, k])
                out[b, o] = acc * s
