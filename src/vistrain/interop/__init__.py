"""Weights of other projects <-> vistrain models, as explicit key maps checked by parity tests."""
