"""TFDS datasets in ArrayRecord format: build from records or local files, read."""
