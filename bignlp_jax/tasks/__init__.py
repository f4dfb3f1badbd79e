"""Finetuning tasks: records -> prompt/target token rows (formats.py), batch sources (source.py)."""
