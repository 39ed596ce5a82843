"""Shared pieces of the pipeline tests: the 1-layer micro model every micro recipe trains, as TOML."""

MICRO_MODEL = """hidden_size = 16
num_layers = 1
num_heads = 2
num_kv_heads = 1
intermediate_size = 32
max_seq_len = 64
"""
"""The body of a ``[models.<name>]`` table: 1-2 SFT steps of it take well under a second on CPU."""


def pipeline_header(run: str, model: str) -> str:
    """``[pipeline]`` (run name, ``{out}`` left for ``str.format``, compact template) and ``[models.<model>]``."""
    return f"""
[pipeline]
name = "{run}"
out_dir = "{{out}}"
template = "compact"

[models.{model}]
{MICRO_MODEL}"""
