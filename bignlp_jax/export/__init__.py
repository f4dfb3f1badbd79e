"""The `export` and `import` commands: Hugging Face directories (through hf/) and params-only
bundles (bundle.py)."""
