"""Weight interop with other implementations (currently transformers' Mamba and Mamba-2 mixers)."""

from .mixers import (
    load_into_transformers_mixer,
    mamba2_from_transformers_mixer,
    mamba_from_transformers_mixer,
)
from .models import from_transformers, to_transformers

__all__ = [
    "from_transformers",
    "to_transformers",
    "load_into_transformers_mixer", "mamba2_from_transformers_mixer", "mamba_from_transformers_mixer"]
