"""Finetuning tasks: records -> prompt/target token rows (formats.py), batch sources (source.py).

Part of data/: the shared train loop builds a finetuning run's batch source from its config."""
