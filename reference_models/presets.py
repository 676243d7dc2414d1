"""Named DeepseekV4 configurations, from a CPU toy to DeepSeek-V4-Flash shapes.

A preset is a plain dict of ``DeepseekV4Config`` keyword arguments, so it can be
printed, diffed and overridden without importing transformers. ``get_config``
turns one into a config object.

Why the tiny preset looks the way it does: every code path of the reference
must fire within a few hundred tokens, so the compression rates (4 / 16) and
the window (16) are far below the real ones (4 / 128, window 128), index_topk
(8) is below the number of compressed entries a 64-token prompt already has
(16), and both router kinds (hash and score) appear on compressed layers.
"""

from __future__ import annotations

import copy

from parity.errors import ParityError

_SLIDING = "sliding_attention"
_CSA = "compressed_sparse_attention"
_HCA = "heavily_compressed_attention"


def _yarn(original_max: int) -> dict:
    # DeepSeek-V4 applies YaRN (factor 16) to the compressed branches only;
    # keeping it in small presets exercises that rope path too.
    return {
        "rope_type": "yarn",
        "factor": 16.0,
        "original_max_position_embeddings": original_max,
        "beta_fast": 32,
        "beta_slow": 1,
    }


_TINY = dict(
    vocab_size=4096,
    hidden_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=64,
    partial_rotary_factor=0.25,  # 16 rope channels per head, as 64/512 in V4
    q_lora_rank=128,
    o_groups=2,
    o_lora_rank=64,
    moe_intermediate_size=128,
    n_routed_experts=16,
    num_experts_per_tok=2,
    n_shared_experts=1,
    scoring_func="sqrtsoftplus",
    norm_topk_prob=True,
    routed_scaling_factor=1.5,
    swiglu_limit=10.0,
    sliding_window=16,
    compress_rates={_CSA: 4, _HCA: 16},
    layer_types=[_SLIDING, _CSA, _HCA, _CSA, _HCA, _SLIDING],
    # Hash routing on a sliding and a CSA layer, score routing on the rest.
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe", "moe"],
    # The indexer score is a weighted sum of ReLUs over heads: with few heads
    # an entry scores exactly 0 often (all heads negative, 1 in 2**heads), and
    # exact ties at the top-k boundary make the reference's choice arbitrary
    # (it then differs between a full forward and a cached one). 16 heads
    # make that rare; the real model has 64.
    index_n_heads=16,
    index_head_dim=32,
    index_topk=8,
    hc_mult=4,
    hc_sinkhorn_iters=20,
    hc_eps=1e-6,
    rope_theta=10000.0,
    compress_rope_theta=160000.0,
    rope_parameters=_yarn(1024),
    max_position_embeddings=16384,
    rms_norm_eps=1e-6,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
    tie_word_embeddings=False,
    num_nextn_predict_layers=0,
)

_SMALL = dict(
    _TINY,
    hidden_size=1024,
    num_hidden_layers=8,
    num_attention_heads=16,
    head_dim=128,
    q_lora_rank=512,
    o_groups=4,
    o_lora_rank=256,
    moe_intermediate_size=512,
    n_routed_experts=64,
    num_experts_per_tok=6,
    sliding_window=64,
    compress_rates={_CSA: 4, _HCA: 32},
    layer_types=[_SLIDING, _CSA, _HCA, _CSA, _HCA, _CSA, _HCA, _SLIDING],
    mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 5,
    index_n_heads=16,
    index_head_dim=64,
    index_topk=32,
    rope_parameters=_yarn(4096),
    max_position_embeddings=65536,
)

# Per-layer shapes of DeepSeek-V4-Flash (hidden 4096, 64 x 512 heads, 256
# experts top-6, window 128, CSA 4 / HCA 128, index top-k 512); only the layer
# count is cut so that a checkpoint fits one GPU. The vocabulary stays at the
# tokenizer's 4096 so the same tokenizer serves every preset.
_FLASH_SHAPE = dict(
    _TINY,
    hidden_size=4096,
    num_hidden_layers=4,
    num_attention_heads=64,
    head_dim=512,
    partial_rotary_factor=64 / 512,
    q_lora_rank=1024,
    o_groups=8,
    o_lora_rank=1024,
    moe_intermediate_size=2048,
    n_routed_experts=256,
    num_experts_per_tok=6,
    sliding_window=128,
    compress_rates={_CSA: 4, _HCA: 128},
    layer_types=[_SLIDING, _CSA, _HCA, _CSA],
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
    index_n_heads=64,
    index_head_dim=128,
    index_topk=512,
    rope_parameters=_yarn(65536),
    max_position_embeddings=1048576,
)

_PRESETS: dict[str, dict] = {"tiny": _TINY, "small": _SMALL, "flash-shape": _FLASH_SHAPE}

PRESETS: list[str] = list(_PRESETS)


class UnknownPresetError(ParityError):
    """A preset name that does not exist."""


def preset_kwargs(name: str, **overrides) -> dict:
    """The config keyword arguments of preset ``name``, with ``overrides`` applied."""
    if name not in _PRESETS:
        raise UnknownPresetError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    kwargs = copy.deepcopy(_PRESETS[name])
    kwargs.update(copy.deepcopy(overrides))
    n = kwargs["num_hidden_layers"]
    # Changing the depth alone should not force the caller to rewrite both
    # per-layer schedules: cycle the preset's ones to the new length.
    for key in ("layer_types", "mlp_layer_types"):
        if key not in overrides and len(kwargs[key]) != n:
            base = kwargs[key]
            kwargs[key] = [base[i % len(base)] for i in range(n)]
    return kwargs


def get_config(name: str, **overrides):
    """A ``DeepseekV4Config`` for preset ``name`` (see ``PRESETS``)."""
    from transformers import DeepseekV4Config

    try:
        return DeepseekV4Config(**preset_kwargs(name, **overrides))
    except (TypeError, ValueError) as exc:
        raise ParityError(f"preset {name!r} with overrides {sorted(overrides)}: {exc}") from exc
