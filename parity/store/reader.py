"""Reading a dump: validated, memory-mapped, lazy, and never unpickling.

Shards are opened with the safetensors library (``safe_open``: a private,
copy-on-write memory map; it checks every offset, dtype and shape against the
file). When it refuses a file, a reading of our own names the common damage
in one sentence (a truncated file, a header longer than the file). Every
file a manifest line names must be a regular file inside its rank folder.

Every tensor loaded is checked against its manifest hash once per Dump
(``verify``, on by default; docs/dump-format.md gives the cost), so a flipped
byte fails the read instead of passing a comparison.
"""

from __future__ import annotations

import json
import os
import re
import stat
from functools import cached_property

import torch

from parity.errors import DumpError
from parity.store.schema import FORMAT_VERSION, MANIFEST, RANK_FILE, RUN_FILE, Record, dtype_from_name
from parity.store.writer import content_hash, tensor_bytes

_MAX_HEADER = 100 << 20  # the safetensors library's own limit


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path: str, what: str, label: str | None = None) -> os.stat_result:
    """stat() of ``path``, which must be a regular file: opening a FIFO or a
    device named by a dump would block or read forever. ``label``: the
    path as the user named it, for messages."""
    label = label or path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DumpError(f"{what} {label} is missing") from None
    except OSError as exc:
        raise DumpError(f"cannot read {what} {label}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DumpError(f"{what} {label} is {_file_kind(st.st_mode)}, not a regular file")
    return st


def _read_bytes(path: str, what: str, label: str) -> bytes:
    regular_file(path, what, label)
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise DumpError(f"cannot read {what} {label}: {exc.strerror}") from None


def _check_frame(path: str, size: int, label: str) -> None:
    """One clear sentence for the usual damage that safetensors refused: no
    header, a header longer than the file, data cut short."""
    if size < 8:
        raise DumpError(f"shard {label} is truncated ({size} bytes, no header)")
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > size - 8 or n > _MAX_HEADER:
            raise DumpError(f"shard {label} is truncated or corrupt (header of {n} bytes, file of {size})")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            raise DumpError(f"shard {label} has a corrupt header (not JSON)") from None
    if not isinstance(header, dict):
        raise DumpError(f"shard {label} has a corrupt header (a JSON {type(header).__name__}, not an object)")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
            and isinstance(v["data_offsets"][1], int)]
    if ends and 8 + n + max(ends) > size:
        raise DumpError(f"shard {label} is truncated: expected {8 + n + max(ends)} bytes, found {size}")


def _st_reason(exc: Exception) -> str:
    return str(exc).removeprefix("Error while deserializing header: ")


class _Shard:
    """One safetensors file, opened by the safetensors library."""

    def __init__(self, path: str, size: int, label: str):
        from safetensors import SafetensorError, safe_open

        self.path = label  # as the user named it, for messages
        try:
            self._file = safe_open(path, framework="pt")
        except SafetensorError as exc:
            # Our own reading of the frame names the usual damage plainly;
            # anything else gets the library's reason.
            _check_frame(path, size, label)
            raise DumpError(f"shard {label} is corrupt: {_st_reason(exc)}") from None
        except OSError as exc:
            raise DumpError(f"cannot read shard {label}: {exc.strerror or exc}") from None
        self.names = set(self._file.keys())

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError

        if name not in self.names:
            raise DumpError(f"shard {self.path} has no tensor {name!r}")
        try:
            return self._file.get_tensor(name)
        except (SafetensorError, TypeError, RuntimeError) as exc:
            raise DumpError(f"shard {self.path}: tensor {name!r} cannot be read: {_st_reason(exc)}") from None


def _read_manifest(path: str, label: str) -> tuple[list[Record], list[int], bool]:
    """(records, their line numbers, whether the last line was cut short)."""
    lines = _read_bytes(path, "manifest", label).split(b"\n")
    records, numbers, cut = [], [], False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            if i == len(lines) - 1:
                # No newline after it: a line cut short by a crash while it
                # was appended. Everything before it is intact.
                cut = True
                continue
            raise DumpError(f"{label} line {i + 1} is corrupt: {exc}") from None
        try:
            records.append(Record.from_dict(d))
        except ValueError as exc:
            raise DumpError(f"{label} line {i + 1} is corrupt: {exc}") from None
        numbers.append(i + 1)
    return records, numbers, cut


