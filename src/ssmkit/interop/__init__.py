"""Weight interop with other implementations: transformers' Mamba, Mamba-2 and hybrid LMs (FalconMamba, Bamba,
NemotronH, Jamba, GraniteMoeHybrid, FalconH1, Zamba2, RecurrentGemma), and llama.cpp's GGUF files."""

from .gguf import from_gguf
from .mixers import (
    copy_mixer_to_transformers,
    load_into_transformers_mixer,
    mamba2_from_transformers_mixer,
    mamba_from_transformers_mixer,
    mixer_from_transformers,
    mixer_to_transformers,
)
from .models import from_transformers, to_transformers

__all__ = [
    "from_gguf",
    "from_transformers",
    "to_transformers",
    "mixer_from_transformers", "mixer_to_transformers", "copy_mixer_to_transformers",
    # deprecated aliases (DeprecationWarning): mixer_from_transformers / copy_mixer_to_transformers
    "load_into_transformers_mixer", "mamba2_from_transformers_mixer", "mamba_from_transformers_mixer"]
