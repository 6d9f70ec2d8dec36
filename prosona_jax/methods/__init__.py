"""Trainable methods: one interface (`base.Method`), one class per stage.

See `registry.py` for the methods `--config.method` names.
"""
