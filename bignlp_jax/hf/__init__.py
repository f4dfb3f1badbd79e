"""The Hugging Face format, both directions: architecture (arch.py), the one name/layout map
(layout.py), safetensors files (st_files.py), tokenizer files (tokenizer.py) and weights
(weights.py). Below train/ because `init_from=hf:DIR` reads it at run start-up; the `export`
and `import` commands (export/) sit on top."""
