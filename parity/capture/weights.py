"""Dump a model's parameters and buffers, for `parity weights`."""

from __future__ import annotations

import sys

import torch

from parity.capture.session import layer_from_path, unsupported
from parity.store.schema import Record, dtype_name
from parity.store.writer import DumpWriter

_BATCH_BYTES = 256 << 20


def dump_weights(model: torch.nn.Module, out_dir: str, *, layers=None, if_exists: str = "error",
                 rank: int = 0, world_size: int = 1, run_info: dict | None = None) -> int:
    """Write every parameter and buffer (``layers`` filters by layer index)
    as records with stage ``weight``. Returns the number of records. A
    tensor a dump cannot hold (on the meta device, complex, ...) is left out
    with one message per kind; a failed write leaves the dump marked
    incomplete and raises."""
    writer = DumpWriter(out_dir, rank, world_size, if_exists=if_exists,
                        run_info={"kind": "weights", "model": type(model).__name__, **(run_info or {})})
    try:
        n, skipped = _write_weights(model, writer, layers, rank, world_size)
    except BaseException as exc:
        try:
            writer.close(f"writing the weights failed: {type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001 - the first failure is the one to report
            pass
        raise
    writer.close(**({"skipped_records": skipped} if skipped else {}))
    return n


def _layout(model, module: str, leaf: str) -> dict:
    """A tensor-parallel shard's layout, as its module declares it (``parity_layout[leaf]``)."""
    try:
        layout = getattr(model.get_submodule(module), "parity_layout", None) or {}
    except AttributeError:
        return {}
    return dict(layout.get(leaf) or {})


def _write_weights(model, writer: DumpWriter, layers, rank: int, world_size: int) -> tuple[int, int]:
    batch, size, n, skipped, said = [], 0, 0, 0, set()
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    seen = set()
    for name, t in named:
        if name in seen or t is None:
            continue
        seen.add(name)
        layer = layer_from_path(name)
        if layers is not None and layer is not None and layer not in layers:
            continue
        kind = unsupported(t)
        if kind is not None:
            skipped += 1
            if kind not in said:
                said.add(kind)
                print(f"parity: weight dump skips {name}: {kind} cannot be stored (one message per kind)",
                      file=sys.stderr)
            continue
        module, _, leaf = name.rpartition(".")
        cpu = t.detach().to("cpu").contiguous()
        rec = Record(key=f"{name}:weight", module=name, stage="weight", cls=leaf, layer=layer,
                     rank=rank, world_size=world_size, shape=list(cpu.shape), dtype=dtype_name(cpu.dtype),
                     seq=writer.next_seq(), meta=_layout(model, module, leaf))
        batch.append((rec, cpu))
        size += cpu.numel() * cpu.element_size()
        n += 1
        if size >= _BATCH_BYTES:
            writer.write_batch(batch)
            batch, size = [], 0
    writer.write_batch(batch)
    return n, skipped