def _check_run(run, label: str) -> dict:
    """run.json must be an object, and the fields readers act on typed."""
    if not isinstance(run, dict):
        raise DumpError(f"{label} is corrupt: a JSON {type(run).__name__}, not an object")
    rules = {"format_version": int, "world_size": int, "complete": bool, "end_time": str,
             "incomplete_reason": str, "precision": str, "token_ids": list}
    for name, typ in rules.items():
        v = run.get(name)
        if v is not None and (not isinstance(v, typ) or (typ is int and isinstance(v, bool))):
            raise DumpError(f"{label} is corrupt: '{name}' must be {typ.__name__}, got {json.dumps(v)[:60]}")
    ids = run.get("token_ids")
    if ids is not None and not (all(isinstance(x, int) for x in ids)
                                or all(isinstance(s, list) and all(isinstance(x, int) for x in s) for s in ids)):
        raise DumpError(f"{label} is corrupt: 'token_ids' must be a list of token ids or one list per sequence")
    version = run.get("format_version")
    if version is not None and version > FORMAT_VERSION:
        raise DumpError(f"{label} has format version {version}; this parity reads up to {FORMAT_VERSION}")
    return run


def _unfinished(info: dict | None, label: str) -> list[str]:
    """Why run.json (or a rank.json) does not describe a finished run."""
    if info is None:
        return []
    if info.get("complete") is True:
        return []
    if info.get("incomplete_reason"):
        return [f"{label}: the run is incomplete: {info['incomplete_reason']}"]
    if "end_time" not in info:
        return [f"{label}: capture never closed (the process was killed, or is still running)"]
    if info.get("complete") is False:
        return [f"{label}: the run closed incomplete (no reason given)"]
    return []


