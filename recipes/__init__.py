"""Run recipes (TOML). ``tiny_r1_zero.toml`` is the default of ``python -m r1fast.train``."""
