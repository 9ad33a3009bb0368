"""cpt: continual pre-training of causal language models."""

__version__ = "0.1.0"
