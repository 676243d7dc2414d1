"""Build the engine model for a checkpoint directory and fill its weights."""

from __future__ import annotations

import torch

from runners.engine.config import ModelConfig
from runners.engine.errors import ParityError
from runners.engine.loader import LoadReport, load_checkpoint
from runners.engine.model import DeepseekV4ForCausalLM
from runners.engine.precision import converter


def load_model(ckpt_dir, precision: str = "fp32", device="cpu", strict: bool = True):
    """Returns (model, config, report). strict: refuse unfilled engine tensors."""
    cfg = ModelConfig.from_dir(ckpt_dir)
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(cfg)
    report: LoadReport = load_checkpoint(model, ckpt_dir, converter(precision), device=device)
    if cfg.tie_word_embeddings and "lm_head.weight" in report.unfilled:
        model.lm_head.weight = model.model.embed_tokens.weight
        report.unfilled.remove("lm_head.weight")
    if strict and report.unfilled:
        raise ParityError(f"checkpoint {ckpt_dir} lacks {len(report.unfilled)} engine tensors, "
                          f"first: {', '.join(report.unfilled[:5])}")
    # RoPE frequencies are derived, not loaded.
    inner = model.model
    inner.main_inv_freq = cfg.rope_main.inv_freq().to(device)
    inner.compress_inv_freq = cfg.rope_compress.inv_freq().to(device)
    model.eval()
    return model, cfg, report
