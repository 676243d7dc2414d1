"""Atomic, crash-safe writing of a dump.

A shard is written under a temporary name, flushed to disk, then renamed;
only then are its manifest lines appended. A crash at any point leaves a dump
whose manifest names only complete shards.

A rank folder belongs to one writer at a time: ``rank{R}/writer.lock`` is
created exclusively and held with ``flock`` while the writer lives, so a
second process never writes into (or clears) a folder that is being written.
The kernel drops the flock when its process dies, so a crashed writer's lock
file is recognisably stale and the next writer takes it over.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from parity import __version__
from parity.errors import DumpError
from parity.store.stats import tensor_stats
from parity.store.schema import FORMAT_VERSION, MANIFEST, RUN_FILE, Record, dtype_name, st_code

LOCK_FILE = "writer.lock"
RANK_FILE = "rank.json"
_POOL_HASH_BYTES = 1 << 20
_KEEP_GIL_BYTES = 256 << 10
_GIL_FREE_PIECE = 2047  # hashlib keeps the GIL below 2048 bytes
_WRITE_PIECE = 16 << 20  # progress is visible between pieces of a large write
_SHARD_RE = re.compile(r"^shard-\d{6}\.safetensors$")
_RANK_RE = re.compile(r"^rank(\d+)$")
# flock is not offered by every filesystem; there a lock's liveness is judged
# from the pid and host written in it.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _say(msg: str) -> None:
    try:
        print(f"parity: {msg}", file=sys.stderr, flush=True)
    except Exception:  # stderr closed: nothing left to tell
        pass


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---- the rank folder's lock -----------------------------------------------

class RankLock:
    """The exclusive claim of one rank folder, held until ``release``."""

    def __init__(self, path: str, fd: int, previous: dict | None):
        self.path, self._fd = path, fd
        self.previous = previous  # the dead writer whose stale lock was taken over, if any

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            # Unlinked while still held, so nobody can lock the old inode and
            # believe it owns the path.
            if _same_file(self._fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None


def _flock(fd: int, exclusive: bool = True) -> bool | None:
    """True: locked. False: another process holds it. None: no flock here."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in _NO_FLOCK:
            return None
        raise


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_lock_info(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(info: dict) -> bool:
    """Whether the writer named in a lock may still run. Only a pid on this
    host can be checked; anything else counts as alive."""
    pid = info.get("pid")
    if info.get("host") != socket.gethostname() or not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(info: dict) -> str:
    pid, host = info.get("pid", "?"), info.get("host", "?")
    return f"pid {pid} on {host}" + (f", since {info['start_time']}" if info.get("start_time") else "")


def lock_rank_dir(rank_dir: str) -> RankLock:
    """Claim ``rank_dir`` for this process, or raise DumpError naming the
    live writer that holds it. A stale lock (its writer is gone) is taken
    over; ``RankLock.previous`` then says whose it was."""
    path = os.path.join(rank_dir, LOCK_FILE)
    while True:
        try:
            fd, fresh = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, fresh = os.open(path, os.O_RDWR), False
            except FileNotFoundError:
                continue  # its writer just released it: try again
        try:
            got = _flock(fd)
            info = {} if fresh else _read_lock_info(fd)
            if got is None:
                got = fresh or not _pid_alive(info)
            if not got:
                raise DumpError(f"{rank_dir} is being written by another capture ({_holder(info)}; lock file "
                                f"{path}); choose another folder, or PARITY_DUMP_EXISTING=new")
            if not _same_file(fd, path):
                os.close(fd)  # released and unlinked between our open and our flock
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "start_time": _now()}).encode(), 0)
            return RankLock(path, fd, None if fresh else info)
        except BaseException:
            os.close(fd)
            raise


