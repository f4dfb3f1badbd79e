"""Inference: batched autoregressive generation with a key/value cache."""
