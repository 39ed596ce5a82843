"""r1fast: a performance-first engine for DeepSeek-R1-style GRPO reasoning RL."""

__version__ = "0.1.0"
