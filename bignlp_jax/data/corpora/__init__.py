"""Data that ships with bignlp_jax: the embedded stdlib corpora and synthetic data."""
