"""The mapping between transformers' DeepseekV4ForCausalLM (reference) and
this engine (target), registered with parity as the ``deepseek_v4`` preset
(entry point group ``parity.presets`` in pyproject.toml)."""

from pathlib import Path

DEEPSEEK_V4 = Path(__file__).with_name("deepseek_v4.yaml")
