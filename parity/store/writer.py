"""Atomic, crash-safe writing of a dump.

A shard is written under a temporary name, flushed to disk, then renamed;
only then are its manifest lines appended. A crash at any point leaves a dump
whose manifest names only complete shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from parity import __version__
from parity.errors import DumpError
from parity.store.stats import tensor_stats
from parity.store.schema import FORMAT_VERSION, MANIFEST, RUN_FILE, Record, dtype_name, st_code

_POOL_HASH_BYTES = 1 << 20
_KEEP_GIL_BYTES = 256 << 10
_GIL_FREE_PIECE = 2047  # hashlib keeps the GIL below 2048 bytes
_SHARD_RE = re.compile(r"^shard-\d{6}\.safetensors$")


def holds_run(path: str) -> bool:
    if os.path.exists(os.path.join(path, RUN_FILE)):
        return True
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(n.startswith("rank") and os.path.exists(os.path.join(path, n, MANIFEST)) for n in names)


def _remove_run(path: str) -> None:
    # Only files parity wrote are removed; anything else of the user's stays.
    run = os.path.join(path, RUN_FILE)
    if os.path.exists(run):
        os.remove(run)
    for n in os.listdir(path):
        d = os.path.join(path, n)
        if re.fullmatch(r"rank\d+", n) and os.path.isdir(d):
            for f in os.listdir(d):
                if f in (MANIFEST, "rank.json") or _SHARD_RE.match(f) or f.startswith(".shard-"):
                    os.remove(os.path.join(d, f))
            if not os.listdir(d):
                os.rmdir(d)


def prepare_run_dir(root: str, if_exists: str = "error", rank: int = 0) -> str:
    """Return the folder this run writes into, applying the policy for a
    folder that already holds a run: 'error' refuses, 'overwrite' removes the
    old run's files, 'new' picks a fresh ``run-NNN`` subfolder."""
    root = os.path.abspath(root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise DumpError(f"dump dir {root} exists and is not a folder")
    rank_dir = os.path.join(root, f"rank{rank}")
    taken = holds_run(root) if rank == 0 else os.path.exists(os.path.join(rank_dir, MANIFEST))
    if taken:
        if if_exists == "error":
            raise DumpError(
                f"dump dir {root} already holds a run; choose another folder, or set "
                "PARITY_DUMP_EXISTING=overwrite (replace it) or =new (write into a fresh run-NNN subfolder)")
        if if_exists == "overwrite":
            _remove_run(root)
        elif if_exists == "new":
            n = 1
            while os.path.exists(os.path.join(root, f"run-{n:03d}")):
                n += 1
            root = os.path.join(root, f"run-{n:03d}")
        else:
            raise DumpError(f"unknown existing-run policy {if_exists!r}")
    os.makedirs(os.path.join(root, f"rank{rank}"), exist_ok=True)
    return root


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is contiguous."""
    t = t.detach().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def content_hash(buf: memoryview) -> str:
    if buf.nbytes >= _KEEP_GIL_BYTES:
        return "sha256:" + hashlib.sha256(buf).hexdigest()[:32]
    # hashlib lets the GIL go for any update of 2 KB or more, and getting it
    # back while the model's thread runs Python can take a whole switch
    # interval (5 ms). For a small buffer that wait dwarfs the hash itself,
    # so feed it in pieces small enough to keep the GIL.
    h = hashlib.sha256()
    flat = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
    for start in range(0, flat.nbytes, _GIL_FREE_PIECE):
        h.update(flat[start:start + _GIL_FREE_PIECE])
    return "sha256:" + h.hexdigest()[:32]


def _digest(t: torch.Tensor, stats: dict | None, buf: memoryview) -> tuple[str, dict]:
    return content_hash(buf), stats or tensor_stats(t)


class DumpWriter:
    """Writes one rank's records. Not thread-safe: one writer thread owns it."""

    def __init__(self, root: str, rank: int = 0, world_size: int = 1, *, if_exists: str = "error",
                 run_info: dict | None = None, fsync: bool = True):
        self.root = prepare_run_dir(root, if_exists, rank)
        self.rank = rank
        self.world_size = world_size
        self.dir = os.path.join(self.root, f"rank{rank}")
        self.fsync = fsync
        self._shard_no = 0
        self._pool: ThreadPoolExecutor | None = None
        self._early: dict[int, tuple] = {}
        self._seq = 0
        self.bytes_written = 0
        self.records_written = 0
        self._manifest = open(os.path.join(self.dir, MANIFEST), "a", encoding="utf-8")
        self.run_info = {
            "format_version": FORMAT_VERSION,
            "tool": "parity",
            "tool_version": __version__,
            "torch_version": torch.__version__,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "world_size": world_size,
        }
        self.run_info.update(run_info or {})
        if rank == 0:
            self.write_run_info()

    def write_run_info(self, **updates) -> None:
        self.run_info.update(updates)
        if self.rank != 0:
            return
        path = os.path.join(self.root, RUN_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.run_info, fh, indent=1, default=str)
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)

    def next_seq(self) -> int:
        s = self._seq
        self._seq += 1
        return s

    def digest_soon(self, rec: Record, t: torch.Tensor) -> None:
        """Start hashing (and summarising) a large CPU tensor now, in the pool,
        so the work overlaps the previous shard's write and fsync instead of
        waiting for this tensor's own shard."""
        if t.numel() * t.element_size() >= _POOL_HASH_BYTES:
            self._early[id(t)] = (t, self._hash_pool().submit(_digest, t, rec.stats, tensor_bytes(t)))

    def drop_early(self) -> None:
        """Forget digests started for tensors that will not be written."""
        self._early.clear()

    def write_batch(self, items: list[tuple[Record, torch.Tensor | None]]) -> None:
        """Write the tensors of ``items`` (CPU tensors; None for a stats-only
        record) as one shard, then every record's manifest line, in order."""
        tensors = [(rec, t) for rec, t in items if t is not None]
        if tensors:
            self._write_shard(tensors)
        self.append_manifest([rec for rec, _ in items])

    def _write_shard(self, items: list[tuple[Record, torch.Tensor]]) -> None:
        self._shard_no += 1
        name = f"shard-{self._shard_no:06d}.safetensors"
        bufs, header, offset = [], {}, 0
        for rec, t in items:
            buf = tensor_bytes(t)
            rec.tensor = f"t{rec.seq:07d}"
            rec.file = name
            rec.shape = list(t.shape)
            rec.dtype = dtype_name(t.dtype)
            header[rec.tensor] = {"dtype": st_code(t.dtype), "shape": list(t.shape),
                                  "data_offsets": [offset, offset + buf.nbytes]}
            bufs.append(buf)
            offset += buf.nbytes
        header["__metadata__"] = {"format": "pt", "parity_format": str(FORMAT_VERSION)}
        hjson = json.dumps(header, separators=(",", ":")).encode()
        hjson += b" " * (-len(hjson) % 8)
        # Hashes (and summaries not made on the device) run beside the write:
        # hashlib releases the GIL, and at about 1.5 GB/s per core sha256
        # would otherwise more than halve the write throughput. Small
        # buffers are done inline: handing them to a thread costs more.
        futures = []
        for (rec, t), buf in zip(items, bufs):
            early = self._early.pop(id(t), None)
            if early is not None and early[0] is t:
                futures.append(early[1])
            elif buf.nbytes >= _POOL_HASH_BYTES:
                futures.append(self._hash_pool().submit(_digest, t, rec.stats, buf))
            else:
                futures.append(None)
        tmp = os.path.join(self.dir, f".shard-{self._shard_no:06d}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(len(hjson).to_bytes(8, "little"))
            fh.write(hjson)
            for buf in bufs:
                fh.write(buf)
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, os.path.join(self.dir, name))
        if self.fsync:
            _fsync_dir(self.dir)
        for (rec, t), buf, fut in zip(items, bufs, futures):
            rec.hash, rec.stats = fut.result() if fut is not None else _digest(t, rec.stats, buf)
        self.bytes_written += offset

    def _hash_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            # One torch thread per worker: the workers are the parallelism.
            self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2), thread_name_prefix="parity-hash",
                                            initializer=torch.set_num_threads, initargs=(1,))
        return self._pool

    def append_manifest(self, records: list[Record]) -> None:
        self._manifest.write("".join(r.to_json() + "\n" for r in records))
        self._manifest.flush()
        if self.fsync:
            os.fsync(self._manifest.fileno())
        self.records_written += len(records)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if not self._manifest.closed:
            self._manifest.close()
        if self.rank == 0:
            self.write_run_info(end_time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                records=self.records_written, bytes=self.bytes_written)


