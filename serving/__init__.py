"""A usable model out of training: export from ZeRO shards to safetensors (export.py), generation
(generate.py), and the exported model as an MLflow pyfunc model that can be registered and served (pyfunc.py)."""
