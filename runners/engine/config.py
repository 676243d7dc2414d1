"""The model's shape, read from a checkpoint's config.json.

transformers' ``DeepseekV4Config`` parses the file (defaults, legacy keys,
rope nesting) so both sides start from the same numbers; the engine then
keeps only the plain values it needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


@dataclass
class RopeSpec:
    theta: float
    dim: int  # rotated channels per head (the trailing slice)
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0

    def inv_freq(self) -> torch.Tensor:
        exps = torch.arange(0, self.dim, 2, dtype=torch.int64).to(torch.float32) / self.dim
        base_freq = self.theta**exps
        if self.rope_type == "default":
            return 1.0 / base_freq
        if self.rope_type != "yarn":
            raise ValueError(f"rope type {self.rope_type!r} is not supported by the engine")
        # YaRN: interpolate the low frequencies by `factor`, keep the high
        # ones, with a linear ramp between the two correction dims.
        def corr_dim(n_rot):
            return (self.dim * math.log(self.original_max_position / (n_rot * 2 * math.pi))) / (
                2 * math.log(self.theta)
            )

        low, high = corr_dim(self.beta_fast), corr_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, self.dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(self.dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp
        extra, inter = 1.0 / base_freq, 1.0 / (self.factor * base_freq)
        return inter * (1 - keep) + extra * keep


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    top_k: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    scoring_func: str
    swiglu_limit: float
    layer_types: list[str]
    mlp_layer_types: list[str]
    compress_rates: dict[str, int]
    sliding_window: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    rms_norm_eps: float
    rope_main: RopeSpec
    rope_compress: RopeSpec
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    max_position_embeddings: int = 0

    @property
    def rope_dim(self) -> int:
        return self.rope_main.dim

    def ratio(self, layer: int) -> int:
        t = self.layer_types[layer]
        return 0 if t == SLIDING else int(self.compress_rates[t])

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        def rope(label: str) -> RopeSpec:
            p = hf.rope_parameters[label]
            dim = int(hf.head_dim * p.get("partial_rotary_factor", hf.partial_rotary_factor))
            spec = RopeSpec(theta=float(p["rope_theta"]), dim=dim, rope_type=p.get("rope_type", "default"))
            if spec.rope_type == "yarn":
                spec.factor = float(p["factor"])
                spec.original_max_position = int(p["original_max_position_embeddings"])
                spec.beta_fast = float(p.get("beta_fast") or 32)
                spec.beta_slow = float(p.get("beta_slow") or 1)
                spec.truncate = bool(p.get("truncate", True))
                spec.attention_factor = float(p.get("attention_factor", 1.0))
            return spec

        if hf.num_key_value_heads != 1:
            raise ValueError("DeepSeek-V4 shares one KV head; num_key_value_heads must be 1")
        eos = hf.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            head_dim=hf.head_dim,
            q_lora_rank=hf.q_lora_rank,
            o_groups=hf.o_groups,
            o_lora_rank=hf.o_lora_rank,
            moe_intermediate_size=hf.moe_intermediate_size,
            n_routed_experts=hf.n_routed_experts,
            n_shared_experts=hf.n_shared_experts,
            top_k=hf.num_experts_per_tok,
            routed_scaling_factor=float(hf.routed_scaling_factor),
            norm_topk_prob=bool(hf.norm_topk_prob),
            scoring_func=hf.scoring_func,
            swiglu_limit=float(hf.swiglu_limit),
            layer_types=list(hf.layer_types),
            mlp_layer_types=list(hf.mlp_layer_types),
            compress_rates=dict(hf.compress_rates),
            sliding_window=hf.sliding_window,
            index_n_heads=hf.index_n_heads,
            index_head_dim=hf.index_head_dim,
            index_topk=hf.index_topk,
            hc_mult=hf.hc_mult,
            hc_sinkhorn_iters=hf.hc_sinkhorn_iters,
            hc_eps=float(hf.hc_eps),
            rms_norm_eps=float(hf.rms_norm_eps),
            rope_main=rope("main"),
            rope_compress=rope("compress"),
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            bos_token_id=hf.bos_token_id,
            eos_token_id=eos,
            max_position_embeddings=hf.max_position_embeddings,
        )

    @classmethod
    def from_dir(cls, ckpt_dir: str | Path) -> "ModelConfig":
        from transformers import DeepseekV4Config

        return cls.from_hf(DeepseekV4Config.from_pretrained(str(ckpt_dir)))
