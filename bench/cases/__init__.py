"""One module per kernel family; each registers its cases with ``bench.registry.register``."""