def lock_holder(rank_dir: str) -> dict | None:
    """The live writer of ``rank_dir`` ({"pid", "host", "start_time"}), or
    None when no writer holds it (no lock file, or a stale one)."""
    path = os.path.join(rank_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        info = _read_lock_info(fd)
        free = _flock(fd, exclusive=False)
        if free is None:
            return info if _pid_alive(info) else None
        return None if free else info
    finally:
        os.close(fd)  # drops our shared flock too


# ---- claiming a run folder --------------------------------------------------

def _rank_dirs(root: str) -> dict[int, str]:
    try:
        names = os.listdir(root)
    except OSError:
        return {}
    return {int(m.group(1)): os.path.join(root, n) for n in names if (m := _RANK_RE.match(n))}


def _taken(root: str, rank: int, world_size: int) -> bool:
    """Whether files this rank would write (or, for rank 0, run.json and the
    folders of ranks outside this run) are already there. Ranks 1.. of the
    same run are this run's own and never make the folder taken."""
    if os.path.exists(os.path.join(root, f"rank{rank}", MANIFEST)):
        return True
    if rank != 0:
        return False
    return os.path.exists(os.path.join(root, RUN_FILE)) or any(
        os.path.exists(os.path.join(d, MANIFEST)) for r, d in _rank_dirs(root).items() if r >= world_size)


def _remove_rank_files(d: str) -> None:
    # Only files parity wrote are removed; anything else of the user's stays.
    for f in os.listdir(d):
        if f in (MANIFEST, RANK_FILE) or _SHARD_RE.match(f) or f.startswith(".shard-"):
            os.remove(os.path.join(d, f))


def _remove_run(root: str, rank: int, world_size: int) -> None:
    """Clear the old run's files this rank is responsible for: its own rank
    folder, and for rank 0 run.json and the folders of ranks beyond this
    run's world size. Another rank's folder is cleared only under its lock,
    so a live writer's files are never touched."""
    _remove_rank_files(os.path.join(root, f"rank{rank}"))
    if rank != 0:
        return
    for r, d in sorted(_rank_dirs(root).items()):
        if r < world_size or not os.path.isdir(d):
            continue
        lock = lock_rank_dir(d)  # raises while its writer lives
        try:
            _remove_rank_files(d)
        finally:
            lock.release()
        if not os.listdir(d):
            os.rmdir(d)
    for name in (RUN_FILE, RUN_FILE + ".tmp"):
        if os.path.exists(os.path.join(root, name)):
            os.remove(os.path.join(root, name))


def claim_run_dir(root: str, if_exists: str = "error", rank: int = 0, world_size: int = 1) -> tuple[str, RankLock]:
    """The folder this run writes into and the lock of its rank folder.

    The rank folder is locked before anything is checked or removed, so two
    writers never share it; a folder that already holds a run follows
    ``if_exists``: 'error' refuses, 'overwrite' removes the old run's files,
    'new' claims a fresh ``run-NNN`` subfolder (created exclusively)."""
    if if_exists not in ("error", "overwrite", "new"):
        raise DumpError(f"unknown existing-run policy {if_exists!r}")
    root = os.path.abspath(root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise DumpError(f"dump dir {root} exists and is not a folder")
    rank_dir = os.path.join(root, f"rank{rank}")
    os.makedirs(rank_dir, exist_ok=True)
    try:
        lock = lock_rank_dir(rank_dir)
    except DumpError:
        if if_exists == "new":
            return _claim_subfolder(root, rank)
        raise
    try:
        if _taken(root, rank, world_size):
            if if_exists == "error":
                raise DumpError(
                    f"dump dir {root} already holds a run; choose another folder, or set "
                    "PARITY_DUMP_EXISTING=overwrite (replace it) or =new (write into a fresh run-NNN subfolder)")
            if if_exists == "new":
                lock.release()
                return _claim_subfolder(root, rank)
            _remove_run(root, rank, world_size)
    except BaseException:
        lock.release()
        raise
    if lock.previous is not None:
        _say(f"took over {rank_dir} from a capture that is no longer running ({_holder(lock.previous)})")
    return root, lock


def _claim_subfolder(root: str, rank: int) -> tuple[str, RankLock]:
    n = 1
    while True:
        sub = os.path.join(root, f"run-{n:03d}")
        try:
            os.mkdir(sub)  # exclusive: of two writers only one creates it
        except FileExistsError:
            n += 1
            continue
        rank_dir = os.path.join(sub, f"rank{rank}")
        os.makedirs(rank_dir, exist_ok=True)
        return sub, lock_rank_dir(rank_dir)


def prepare_run_dir(root: str, if_exists: str = "error", rank: int = 0) -> str:
    """Return the folder a run would write into, applying ``if_exists`` as
    ``claim_run_dir`` does; the claim is not kept."""
    root, lock = claim_run_dir(root, if_exists, rank)
    lock.release()
    return root


# ---- files ----------------------------------------------------------------------

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


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _truncate(fd: int, size: int) -> bool:
    try:
        os.ftruncate(fd, size)
    except OSError:
        return False
    return True


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
        self.root, self._lock = claim_run_dir(root, if_exists, rank, world_size)
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
        self.progress = 0  # bytes handed to the disk so far, shards and manifest
        self._manifest: int | None = None
        self.run_info = {
            "format_version": FORMAT_VERSION,
            "tool": "parity",
            "tool_version": __version__,
            "torch_version": torch.__version__,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": _now(),
            "world_size": world_size,
            "complete": False,
        }
        self.run_info.update(run_info or {})
        try:
            self._manifest = os.open(os.path.join(self.dir, MANIFEST), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._write_rank_info(complete=False)
            if rank == 0:
                self.write_run_info()
        except BaseException:
            # A folder left half-claimed would read as an old run and turn the
            # next capture away: take back what this writer made.
            self._give_up()
            _remove_rank_files(self.dir)
            try:
                os.rmdir(self.dir)
            except OSError:
                pass
            raise

    # ---- small files --------------------------------------------------------
    def _write_all(self, fd: int, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(fd, view[:_WRITE_PIECE])
            view = view[n:]
            self.progress += n

    def _write_json(self, path: str, obj: dict) -> None:
        """Replace ``path`` atomically; a failed write leaves the old file."""
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                self._write_all(fd, json.dumps(obj, indent=1, default=str).encode())
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise

    def write_run_info(self, **updates) -> None:
        self.run_info.update(updates)
        if self.rank == 0:
            self._write_json(os.path.join(self.root, RUN_FILE), self.run_info)

    def _write_rank_info(self, **fields) -> None:
        info = {"rank": self.rank, "world_size": self.world_size, "pid": os.getpid(),
                "host": socket.gethostname(), "start_time": self.run_info["start_time"], **fields}
        self._write_json(os.path.join(self.dir, RANK_FILE), info)

    # ---- records ------------------------------------------------------------
    def next_seq(self) -> int:
        s = self._seq
        self._seq += 1
        return s

    def digest_soon(self, rec: Record, t: torch.Tensor) -> None:
        """Start hashing (and summarising) a large CPU tensor now, in the pool,
        so the work overlaps the previous shard's write and fsync instead of
        waiting for this tensor's own shard."""
        if t.numel() * t.element_size() >= _POOL_HASH_BYTES:
            self._early[id(t)] = (t, self._submit(_digest, t, rec.stats, tensor_bytes(t)))

    def drop_early(self) -> None:
        """Forget digests started for tensors that will not be written."""
        self._early.clear()

    def write_batch(self, items: list[tuple[Record, torch.Tensor | None]]) -> list[Record]:
        """Write the tensors of ``items`` (CPU tensors; None for a stats-only
        record) as one shard, then every record's manifest line, in order.
        Returns the records as written; the given ones are left as they were."""
        placed = [(rec, t) for rec, t in items if t is not None]
        shard = self._write_shard(placed) if placed else None
        written = iter([rec for rec, _ in placed])
        records = [rec if t is None else next(written) for rec, t in items]
        try:
            text = "".join(rec.to_json() + "\n" for rec in records)
        except BaseException:
            if shard is not None:  # no line will name it
                _remove_quietly(shard)
            raise
        self._append_manifest(text, len(items), shard)
        if placed:
            self.bytes_written += sum(t.numel() * t.element_size() for _, t in placed)
        return records

    def _write_shard(self, items: list[tuple[Record, torch.Tensor]]) -> str:
        """Write ``items`` as one shard and return its path. Each item of the
        list is replaced by its record as written: tensor name, file, shape,
        dtype, hash and summary (the caller's records are never changed)."""
        self._shard_no += 1
        name = f"shard-{self._shard_no:06d}.safetensors"
        bufs, names, header, offset = [], [], {}, 0
        for rec, t in items:
            buf = tensor_bytes(t)
            names.append(f"t{rec.seq:07d}")
            header[names[-1]] = {"dtype": st_code(t.dtype), "shape": list(t.shape),
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
                futures.append(self._submit(_digest, t, rec.stats, buf))
            else:
                futures.append(None)
        tmp = os.path.join(self.dir, f".shard-{self._shard_no:06d}.tmp")
        final = os.path.join(self.dir, name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                self._write_all(fd, len(hjson).to_bytes(8, "little") + hjson)
                for buf in bufs:
                    self._write_all(fd, buf)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            # The shard takes its final name only once every record in it has
            # its hash and summary: a failure leaves no shard without lines.
            digests = [fut.result() if fut is not None else _digest(t, rec.stats, buf)
                       for (rec, t), buf, fut in zip(items, bufs, futures)]
            items[:] = [(dataclasses.replace(rec, tensor=tensor, file=name, shape=list(t.shape),
                                             dtype=dtype_name(t.dtype), hash=digest, stats=stats), t)
                        for (rec, t), tensor, (digest, stats) in zip(items, names, digests)]
            os.replace(tmp, final)
        except BaseException:
            _remove_quietly(tmp)
            raise
        if self.fsync:
            _fsync_dir(self.dir)
        return final

    def _submit(self, fn, *args) -> Future:
        try:
            return self._hash_pool().submit(fn, *args)
        except RuntimeError:
            # At interpreter exit the pool refuses new work (concurrent.futures
            # shuts down before atexit runs close()): do it here instead.
            fut: Future = Future()
            fut.set_result(fn(*args))
            return fut

    def _hash_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            # One torch thread per worker: the workers are the parallelism.
            self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2), thread_name_prefix="parity-hash",
                                            initializer=torch.set_num_threads, initargs=(1,))
        return self._pool

    def append_manifest(self, records: list[Record]) -> None:
        self._append_manifest("".join(r.to_json() + "\n" for r in records), len(records))

    def _append_manifest(self, text: str, n: int, shard: str | None = None) -> None:
        start = os.lseek(self._manifest, 0, os.SEEK_END)
        try:
            self._write_all(self._manifest, text.encode())
            if self.fsync:
                os.fsync(self._manifest)
        except BaseException:
            # Take back what part of the lines was written, then the shard
            # they name: a failed append leaves neither a cut line nor a shard
            # that no line names. Where even that fails, both stay.
            if _truncate(self._manifest, start) and shard is not None:
                _remove_quietly(shard)
            raise
        self.records_written += n

    # ---- the end ------------------------------------------------------------------
    def close(self, incomplete_reason: str | None = None, **fields) -> None:
        """Finish the run: totals, end time and completeness (and ``fields``)
        into run.json (rank 0) and rank.json, then release the folder.
        ``incomplete_reason`` says why the run is not whole (a failed write,
        a stopped capture)."""
        try:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            done = {"end_time": _now(), "records": self.records_written, "bytes": self.bytes_written,
                    **fields, "complete": incomplete_reason is None}
            if incomplete_reason is not None:
                done["incomplete_reason"] = incomplete_reason
            self._write_rank_info(**done)
            if self.rank == 0:
                self.write_run_info(**done)
        finally:
            self._give_up()

    def _give_up(self) -> None:
        """Close the manifest and release the folder, whatever state it is in."""
        if self._manifest is not None:
            try:
                os.close(self._manifest)
            except OSError:
                pass
            self._manifest = None
        self._lock.release()
