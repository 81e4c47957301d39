"""Models assembled from a :class:`ModelConfig`: a backbone of pre-norm residual blocks around ssmkit layers,
task heads, and safetensors checkpoints.

    from ssmkit.models import ModelConfig, CausalLM
    cfg = ModelConfig(d_model=256, pattern="mamba2*3,attn,mamba2*3", vocab_size=256, mlp="swiglu")
    model = CausalLM(cfg)
    out = model(input_ids, labels=labels)          # labels[:, t] is the target of position t; -100 ignored
    model.save_pretrained("ckpt"); model = load_pretrained("ckpt")
"""

from .backbone import Backbone
from .blocks import MLP, Block, Norm
from .checkpoint import CheckpointError, load_state
from .config import ModelConfig, compress_pattern, parse_pattern
from .heads import (
    HEADS,
    IGNORE_INDEX,
    CausalLM,
    Forecaster,
    PrefixLM,
    Regressor,
    SequenceClassifier,
    SequenceModel,
    model_class,
)
from .outputs import ClassifierOutput, LMOutput, ModelState, RegressionOutput
from .pretrained import load_pretrained, read_config, save_pretrained
from .registry import MIXERS, mixer_names

__all__ = [
    "Backbone", "Block", "CausalLM", "CheckpointError", "ClassifierOutput", "Forecaster", "HEADS",
    "IGNORE_INDEX", "LMOutput", "MIXERS", "MLP", "ModelConfig", "ModelState", "Norm", "PrefixLM",
    "RegressionOutput", "Regressor", "SequenceClassifier", "SequenceModel", "compress_pattern",
    "load_pretrained", "load_state", "mixer_names", "model_class", "parse_pattern", "read_config",
    "save_pretrained",
]
