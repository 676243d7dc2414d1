"""One manifest line per captured tensor: the Record."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

FORMAT_VERSION = 1
RUN_FILE = "run.json"
MANIFEST = "manifest.jsonl"

# safetensors dtype codes; the manifest keeps torch's names ("bfloat16").
_ST_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
_ST_DTYPES = {v: k for k, v in _ST_CODES.items()}
_NAMES = {d: str(d).removeprefix("torch.") for d in _ST_CODES}
_BY_NAME = {v: k for k, v in _NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}") from None


def st_code(dtype: torch.dtype) -> str:
    try:
        return _ST_CODES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be stored in safetensors") from None


def st_dtype(code: str) -> torch.dtype:
    return _ST_DTYPES[code]


@dataclass
class Record:
    key: str                       # "{module}:{stage}", unique per (rank, phase, step, call)
    module: str                    # module path ("model.layers.3.self_attn") or tap name
    stage: str                     # "output", "output.0", "input.hidden_states", "tap", "weight"
    cls: str = ""                  # module class name ("tap" for taps)
    layer: int | None = None
    call: int = 0                  # index of this module's call since the last context change
    phase: str | None = None       # "prefill" | "decode" | None
    step: int | None = None
    rank: int = 0
    world_size: int = 1
    shape: list[int] = field(default_factory=list)
    dtype: str = ""
    kind: str = "tensor"           # "tensor": bytes in a shard; "stats": summary only
    file: str | None = None        # shard file name inside rank{R}/
    tensor: str | None = None      # tensor name inside the shard
    stats: dict[str, Any] = field(default_factory=dict)
    hash: str | None = None        # "sha256:<hex>" of the stored bytes
    meta: dict[str, Any] = field(default_factory=dict)
    seq: int = 0                   # execution order within the rank

    def to_json(self) -> str:
        # vars(), not dataclasses.asdict(): the fields are already plain JSON
        # values, and asdict's deep copy is the bulk of a manifest line's cost.
        return json.dumps(vars(self), separators=(",", ":"), allow_nan=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"key", "module", "stage"} - d.keys()
        if missing:
            raise ValueError(f"missing fields {sorted(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def seq_ids(self) -> list[int] | None:
        return self.meta.get("seq_ids")

    @property
    def cu_seqlens(self) -> list[int] | None:
        return self.meta.get("cu_seqlens")
