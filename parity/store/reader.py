"""Reading a dump: validated, memory-mapped, lazy, and never unpickling.

Shards are parsed here (the safetensors header is plain JSON) and tensors are
views into a private memory map of the file, so opening a 100 GB dump costs
nothing until a tensor is touched.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import warnings
from functools import cached_property

import torch

from parity.errors import DumpError
from parity.store.schema import (FORMAT_VERSION, MANIFEST, RUN_FILE, Record, dtype_from_name, st_dtype)
from parity.store.writer import content_hash


class _Shard:
    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise DumpError(f"shard {path} is truncated ({size} bytes, no header)")
                n = int.from_bytes(head, "little")
                if n > size - 8 or n > 100 << 20:
                    raise DumpError(f"shard {path} is truncated or corrupt (header of {n} bytes, file of {size})")
                header = json.loads(fh.read(n))
        except FileNotFoundError:
            raise DumpError(f"shard {path} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DumpError(f"shard {path} has a corrupt header") from None
        self.data_start = 8 + n
        header.pop("__metadata__", None)
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self.data_start + end > size:
            raise DumpError(f"shard {path} is truncated: expected {self.data_start + end} bytes, found {size}")
        self.header = header
        self._mm = None
        self._size = size

    def tensor(self, name: str) -> torch.Tensor:
        info = self.header.get(name)
        if info is None:
            raise DumpError(f"shard {self.path} has no tensor {name!r}")
        dtype = st_dtype(info["dtype"])
        begin, end = info["data_offsets"]
        shape = info["shape"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        if self._mm is None:
            with open(self.path, "rb") as fh:
                # ACCESS_COPY: writable view for torch, and the file is never touched.
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        elem = torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(self._mm, dtype=dtype, count=(end - begin) // elem,
                                offset=self.data_start + begin)
        return flat.reshape(shape)

    def raw(self, name: str) -> memoryview:
        begin, end = self.header[name]["data_offsets"]
        with open(self.path, "rb") as fh:
            fh.seek(self.data_start + begin)
            return memoryview(fh.read(end - begin))


def _read_manifest(path: str, rel: str) -> list[Record]:
    records: list[Record] = []
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    last = len(lines) - 1
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(Record.from_dict(json.loads(line)))
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as exc:
            if i == last:
                # A line cut short by a crash: everything before it is intact.
                warnings.warn(f"{rel}: ignoring an incomplete last line (the run was cut short)")
                continue
            raise DumpError(f"{rel} line {i + 1} is corrupt: {exc}") from None
    return records


class Dump:
    """One run: run.json plus one folder of records per rank."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.exists(self.path):
            raise DumpError(f"dump dir {path} does not exist")
        if not os.path.isdir(self.path):
            raise DumpError(f"{path} is not a folder")
        run_file = os.path.join(self.path, RUN_FILE)
        rank_dirs = sorted(
            (int(m.group(1)), n) for n in os.listdir(self.path)
            if (m := re.fullmatch(r"rank(\d+)", n)) and os.path.isdir(os.path.join(self.path, n)))
        if not os.path.exists(run_file) and not rank_dirs:
            subruns = sorted(n for n in os.listdir(self.path) if n.startswith("run-"))
            hint = f" (it holds runs {', '.join(subruns)}: name one of them)" if subruns else ""
            raise DumpError(f"{path} is not a parity dump: no {RUN_FILE} and no rank folders{hint}")
        self.run: dict = {}
        if os.path.exists(run_file):
            try:
                with open(run_file, encoding="utf-8") as fh:
                    self.run = json.load(fh)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DumpError(f"{run_file} is corrupt: {exc}") from None
            version = self.run.get("format_version")
            if isinstance(version, int) and version > FORMAT_VERSION:
                raise DumpError(f"{run_file} has format version {version}; this parity reads up to {FORMAT_VERSION}")
        self.rank_dirs = {r: os.path.join(self.path, n) for r, n in rank_dirs}
        self._shards: dict[str, _Shard] = {}

    @property
    def ranks(self) -> list[int]:
        return sorted(self.rank_dirs)

    @cached_property
    def _by_rank(self) -> dict[int, list[Record]]:
        out = {}
        for r, d in self.rank_dirs.items():
            m = os.path.join(d, MANIFEST)
            out[r] = _read_manifest(m, os.path.relpath(m, os.path.dirname(self.path))) if os.path.exists(m) else []
        return out

    def records(self, rank: int | None = None) -> list[Record]:
        """Records in execution order; every rank's when ``rank`` is None."""
        if rank is not None:
            if rank not in self.rank_dirs:
                raise DumpError(f"{self.path} has no rank {rank} (ranks: {self.ranks})")
            return self._by_rank[rank]
        return [rec for r in self.ranks for rec in self._by_rank[r]]

    def stats_only_hint(self) -> str:
        """Why a compare finds no tensor here, when the capture mode is the reason."""
        n = sum(1 for r in self.records() if r.kind == "stats")
        if not n:
            return ""
        return (f"; its {n} records are summaries only (captured with PARITY_DUMP_MODE=stats): capture with "
                "PARITY_DUMP_MODE=full or sample to compare tensors, or screen the summaries with `parity summary-diff`")

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_rank.values())

    def _shard(self, rec: Record) -> _Shard:
        path = os.path.join(self.rank_dirs.get(rec.rank, os.path.join(self.path, f"rank{rec.rank}")), rec.file)
        sh = self._shards.get(path)
        if sh is None:
            sh = self._shards[path] = _Shard(path)
        return sh

    def load(self, rec: Record, *, verify: bool = False) -> torch.Tensor:
        """The record's tensor, memory-mapped. ``verify`` re-hashes its bytes."""
        if rec.kind != "tensor" or not rec.file:
            raise DumpError(f"record {rec.key} holds summary statistics only (captured in stats mode)")
        sh = self._shard(rec)
        t = sh.tensor(rec.tensor)
        if list(t.shape) != list(rec.shape) or t.dtype != dtype_from_name(rec.dtype):
            raise DumpError(f"{sh.path}: tensor {rec.tensor} is {list(t.shape)} {t.dtype}, "
                            f"the manifest says {rec.shape} {rec.dtype}")
        if verify and rec.hash:
            got = content_hash(sh.raw(rec.tensor))
            if got != rec.hash:
                raise DumpError(f"{sh.path}: tensor {rec.tensor} ({rec.key}) does not match its hash")
        return t

    def frame(self):
        """All records as a pandas DataFrame (one row per record)."""
        import pandas as pd

        rows = []
        for r in self.records():
            row = {k: getattr(r, k) for k in ("key", "module", "stage", "cls", "layer", "call", "phase",
                                              "step", "rank", "shape", "dtype", "kind", "seq")}
            row.update({k: r.stats.get(k) for k in ("absmax", "mean", "std", "l2", "nan", "inf")})
            rows.append(row)
        return pd.DataFrame(rows)


def open_dump(path: str) -> Dump:
    return Dump(path)
