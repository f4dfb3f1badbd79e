"""The pretrain -> finetune -> evaluate -> export pipeline (`bignlp-jax pipeline`)."""
