"""Reference implementations of the models parity checks engines against.

Everything here builds on transformers' DeepseekV4 without editing it:
presets (config shapes), a tokenizer, deterministic checkpoint synthesis,
an offline loader, quantization simulation and taps on internals.
"""
