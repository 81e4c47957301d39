"""Weight interop with other implementations: transformers' Mamba and Mamba-2, and llama.cpp's GGUF files."""

from .gguf import from_gguf
from .mixers import (
    load_into_transformers_mixer,
    mamba2_from_transformers_mixer,
    mamba_from_transformers_mixer,
)
from .models import from_transformers, to_transformers

__all__ = [
    "from_gguf",
    "from_transformers",
    "to_transformers",
    "load_into_transformers_mixer", "mamba2_from_transformers_mixer", "mamba_from_transformers_mixer"]
