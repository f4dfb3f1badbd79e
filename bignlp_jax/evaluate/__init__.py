"""Evaluation: metric functions, label scoring, and `bignlp-jax eval`."""