class Dump:
    """One run: run.json plus one folder of records per rank.

    ``verify``: check each loaded tensor against its manifest hash (once per
    tensor and Dump)."""

    def __init__(self, path: str, *, verify: bool = True):
        self.given = str(path)
        self.path = os.path.abspath(path)
        self.verify = verify
        if not os.path.exists(self.path):
            raise DumpError(f"dump dir {path} does not exist")
        if not os.path.isdir(self.path):
            raise DumpError(f"{path} is not a folder")
        try:
            names = os.listdir(self.path)
        except OSError as exc:
            raise DumpError(f"cannot read dump dir {path}: {exc.strerror}") from None
        run_file = os.path.join(self.path, RUN_FILE)
        rank_dirs = sorted(
            (int(m.group(1)), n) for n in names
            if (m := re.fullmatch(r"rank(\d+)", n)) and os.path.isdir(os.path.join(self.path, n)))
        if RUN_FILE not in names and not rank_dirs:
            subruns = sorted(n for n in names if n.startswith("run-"))
            hint = f" (it holds runs {', '.join(subruns)}: name one of them)" if subruns else ""
            raise DumpError(f"{path} is not a parity dump: no {RUN_FILE} and no rank folders{hint}")
        self.run: dict = {}
        self.has_run_file = RUN_FILE in names
        if self.has_run_file:
            label = self.label(RUN_FILE)
            try:
                run = json.loads(_read_bytes(run_file, "run file", label))
            except (ValueError, UnicodeDecodeError) as exc:
                raise DumpError(f"{label} is corrupt: {exc}") from None
            self.run = _check_run(run, label)
        self.rank_dirs = {r: os.path.join(self.path, n) for r, n in rank_dirs}
        self._shards: dict[str, _Shard] = {}
        self._verified: set[tuple] = set()
        self._lines: dict[int, str] = {}     # id(record) -> "rank0/manifest.jsonl line N"
        self._cut: list[str] = []            # manifests whose last line was cut short

    def label(self, rel: str) -> str:
        """A path inside the dump as the user named the dump."""
        return os.path.join(self.given, rel)

    @property
    def ranks(self) -> list[int]:
        return sorted(self.rank_dirs)

    @cached_property
    def _by_rank(self) -> dict[int, list[Record]]:
        out = {}
        for r, d in self.rank_dirs.items():
            m = os.path.join(d, MANIFEST)
            label = self.label(os.path.relpath(m, self.path))
            if not os.path.lexists(m):
                out[r] = []
                continue
            recs, numbers, cut = _read_manifest(m, label)
            if cut:
                self._cut.append(label)
            for rec, n in zip(recs, numbers):
                self._lines[id(rec)] = f"{label} line {n}"
            out[r] = recs
        return out

    def records(self, rank: int | None = None) -> list[Record]:
        """Records in execution order; every rank's when ``rank`` is None."""
        if rank is not None:
            if rank not in self.rank_dirs:
                raise DumpError(f"{self.given} has no rank {rank} (ranks: {self.ranks})")
            return self._by_rank[rank]
        return [rec for r in self.ranks for rec in self._by_rank[r]]

    @cached_property
    def incomplete(self) -> list[str]:
        """Why this run cannot be whole (empty: it closed cleanly). Capture
        writes ``complete`` into run.json and each rank.json at close (false,
        with ``incomplete_reason``, after a failure); older runs wrote only
        ``end_time``."""
        self._by_rank  # noqa: B018 (reading the manifests finds cut lines)
        why = []
        if not self.has_run_file:
            why.append(f"{self.label(RUN_FILE)} is missing")
        else:
            why += _unfinished(self.run, self.label(RUN_FILE))
        for r, d in sorted(self.rank_dirs.items()):
            if not os.path.lexists(os.path.join(d, MANIFEST)):
                why.append(f"{self.label(f'rank{r}')} has no {MANIFEST}")
            if r != 0 or not self.has_run_file:
                why += _unfinished(self._rank_info(r), self.label(f"rank{r}/{RANK_FILE}"))
        why += [f"{m} ends in a line cut short (the run stopped while writing it)" for m in self._cut]
        return why

    def _rank_info(self, rank: int) -> dict | None:
        """rank{R}/rank.json (None in dumps older than it)."""
        path = os.path.join(self.rank_dirs[rank], RANK_FILE)
        if not os.path.lexists(path):
            return None
        label = self.label(f"rank{rank}/{RANK_FILE}")
        try:
            return _check_run(json.loads(_read_bytes(path, "rank file", label)), label)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DumpError(f"{label} is corrupt: {exc}") from None

    @property
    def complete(self) -> bool:
        return not self.incomplete

    def where(self, rec: Record) -> str:
        """The manifest line a record came from."""
        return self._lines.get(id(rec), f"record {rec.key}")

    def stats_only_hint(self) -> str:
        """Why a compare finds no tensor here, when the capture mode is the reason."""
        n = sum(1 for r in self.records() if r.kind == "stats")
        if not n:
            return ""
        return (f"; its {n} records are summaries only (captured with PARITY_DUMP_MODE=stats): capture with "
                "PARITY_DUMP_MODE=full or sample to compare tensors, or screen the summaries with `parity summary-diff`")

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_rank.values())

    def shard_path(self, rec: Record) -> str:
        """The shard ``rec`` names, refused unless it is a regular file inside
        its rank folder: no absolute path, no '..', no link leading out."""
        where = self.where(rec)
        rank_dir = self.rank_dirs.get(rec.rank)
        if rank_dir is None:
            raise DumpError(f"{where}: rank {rec.rank} has no folder rank{rec.rank}/ in {self.given}")
        name = rec.file
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise DumpError(f"{where}: shard name {name!r} is not a file name inside rank{rec.rank}/")
        path = os.path.join(rank_dir, name)
        if os.path.islink(path):
            real, root = os.path.realpath(path), os.path.realpath(rank_dir)
            if os.path.dirname(real) != root:
                raise DumpError(f"{where}: shard {self.label(f'rank{rec.rank}/{name}')} is a link to {real}, "
                                f"outside rank{rec.rank}/")
        return path

    def drop_maps(self) -> None:
        """Forget every open shard, so its pages can leave memory once no
        tensor views them."""
        self._shards.clear()

    def open_shard(self, rec: Record) -> _Shard:
        """The shard ``rec`` names, opened (and checked) once per Dump."""
        path = self.shard_path(rec)
        sh = self._shards.get(path)
        if sh is None:
            label = self.label(os.path.relpath(path, self.path))
            try:
                st = regular_file(path, "shard", label)
            except DumpError as exc:
                raise DumpError(f"{exc} (named by {self.where(rec)})") from None
            sh = self._shards[path] = _Shard(path, st.st_size, label)
        return sh

    def load(self, rec: Record, *, verify: bool | None = None) -> torch.Tensor:
        """The record's tensor, memory-mapped. ``verify`` (default: the
        Dump's) checks its bytes against the manifest hash."""
        if rec.kind != "tensor" or not rec.file:
            raise DumpError(f"record {rec.key} holds summary statistics only (captured in stats mode)")
        sh = self.open_shard(rec)
        t = sh.tensor(rec.tensor)
        if list(t.shape) != list(rec.shape) or t.dtype != dtype_from_name(rec.dtype):
            raise DumpError(f"{sh.path}: tensor {rec.tensor} is {list(t.shape)} {t.dtype}, "
                            f"the manifest says {rec.shape} {rec.dtype} ({self.where(rec)})")
        if self.verify if verify is None else verify:
            self._check_hash(rec, sh, t)
        return t

    def _check_hash(self, rec: Record, sh: _Shard, t: torch.Tensor) -> None:
        done = (rec.rank, rec.file, rec.tensor, rec.hash)
        if rec.hash is None or done in self._verified:
            return
        if content_hash(tensor_bytes(t)) != rec.hash:
            raise DumpError(f"{sh.path}: tensor {rec.tensor} ({rec.key}) does not match its hash "
                            f"({self.where(rec)}): the shard is corrupt")
        self._verified.add(done)

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


def open_dump(path: str, *, verify: bool = True) -> Dump:
    return Dump(path, verify=verify)
