"""Load a synthesized (or real) DeepseekV4 checkpoint offline.

Nothing here touches the network: transformers is told ``local_files_only``
and a missing file is reported by name before transformers gets a chance to
look for it on the hub.
"""

from __future__ import annotations

from pathlib import Path

import torch

from parity.errors import ParityError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


class CheckpointError(ParityError):
    """A checkpoint directory is missing a file or cannot be loaded."""


def _require(ckpt: Path, *alternatives: str) -> None:
    if not any((ckpt / name).is_file() for name in alternatives):
        raise CheckpointError(f"checkpoint {ckpt} has no {' or '.join(alternatives)}")


def check_checkpoint(ckpt_dir, need_tokenizer: bool = True) -> Path:
    """The checkpoint's path, after checking that its files are there."""
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt} does not exist")
    _require(ckpt, "config.json")
    _require(ckpt, *WEIGHT_FILES)
    if need_tokenizer:
        _require(ckpt, "tokenizer.json")
    return ckpt


def load_config(ckpt_dir):
    from transformers import DeepseekV4Config

    ckpt = Path(ckpt_dir)
    _require(ckpt, "config.json")
    try:
        return DeepseekV4Config.from_pretrained(str(ckpt), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise CheckpointError(f"{ckpt / 'config.json'} cannot be read: {exc}") from exc


def load_reference(ckpt_dir, precision: str = "fp32", device: str | torch.device = "cpu"):
    """``DeepseekV4ForCausalLM`` from ``ckpt_dir`` in eval mode at ``precision``.

    bf16 keeps what transformers keeps in fp32 (hyper-connections, sinks,
    position and correction biases) except the RMSNorm weights: an fp32 norm
    weight turns the norm's bf16 output into fp32, which the next bf16 linear
    rejects, so those weights go to bf16 (exact: the checkpoint stores bf16).

    fp64 loads in fp32 and widens every floating tensor, then switches the
    routed experts to the eager implementation: the grouped kernels reject
    float64.
    """
    from transformers import DeepseekV4ForCausalLM

    if precision not in PRECISIONS:
        raise ParityError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    ckpt = check_checkpoint(ckpt_dir, need_tokenizer=False)
    load_dtype = torch.float32 if precision == "fp64" else PRECISIONS[precision]
    try:
        model = DeepseekV4ForCausalLM.from_pretrained(
            str(ckpt), dtype=load_dtype, local_files_only=True, attn_implementation="eager"
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load {ckpt}: {exc}") from exc
    if precision == "bf16":
        _norm_weights_to(model, torch.bfloat16)
    if precision == "fp64":
        model = model.to(torch.float64)
        model.config._experts_implementation = "eager"
    return model.to(device).eval()


def _norm_weights_to(model, dtype: torch.dtype) -> None:
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RMSNorm

    for module in model.modules():
        if isinstance(module, DeepseekV4RMSNorm):
            module.weight.data = module.weight.data.to(dtype)


def load_tokenizer(ckpt_dir):
    """The checkpoint's ``PreTrainedTokenizerFast`` (offline)."""
    from transformers import PreTrainedTokenizerFast

    ckpt = Path(ckpt_dir)
    _require(ckpt, "tokenizer.json")
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(ckpt), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot load the tokenizer of {ckpt}: {exc}") from exc
