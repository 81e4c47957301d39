"""ssmkit: state space sequence models that run fast on CPU, exact in every mode."""

__version__ = "0.1.0"
