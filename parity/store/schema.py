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
RANK_FILE = "rank.json"       # per rank: who wrote it and whether it closed cleanly

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
    def from_dict(cls, d) -> "Record":
        """A Record from one parsed manifest line. Raises ValueError naming the
        field when the line is not an object or a field has the wrong type:
        the readers index shapes, offsets and layouts with these values."""
        if not isinstance(d, dict):
            raise ValueError(f"not a JSON object (a {_json_type(d)})")
        missing = {"key", "module", "stage"} - d.keys()
        if missing:
            raise ValueError(f"missing fields {sorted(missing)}")
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in d.items() if k in names}
        for name, value in fields.items():
            _check_field(name, value)
        rec = cls(**fields)
        if rec.kind == "tensor":
            for name in ("file", "tensor", "dtype"):
                if not getattr(rec, name):
                    raise ValueError(f"a tensor record needs '{name}'")
            dtype_from_name(rec.dtype)
        return rec

    @property
    def seq_ids(self) -> list[int] | None:
        return self.meta.get("seq_ids")

    @property
    def cu_seqlens(self) -> list[int] | None:
        return self.meta.get("cu_seqlens")


def _json_type(v) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_list(v, minimum: int | None = 0) -> bool:
    return isinstance(v, list) and all(_is_int(x) and (minimum is None or x >= minimum) for x in v)


def _number_or_none(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


# field -> (test, what the field must be). Written from the readers' needs:
# anything used as an index, an offset or a dict is checked here, once.
_FIELD_RULES = {
    "key": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "module": (lambda v: isinstance(v, str), "a string"),
    "stage": (lambda v: isinstance(v, str), "a string"),
    "cls": (lambda v: isinstance(v, str), "a string"),
    "layer": (lambda v: v is None or _is_int(v), "an integer or null"),
    "call": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "phase": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "step": (lambda v: v is None or _is_int(v), "an integer or null"),
    "rank": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "world_size": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "shape": (_int_list, "a list of non-negative integers"),
    "dtype": (lambda v: isinstance(v, str), "a string"),
    "kind": (lambda v: v in ("tensor", "stats"), "'tensor' or 'stats'"),
    "file": (lambda v: v is None or (isinstance(v, str) and v != ""), "a file name or null"),
    "tensor": (lambda v: v is None or (isinstance(v, str) and v != ""), "a tensor name or null"),
    "stats": (lambda v: isinstance(v, dict) and all(_number_or_none(x) for x in v.values()),
              "an object of numbers"),
    "hash": (lambda v: v is None or (isinstance(v, str) and v.startswith("sha256:")), "'sha256:<hex>' or null"),
    "meta": (lambda v: isinstance(v, dict), "an object"),
    "seq": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
}

# Layout metadata the compare commands cut tensors with.
_META_RULES = {
    "seq_ids": (lambda v: _int_list(v, None), "a list of integers"),
    "cu_seqlens": (lambda v: _int_list(v) and all(a <= b for a, b in zip(v, v[1:])),
                   "a non-decreasing list of non-negative integers"),
    "seq_lens": (_int_list, "a list of non-negative integers"),
    "slot_ids": (lambda v: _int_list(v, None), "a list of integers"),
    "shard_dim": (lambda v: v is None or _is_int(v), "an integer"),
    "shard_reduce": (lambda v: v is None or v == "sum", "'sum'"),
    "padding_side": (lambda v: v in ("left", "right"), "'left' or 'right'"),
    "pad_rows": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "rows": (lambda v: v in ("tokens", "entries"), "'tokens' or 'entries'"),
}


def _check_field(name: str, value) -> None:
    ok, what = _FIELD_RULES[name]
    if not ok(value):
        raise ValueError(f"field '{name}' must be {what}, got {json.dumps(value)[:60]}")
    if name == "meta":
        for k, (ok, what) in _META_RULES.items():
            if k in value and not ok(value[k]):
                raise ValueError(f"meta '{k}' must be {what}, got {json.dumps(value[k])[:60]}")
