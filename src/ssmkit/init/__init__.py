"""Initialisations: HiPPO matrices and their NPLR form, diagonal (S4D, PTD) state matrices, timescales.

Pure functions returning float64 / complex128 tensors; layers cast them to their own dtype.
"""

from .diagonal import PTD, S4D_INITS, ptd, s4d_init
from .dt import check_dt_range, inverse_softplus, log_uniform_dt
from .hippo import MEASURES, NPLR, hippo, hippo_fout, hippo_legs, hippo_legt, low_rank, nplr, nplr_dense

__all__ = [
    "MEASURES",
    "NPLR",
    "PTD",
    "S4D_INITS",
    "check_dt_range",
    "hippo",
    "hippo_fout",
    "hippo_legs",
    "hippo_legt",
    "inverse_softplus",
    "log_uniform_dt",
    "low_rank",
    "nplr",
    "nplr_dense",
    "ptd",
    "s4d_init",
]
