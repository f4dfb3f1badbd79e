"""Export and import of model weights: Hugging Face (safetensors + config + tokenizer) and
params-only bundles. `layout.py` is the one name/layout map both directions use."""
