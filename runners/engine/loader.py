"""Checkpoint -> engine parameters, by explicit name rules.

Two spellings are accepted: transformers' state_dict names (which the
engine's module tree mirrors) and DeepSeek's original names, which is what
``save_pretrained`` writes and real checkpoints ship (``layers.3.attn.wq_a``,
per-expert ``w1``/``w2``/``w3``). Original names are first rewritten by
``RENAMES``; per-expert tensors are stacked into the engine's
``[experts, ...]`` parameters. Anything no rule claims is reported unused;
engine tensors nobody filled are reported unfilled; a shape that disagrees
is refused. Under tensor parallelism a module's ``tp_shards`` name the
slice of a checkpoint tensor this rank keeps (runners/engine/parallel.py);
it is cut before the shape check, and per-expert tensors of another rank's
experts are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from runners.engine.errors import ParityError
from runners.engine.parallel import take

# Original DeepSeek-V4 names -> transformers names, applied in order.
RENAMES: list[tuple[str, str]] = [
    (r"^(?!model\.|lm_head\.)", "model."),
    (r"^model\.embed\.weight$", "model.embed_tokens.weight"),
    (r"^model\.head\.weight$", "lm_head.weight"),
    (r"^model\.hc_head_(fn|base|scale)$", r"model.hc_head.hc_\1"),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_attn_(fn|base|scale)$", r".attn_hc.\1"),
    (r"\.hc_ffn_(fn|base|scale)$", r".ffn_hc.\1"),
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.attn_sink$", ".sinks"),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.self_attn\.indexer\.wq_b\.", ".self_attn.compressor.indexer.q_b_proj."),
    (r"\.norm\.weight$", ".kv_norm.weight"),
    (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.wq_b\.", ".q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
]
_RENAMES = [(re.compile(p), r) for p, r in RENAMES]
# The "model.norm.weight" rename above must not turn the final norm into kv_norm.
_FINAL_NORM = re.compile(r"^model\.(kv_)?norm\.weight$")

_L = r"model\.layers\.\d+\."
# Engine tensors a (renamed) checkpoint tensor may fill, name for name.
ACCEPT = [re.compile(p) for p in (
    r"model\.embed_tokens\.weight",
    r"model\.norm\.weight",
    r"model\.hc_head\.(hc_fn|hc_base|hc_scale)",
    r"lm_head\.weight",
    _L + r"(input_layernorm|post_attention_layernorm)\.weight",
    _L + r"(attn_hc|ffn_hc)\.(fn|base|scale)",
    _L + r"self_attn\.sinks",
    _L + r"self_attn\.(q_a_proj|q_b_proj|kv_proj|o_a_proj|o_b_proj)\.weight",
    _L + r"self_attn\.(q_a_norm|kv_norm)\.weight",
    _L + r"self_attn\.compressor\.(kv_proj|gate_proj|kv_norm)\.weight",
    _L + r"self_attn\.compressor\.position_bias",
    _L + r"self_attn\.compressor\.indexer\.(kv_proj|gate_proj|q_b_proj|scorer\.weights_proj|kv_norm)\.weight",
    _L + r"self_attn\.compressor\.indexer\.position_bias",
    _L + r"mlp\.gate\.(weight|e_score_correction_bias|tid2eid)",
    _L + r"mlp\.experts\.(gate_up_proj|down_proj)",
    _L + r"mlp\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight",
)]
# One expert's matrix in original naming: stacked into the engine's 3-D tensor.
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(w1|w2|w3)\.weight$")
# Present in real checkpoints, deliberately not loaded (multi-token prediction head).
IGNORED = [re.compile(r"(^|\.)mtp\.")]


def map_name(ckpt_name: str) -> tuple[str, int | None, str | None] | None:
    """(engine name, expert index, part) for a checkpoint name, or None if no rule claims it."""
    name = ckpt_name
    for pat, rep in _RENAMES:
        name = pat.sub(rep, name)
    if _FINAL_NORM.match(name):
        name = "model.norm.weight"
    m = _EXPERT.match(name)
    if m:
        prefix, e, w = m.groups()
        target = "down_proj" if w == "w2" else "gate_up_proj"
        return f"{prefix}.{target}", int(e), {"w1": "gate", "w3": "up", "w2": None}[w]
    if any(p.fullmatch(name) for p in ACCEPT):
        return name, None, None
    return None


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # checkpoint tensors no rule or engine tensor took
    ignored: list[str] = field(default_factory=list)  # known-unneeded checkpoint tensors
    unfilled: list[str] = field(default_factory=list)  # engine tensors the checkpoint did not (fully) provide

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)}, unused {len(self.unused)}, ignored {len(self.ignored)}, "
                f"unfilled {len(self.unfilled)}")


def checkpoint_files(ckpt_dir: str | Path) -> list[Path]:
    files = sorted(Path(ckpt_dir).glob("*.safetensors"))
    if not files:
        raise ParityError(f"no *.safetensors file in {ckpt_dir}")
    return files


def _targets(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str, bool]]:
    """Every loadable tensor: name -> (owning module, attribute, is_parameter)."""
    out = {}
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for n, v in mod._parameters.items():
            out[prefix + n] = (mod, n, True)
        for n, v in mod._buffers.items():
            if n not in mod._non_persistent_buffers_set and v is not None:
                out[prefix + n] = (mod, n, False)
    return out


def _shards(model: torch.nn.Module) -> dict[str, tuple[int, object]]:
    """name -> (dim, index) of every tensor this rank holds a slice of."""
    return {f"{mod_name}.{attr}".lstrip("."): spec for mod_name, mod in model.named_modules()
            for attr, spec in getattr(mod, "tp_shards", {}).items()}


def load_checkpoint(model: torch.nn.Module, ckpt_dir: str | Path, convert, device="cpu") -> LoadReport:
    """Fill ``model`` from the checkpoint.

    ``convert(engine_name, tensor) -> {attr_suffix: tensor}`` decides how a
    tensor is stored; it may add tensors (a quantized weight returns
    ``{"": w_q, "_scale_inv": scale}``).
    """
    targets = _targets(model)
    shards = _shards(model)
    report = LoadReport()
    filled: set[str] = set()
    stacks: dict[str, tuple[torch.Tensor, set]] = {}  # experts assembled from per-expert pieces

    def put(name: str, t: torch.Tensor) -> None:
        mod, attr, is_param = targets[name]
        for suffix, value in convert(name, t).items():
            value = value.to(device)
            if attr + suffix in mod._buffers or not is_param:
                mod._buffers[attr + suffix] = value
            else:
                mod._parameters[attr + suffix] = torch.nn.Parameter(value, requires_grad=False)
        filled.add(name)

    for path in checkpoint_files(ckpt_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if any(p.search(key) for p in IGNORED):
                    report.ignored.append(key)
                    continue
                mapped = map_name(key)
                if mapped is None or mapped[0] not in targets:
                    report.unused.append(key)
                    continue
                name, expert, part = mapped
                mod, attr, _ = targets[name]
                want = tuple(getattr(mod, attr).shape)
                t = f.get_tensor(key)
                if expert is None and name in shards:
                    t = take(t, *shards[name])
                if expert is not None and name in shards:
                    expert -= shards[name][1].start  # experts are split in contiguous ranges
                    if not 0 <= expert < want[0]:
                        report.loaded.append(key)  # another rank's expert
                        continue
                if expert is None:
                    if tuple(t.shape) != want:
                        raise ParityError(f"checkpoint tensor {key!r} has shape {tuple(t.shape)}, "
                                          f"engine tensor {name!r} expects {want}")
                    put(name, t)
                else:
                    half = want[1] // 2 if part else want[1]
                    piece = (want[1] // 2, want[2]) if part else want[1:]
                    if expert >= want[0] or tuple(t.shape) != tuple(piece):
                        raise ParityError(f"checkpoint tensor {key!r} has shape {tuple(t.shape)}, "
                                          f"engine tensor {name!r}[{expert}] expects {tuple(piece)}")
                    buf, seen = stacks.setdefault(name, (torch.empty(want, dtype=t.dtype), set()))
                    rows = slice(half, 2 * half) if part == "up" else slice(0, half)
                    buf[expert, rows] = t
                    seen.add((expert, part))
                report.loaded.append(key)

    for name, (buf, seen) in stacks.items():
        mod, attr, _ = targets[name]
        parts = 2 if name.endswith("gate_up_proj") else 1
        if len(seen) == getattr(mod, attr).shape[0] * parts:
            put(name, buf)
    report.unfilled = [n for n in targets if n not in filled]
    return report
