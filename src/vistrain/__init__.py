"""vistrain: one training engine for VAR, small vision-language models and GANs."""

__version__ = "0.1.0"
