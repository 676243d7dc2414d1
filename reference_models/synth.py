"""Write a complete offline DeepseekV4 checkpoint with random weights.

    python -m reference_models.synth --preset tiny --seed 0 --out DIR [--dtype bf16|fp32]

The same preset, seed and dtype always give the same bytes, on every CPU:
every tensor has its own generator seeded from (seed, tensor name), so
neither the order of generation nor the transformers version's parameter
order matters, and normals are drawn in float64, whose sampler does not
depend on the CPU's vector width (the float32 one does).

The weights are random but chosen not to hide bugs: norms are not all ones,
attention sinks, compressor position biases and router correction biases are
nonzero, hash-routing tables hold distinct valid experts per token, and every
projection is scaled so that activations stay O(1) through all layers (an
engine that drops a term then shows up as a visible difference, not noise).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import torch

from parity import quant
from parity.errors import ParityError
from parity.outdir import prepare_out
from reference_models.presets import PRESETS, get_config
from reference_models.quant_sim import weight_format

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Above this a checkpoint is sharded, so the tiny and small presets stay one file.
SHARD_BYTES = 4 << 30

# Gain of the projections that write into the residual streams: each of the
# 2 * layers sub-blocks adds its output to the streams, so keeping these
# below 1 keeps the streams' rms O(1) at the last layer.
OUT_GAIN = 0.5
# Logits with std ~3 give a peaked next-token distribution, so greedy tokens
# do not flip on rounding noise alone and token-level agreement means something.
LOGIT_GAIN = 3.0


class CheckpointExistsError(ParityError):
    """The output directory already holds files."""


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _normal(shape, std: float, g: torch.Generator, mean: float = 0.0) -> torch.Tensor:
    # Drawn in float64: torch's float32 normal sampler is vectorised per CPU
    # capability (AVX2 and AVX-512 give other numbers), the float64 one is not.
    return torch.randn(shape, generator=g, dtype=torch.float64).float() * std + mean


def _fan_in(shape) -> int:
    return shape[-1]


def init_tensor(name: str, shape: tuple[int, ...], cfg, seed: int) -> torch.Tensor:
    """The synthesized value of state-dict entry ``name`` (float32 or int64)."""
    g = _generator(seed, name)
    leaf = name.rsplit(".", 1)[-1]

    if leaf == "tid2eid":
        # Each token picks top_k distinct experts (what a trained table holds).
        return torch.rand((shape[0], cfg.n_routed_experts), generator=g).argsort(dim=-1)[:, : shape[1]].contiguous()
    if leaf == "e_score_correction_bias":
        return _normal(shape, 0.1, g)
    if name.endswith("embed_tokens.weight"):
        return _normal(shape, 1.0, g)
    if leaf == "sinks":
        return _normal(shape, 1.0, g)
    if leaf == "position_bias":
        return _normal(shape, 0.5, g)
    if "norm" in name and leaf == "weight":
        return _normal(shape, 0.1, g, mean=1.0)
    # Hyper-connection mixers: logits O(1), gains near one.
    if leaf in ("fn", "hc_fn"):
        return _normal(shape, 1.0 / math.sqrt(_fan_in(shape)), g)
    if leaf in ("base", "hc_base"):
        return _normal(shape, 0.5, g)
    if leaf in ("scale", "hc_scale"):
        return _normal(shape, 0.1, g, mean=1.0)
    if leaf in ("gate_up_proj", "down_proj") and len(shape) == 3:  # routed experts
        gain = OUT_GAIN if leaf == "down_proj" else 1.0
        return _normal(shape, gain / math.sqrt(shape[-1]), g)
    if leaf == "weight" and len(shape) == 2:
        writes_residual = name.endswith(("o_b_proj.weight", "shared_experts.down_proj.weight"))
        gain = OUT_GAIN if writes_residual else LOGIT_GAIN if name == "lm_head.weight" else 1.0
        return _normal(shape, gain / math.sqrt(_fan_in(shape)), g)
    raise ParityError(f"synth has no rule for {name} {tuple(shape)}; extend reference_models/synth.py")


def state_dict_shapes(cfg) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes the checkpoint must hold, without allocating."""
    from transformers import DeepseekV4ForCausalLM

    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(cfg)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _plan_shards(entries: dict, dtype: torch.dtype) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, kind) in entries.items():
        nbytes = math.prod(shape) * (torch.empty((), dtype=dtype if kind.is_floating_point else kind).element_size())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _prepare_out(out: Path, force: bool) -> None:
    # Stale shards of a bigger checkpoint would otherwise load too.
    prepare_out(out, force, lambda name: name.startswith("model") and ".safetensors" in name,
                label="checkpoint folder",
                hint="pass --force (force=True) to overwrite it", error=CheckpointExistsError)


def synthesize(preset, seed: int = 0, out=None, dtype: str = "bf16", force: bool = False, on_grid: bool = False,
               **overrides) -> Path:
    """Write a checkpoint for ``preset`` (a name or a ``DeepseekV4Config``) to ``out``.

    ``on_grid`` snaps the weights the engine quantizes (see
    ``reference_models.quant_sim``) onto their FP8 / FP4 grids, as in
    DeepSeek-V4's release where they ship quantized: the engine's weight
    quantization is then lossless and only activation quantization remains.
    """
    from safetensors.torch import save_file

    if out is None:
        raise ParityError("synthesize needs an output directory")
    if dtype not in DTYPES:
        raise ParityError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cfg = get_config(preset, **overrides) if isinstance(preset, str) else preset
    out = Path(out)
    _prepare_out(out, force)
    torch_dtype = DTYPES[dtype]

    entries = dict(sorted(state_dict_shapes(cfg).items()))
    shards = _plan_shards(entries, torch_dtype)
    weight_map = {}
    for i, names in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            t = init_tensor(name, entries[name][0], cfg, seed)
            if on_grid and (fmt := weight_format(name)) is not None:
                t = quant.qdq_fp8_weight(t) if fmt == "fp8" else quant.qdq_fp4_weight(t)
            tensors[name] = t.to(torch_dtype) if t.is_floating_point() else t
            weight_map[name] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        total = sum(math.prod(s) * (torch_dtype.itemsize if k.is_floating_point else k.itemsize) for s, k in entries.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    cfg.dtype = "bfloat16" if dtype == "bf16" else "float32"
    cfg.architectures = ["DeepseekV4ForCausalLM"]
    cfg.save_pretrained(str(out))
    for fname in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / fname, out / fname)
    provenance = {"generator": "reference_models.synth", "preset": preset if isinstance(preset, str) else None,
                  "seed": seed, "dtype": dtype, "on_grid": on_grid, "overrides": overrides}
    (out / "synth.json").write_text(json.dumps(provenance, indent=2, sort_keys=True, default=str) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference_models.synth", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, choices=PRESETS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    parser.add_argument("--on-grid", action="store_true",
                        help="store FP8/FP4-quantized weights already on their quantization grid")
    args = parser.parse_args(argv)
    try:
        path = synthesize(args.preset, seed=args.seed, out=args.out, dtype=args.dtype, force=args.force,
                          on_grid=args.on_grid)
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
