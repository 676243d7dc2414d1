"""Build the engine model for a checkpoint directory and fill its weights."""

from __future__ import annotations

import torch

from runners.engine.config import ModelConfig
from runners.engine.errors import ParityError
from runners.engine.loader import LoadReport, load_checkpoint
from runners.engine.model import DeepseekV4ForCausalLM
from runners.engine.parallel import SINGLE, TP, take
from runners.engine.precision import converter


def load_model(ckpt_dir, precision: str = "fp32", device="cpu", strict: bool = True, tp: TP = SINGLE):
    """Returns (model, config, report). strict: refuse unfilled engine tensors.
    ``tp``: this rank's shard of a tensor-parallel model."""
    cfg = ModelConfig.from_dir(ckpt_dir)
    if tp.size > 1 and precision == "fp8":
        # A shard boundary inside a 128x128 scale block would quantize each
        # rank's half on its own scale: not the single-process weights.
        raise ParityError("fp8 with tensor parallelism is not supported yet (shards must sit on the "
                          "128-wide quantization blocks)")
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(cfg, tp)
    report: LoadReport = load_checkpoint(model, ckpt_dir, converter(precision), device=device)
    if cfg.tie_word_embeddings and "lm_head.weight" in report.unfilled:
        emb = model.model.embed_tokens.weight
        spec = getattr(model.lm_head, "tp_shards", {}).get("weight")
        model.lm_head.weight = emb if spec is None else torch.nn.Parameter(take(emb, *spec), requires_grad=False)
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
