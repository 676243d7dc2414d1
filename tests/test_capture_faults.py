"""Capture under faults: nothing hangs, nothing queued is lost, the host is untouched.

Every case checks that close() returns in bounded time (a subprocess with a
timeout where a hang would take the test down with it), the one message
capture prints, that the records taken before a failure are on disk and
readable, that the host's outputs are bitwise unchanged, and what run.json
says about completeness.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch import nn

from parity import capture
from parity.capture import session as session_mod
from parity.capture.taps import state
from parity.config import CaptureConfig
from parity.errors import DumpError
from parity.store import open_dump
from parity.store import writer as writer_mod
from parity.store.writer import LOCK_FILE, DumpWriter, claim_run_dir, lock_holder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Odd(nn.Module):
    """Returns a good tensor and, from its child, whatever ``make`` builds."""

    def __init__(self, make, after=0):
        super().__init__()
        self.good = nn.Linear(4, 4)
        self.odd = _Maker(make, after)

    def forward(self, x):
        y = self.good(x)
        self.odd(y)
        return y * 2


class _Maker(nn.Module):
    def __init__(self, make, after):
        super().__init__()
        self.make, self.after, self.n = make, after, 0

    def forward(self, y):
        self.n += 1
        return self.make(y) if self.n > self.after else y + 1


def _quantized(y):
    return torch.quantize_per_tensor(y.detach(), 0.1, 0, torch.qint8)


def _nested(y):
    return torch.nested.nested_tensor([y[0].detach(), y[0, :2].detach()])


class _Sub(torch.Tensor):
    pass


KINDS = {
    "complex": lambda y: torch.complex(y, y),
    "sparse_coo": lambda y: y.to_sparse(),
    "sparse_csr": lambda y: y.detach().to_sparse_csr(),
    "meta": lambda y: torch.empty(y.shape, device="meta"),
    "quantized": _quantized,
    "nested": _nested,
    "subclass": lambda y: y.detach().as_subclass(_Sub),
    "complex128": lambda y: torch.complex(y.double(), y.double()),
}


def _close_within(handle, seconds=10.0):
    t = threading.Thread(target=handle.close, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"close() still running after {seconds} s"
    return time.monotonic() - start


def _cfg(tmp_path, name="d", **kw):
    kw.setdefault("calls", None)
    return CaptureConfig(dump_dir=str(tmp_path / name), **kw)


def _run_json(path):
    with open(os.path.join(path, "run.json")) as fh:
        return json.load(fh)


def _readable(path):
    """Every record of the dump loads and matches its hash."""
    dump = open_dump(str(path))
    for r in dump.records():
        if r.kind == "tensor":
            dump.load(r, verify=True)
    shards = {f for f in os.listdir(os.path.join(path, "rank0")) if f.endswith(".safetensors")}
    assert shards == {r.file for r in dump.records() if r.file}, "a shard no manifest line names"
    return dump


def _py(code, tmp_path, timeout=40, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("PARITY_")}
    base.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=base, capture_output=True, text=True,
                          timeout=timeout)


# ---- unsupported tensor kinds ----------------------------------------------------

@pytest.mark.parametrize("kind", sorted(KINDS))
def test_unsupported_kind_is_skipped_once_and_the_rest_is_written(tmp_path, capsys, kind):
    torch.manual_seed(0)
    model = Odd(KINDS[kind])
    x = torch.randn(3, 4)
    ref = model(x)
    h = capture.install(model, _cfg(tmp_path))
    outs = [model(x) for _ in range(3)]
    assert h.enabled
    _close_within(h)
    assert all(torch.equal(o, ref) for o in outs)
    err = capsys.readouterr().err
    assert err.count("parity: skipping odd:output") == 1 and err.count("parity:") == 1, err
    dump = _readable(tmp_path / "d")
    assert {r.module for r in dump.records()} == {"good", "Odd"} and len(dump.records()) == 6
    run = _run_json(tmp_path / "d")
    assert run["complete"] is True and run["skipped_records"] == 3 and "end_time" in run


def test_complex_output_no_longer_hangs_close(tmp_path):
    """The issue's repro: it exited 124 under `timeout 20`."""
    code = ("import torch,torch.nn as nn;from parity import capture\n"
            "class C(nn.Module):\n"
            "    def forward(s,x): return torch.complex(x,x)\n"
            "m=C();h=capture.install(m);m(torch.ones(2));h.close()")
    p = _py(code, tmp_path, timeout=20, PARITY_DUMP_DIR="cx-dump")
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("parity:") == 1 and "complex64 tensors cannot be captured" in p.stderr
    assert _run_json(tmp_path / "cx-dump")["complete"] is True


def test_sparse_after_eight_good_records_keeps_the_eight(tmp_path, capsys):
    model = Odd(lambda y: y.to_sparse(), after=8)
    h = capture.install(model, _cfg(tmp_path, classes=frozenset({"_Maker"})))
    x = torch.ones(2, 4)
    for _ in range(12):
        model(x)
    _close_within(h)
    err = capsys.readouterr().err
    assert err.count("skipping odd:output") == 1
    recs = _readable(tmp_path / "d").records()
    assert [r.call for r in recs] == list(range(8))
    assert _run_json(tmp_path / "d")["skipped_records"] == 4


def test_unsupported_kinds_in_stats_mode_and_taps(tmp_path, capsys):
    model = Odd(KINDS["complex"])
    h = capture.install(model, _cfg(tmp_path, mode="stats"))
    model(torch.ones(2, 4))
    capture.tap("model.layers.0.names", "not a tensor")
    capture.tap("model.layers.0.names", "still not")
    capture.tap("model.layers.0.ok", torch.arange(3))
    _close_within(h)
    err = capsys.readouterr().err
    assert err.count("skipping") == 2 and "str values" in err
    assert {r.module for r in _readable(tmp_path / "d").records()} == {"good", "Odd", "model.layers.0.ok"}


# ---- failures inside capture --------------------------------------------------------

def test_failed_summary_skips_that_record_only(tmp_path, capsys, monkeypatch):
    real = session_mod.stats_vector

    def flaky(t):
        if t.shape[-1] == 4 and t.dim() == 2 and t.shape[0] == 5:
            raise RuntimeError("summary kernel failed")
        return real(t)

    monkeypatch.setattr(session_mod, "stats_vector", flaky)
    model = Odd(lambda y: y[:1].expand(5, 4))
    h = capture.install(model, _cfg(tmp_path, mode="stats"))
    model(torch.ones(3, 4))
    model(torch.ones(3, 4))
    _close_within(h)
    assert capsys.readouterr().err.count("summary fails") == 1
    recs = _readable(tmp_path / "d").records()
    assert sorted(r.module for r in recs) == ["Odd", "Odd", "good", "good"]
    assert _run_json(tmp_path / "d")["complete"] is True


def test_failure_in_the_writer_for_one_record_keeps_the_others(tmp_path, capsys, monkeypatch):
    real = writer_mod.tensor_stats

    def flaky(t):
        if t.shape == (7,):
            raise MemoryError("no memory for this summary")
        return real(t)

    monkeypatch.setattr(writer_mod, "tensor_stats", flaky)
    model = Odd(lambda y: torch.zeros(7))
    h = capture.install(model, _cfg(tmp_path))
    model(torch.ones(3, 4))
    _close_within(h)
    assert capsys.readouterr().err.count("records that fail to write") == 1
    assert sorted(r.module for r in _readable(tmp_path / "d").records()) == ["Odd", "good"]


def test_hook_failure_still_writes_what_was_queued(tmp_path, capsys, monkeypatch):
    from parity.capture import hooks

    calls = {"n": 0}
    real = hooks.flatten

    def flaky(prefix, value):
        calls["n"] += 1
        if calls["n"] == 9:
            raise ValueError("odd output structure")
        return real(prefix, value)

    monkeypatch.setattr(hooks, "flatten", flaky)
    model = Odd(lambda y: y + 1)
    x = torch.ones(2, 4)
    ref = model(x)
    # a slow disk, so the eight records are still queued when the hook fails
    real_write = writer_mod.os.write
    monkeypatch.setattr(writer_mod.os, "write", lambda fd, b: (time.sleep(0.01), real_write(fd, b))[1])
    h = capture.install(model, _cfg(tmp_path))
    outs = [model(x) for _ in range(5)]
    _close_within(h)
    assert all(torch.equal(o, ref) for o in outs)
    err = capsys.readouterr().err
    assert err.count("capture failed") == 1 and "still written" in err
    assert len(_readable(tmp_path / "d").records()) == 8
    run = _run_json(tmp_path / "d")
    assert run["complete"] is False and "odd output structure" in run["incomplete_reason"]


def test_host_exception_passes_unchanged_and_run_stays_complete(tmp_path):
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            self.lin(x)
            raise KeyError("host's own error")

    model = Boom()
    h = capture.install(model, _cfg(tmp_path))
    with pytest.raises(KeyError, match="host's own error"):
        model(torch.ones(1, 4))
    _close_within(h)
    assert [r.module for r in _readable(tmp_path / "d").records()] == ["lin"]
    assert _run_json(tmp_path / "d")["complete"] is True


# ---- the disk fills up ----------------------------------------------------------------

def _enospc_after(monkeypatch, n):
    """os.write fails with ENOSPC from its n-th call on (0: the first)."""
    real, count = os.write, [0]

    def write(fd, data):
        count[0] += 1
        if count[0] > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(writer_mod.os, "write", write)
    return count


# The writes, in order: install's rank.json and run.json (0, 1); per step a
# shard header, its three tensors and the manifest lines (2-6, 7-11); close's
# rank.json and run.json (12, 13).
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 6, 7, 9, 11, 12, 13])
def test_disk_full_at_any_moment(tmp_path, capsys, monkeypatch, n):
    torch.manual_seed(0)
    model = Odd(lambda y: y + 1)
    x = torch.randn(2, 4)
    ref = model(x)
    count = _enospc_after(monkeypatch, n)
    h = capture.install(model, _cfg(tmp_path))
    outs = []
    for step in range(2):
        h.set_context(step=step)
        outs.append(model(x))
        h.flush()
    _close_within(h)
    assert all(torch.equal(o, ref) for o in outs)
    assert state.session is None
    err = capsys.readouterr().err
    assert count[0] > n and err.count("parity:") == 1 and "No space left" in err, err
    root = tmp_path / "d"
    if n <= 1:
        assert "capture disabled" in err and not (root / "run.json").exists()
        monkeypatch.undo()
        h = capture.install(model, _cfg(tmp_path))  # nothing half-claimed is left to turn it away
        assert h.enabled
        _close_within(h)
        return
    run = _run_json(root)
    assert run["complete"] is False  # written as false at the start, true only by a clean close
    _readable(root)
    assert not (root / "rank0" / LOCK_FILE).exists()


def test_a_failed_write_is_named_in_run_json_once_the_disk_has_room(tmp_path, capsys, monkeypatch):
    real, count = os.write, [0]

    def write(fd, data):  # the first shard's header hits a full disk; later writes find room
        count[0] += 1
        if count[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(writer_mod.os, "write", write)
    model = Odd(lambda y: y + 1)
    h = capture.install(model, _cfg(tmp_path))
    model(torch.ones(2, 4))
    h.flush()
    model(torch.ones(2, 4))
    _close_within(h)
    run = _run_json(tmp_path / "d")
    assert run["complete"] is False and run["records"] == 0
    assert run["incomplete_reason"] == ("capture failed while writing the dump: OSError: "
                                        "[Errno 28] No space left on device")
    assert capsys.readouterr().err.count("parity:") == 1
    assert sorted(os.listdir(tmp_path / "d" / "rank0")) == ["manifest.jsonl", "rank.json"]  # no stray .tmp


def test_disk_full_at_interpreter_exit_does_not_hang(tmp_path):
    code = ("import atexit,errno,os,torch,torch.nn as nn\n"
            "from parity import capture\n"
            "from parity.store import writer\n"
            "def full(fd, b): raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "m=nn.Linear(256,256);h=capture.install(m)\n"
            "for _ in range(20): m(torch.ones(64,256))\n"
            "atexit.register(lambda: setattr(writer.os, 'write', full))\n")
    p = _py(code, tmp_path, PARITY_DUMP_DIR="d", PARITY_DUMP_CALLS="all")
    assert p.returncode == 0 and p.stderr.count("parity:") == 1 and "No space left" in p.stderr, p.stderr
    assert _run_json(tmp_path / "d")["complete"] is False


def test_exit_without_close_writes_every_queued_record(tmp_path):
    """At exit the hash pool is already shut down; large tensors still get
    their hashes, and run.json says complete."""
    code = ("import torch,torch.nn as nn\nfrom parity import capture\n"
            "m=nn.Linear(512,512);h=capture.install(m)\n"
            "for _ in range(20): m(torch.ones(512,512))\n")  # 1 MB outputs: hashed in the pool
    p = _py(code, tmp_path, PARITY_DUMP_DIR="d", PARITY_DUMP_CALLS="all")
    assert p.returncode == 0 and "parity:" not in p.stderr, p.stderr
    run = _run_json(tmp_path / "d")
    assert run["complete"] is True and run["records"] == 20
    assert len(_readable(tmp_path / "d").records()) == 20


# ---- a writer that stops moving --------------------------------------------------------

def _hang_writes(monkeypatch):
    release = threading.Event()
    real = os.write

    def write(fd, data):
        release.wait()
        return real(fd, data)

    monkeypatch.setattr(session_mod, "_STALL_S", 0.5)
    return release, write


def test_close_gives_up_on_a_stuck_writer(tmp_path, capsys, monkeypatch):
    release, write = _hang_writes(monkeypatch)
    model = Odd(lambda y: y + 1)
    h = capture.install(model, _cfg(tmp_path))
    monkeypatch.setattr(writer_mod.os, "write", write)
    model(torch.ones(2, 4))
    try:
        assert _close_within(h, 10) < 5
        assert "made no progress" in capsys.readouterr().err
        assert _run_json(tmp_path / "d")["complete"] is False
    finally:
        release.set()


def test_full_queue_and_flush_never_block_the_host_for_good(tmp_path, capsys, monkeypatch):
    release, write = _hang_writes(monkeypatch)
    model = Odd(lambda y: y + 1)
    x = torch.ones(2, 4)
    ref = model(x)
    h = capture.install(model, _cfg(tmp_path, queue_size=1))
    monkeypatch.setattr(writer_mod.os, "write", write)
    try:
        start = time.monotonic()
        outs = [model(x) for _ in range(4)]
        h.flush()
        assert time.monotonic() - start < 5 and all(torch.equal(o, ref) for o in outs)
        assert not h.enabled
        _close_within(h, 10)
        err = capsys.readouterr().err
        assert err.count("capture failed") == 1 and "no progress" in err
    finally:
        release.set()


# ---- completeness -----------------------------------------------------------------------

def test_run_json_completeness_fields(tmp_path):
    model = Odd(lambda y: y + 1)
    h = capture.install(model, _cfg(tmp_path))
    run = _run_json(tmp_path / "d")
    assert run["complete"] is False and "end_time" not in run and "start_time" in run
    model(torch.ones(2, 4))
    _close_within(h)
    run = _run_json(tmp_path / "d")
    assert run["complete"] is True and "incomplete_reason" not in run
    assert run["records"] == 3 and run["bytes"] == 3 * 2 * 4 * 4 and run["end_time"] >= run["start_time"]
    rank = json.loads((tmp_path / "d" / "rank0" / "rank.json").read_text())
    assert rank["complete"] is True and rank["records"] == 3
    assert not (tmp_path / "d" / "rank0" / LOCK_FILE).exists()


def test_byte_budget_marks_the_run_incomplete(tmp_path, capsys):
    model = Odd(lambda y: y + 1)
    h = capture.install(model, _cfg(tmp_path, max_bytes=40))
    model(torch.ones(2, 4))
    _close_within(h)
    run = _run_json(tmp_path / "d")
    assert run["complete"] is False and "PARITY_DUMP_MAX_BYTES" in run["incomplete_reason"]
    assert capsys.readouterr().err.count("capture stopped") == 1


def test_killed_run_lacks_end_time_and_its_lock_is_stale(tmp_path):
    code = ("import os,signal,torch,torch.nn as nn\nfrom parity import capture\n"
            "m=nn.Linear(4,4);h=capture.install(m)\n"
            "for _ in range(3): m(torch.ones(1,4))\n"
            "h.flush();os.kill(os.getpid(), signal.SIGKILL)\n")
    p = _py(code, tmp_path, PARITY_DUMP_DIR="d", PARITY_DUMP_CALLS="all")
    assert p.returncode == -signal.SIGKILL
    root = tmp_path / "d"
    run = _run_json(root)
    assert run["complete"] is False and "end_time" not in run
    assert (root / "rank0" / LOCK_FILE).exists() and lock_holder(str(root / "rank0")) is None
    assert len(_readable(root).records()) == 3


# ---- claiming a run folder -----------------------------------------------------------------

_SECOND = ("import torch,torch.nn as nn\nfrom parity import capture\n"
           "m=nn.Linear(4,4);h=capture.install(m);m(torch.ones(1,4))\n"
           "print('enabled' if h.enabled else 'disabled');h.close()\n")


@pytest.mark.parametrize("policy", ["overwrite", "error"])
def test_second_process_never_shares_a_live_run_folder(tmp_path, policy):
    model = Odd(lambda y: y + 1)
    h = capture.install(model, _cfg(tmp_path))
    model(torch.ones(2, 4))
    h.flush()
    before = sorted(os.listdir(tmp_path / "d" / "rank0"))
    p = _py(_SECOND, tmp_path, PARITY_DUMP_DIR="d", PARITY_DUMP_EXISTING=policy)
    assert p.returncode == 0 and p.stdout.strip() == "disabled"
    assert p.stderr.count("parity:") == 1 and "being written by another capture" in p.stderr
    assert f"pid {os.getpid()}" in p.stderr
    assert sorted(os.listdir(tmp_path / "d" / "rank0")) == before
    model(torch.ones(2, 4))
    _close_within(h)
    run = _run_json(tmp_path / "d")
    assert run["pid"] == os.getpid() and run["complete"] is True
    assert len(_readable(tmp_path / "d").records()) == 6


def test_stale_lock_is_taken_over_by_overwrite(tmp_path):
    root = tmp_path / "d"
    (root / "rank0").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os;print(os.getpid())"], capture_output=True, text=True)
    (root / "rank0" / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    p = _py(_SECOND, tmp_path, PARITY_DUMP_DIR="d", PARITY_DUMP_EXISTING="overwrite")
    assert p.returncode == 0 and p.stdout.strip() == "enabled", p.stderr
    assert p.stderr.count("parity:") == 1 and "no longer running" in p.stderr
    assert _run_json(root)["complete"] is True and not (root / "rank0" / LOCK_FILE).exists()


def test_lock_holder_names_the_live_writer(tmp_path):
    w = DumpWriter(str(tmp_path / "d"), fsync=False)
    info = lock_holder(w.dir)
    assert info["pid"] == os.getpid() and info["host"] == os.uname().nodename
    with pytest.raises(DumpError, match="being written by another capture"):
        DumpWriter(str(tmp_path / "d"), if_exists="overwrite")
    w.close()
    assert lock_holder(w.dir) is None and not os.path.exists(os.path.join(w.dir, LOCK_FILE))


def test_new_policy_claims_distinct_subfolders(tmp_path):
    w = DumpWriter(str(tmp_path / "d"), fsync=False)  # live, with an empty manifest
    a, la = claim_run_dir(str(tmp_path / "d"), "new")
    b, lb = claim_run_dir(str(tmp_path / "d"), "new")
    assert a.endswith("run-001") and b.endswith("run-002")
    for lock in (la, lb):
        lock.release()
    w.close()


def test_ranks_of_one_run_share_a_folder_and_strangers_are_kept_out(tmp_path):
    root = str(tmp_path / "d")
    r1 = DumpWriter(root, 1, 2, fsync=False)        # rank 1 may start first
    r0 = DumpWriter(root, 0, 2, fsync=False)        # 'error' does not count it as an old run
    r0.close()
    r1.close()
    assert sorted(os.listdir(root)) == ["rank0", "rank1", "run.json"]
    live = DumpWriter(root, 1, 2, if_exists="overwrite", fsync=False)
    with pytest.raises(DumpError, match="being written"):
        DumpWriter(root, 0, 1, if_exists="overwrite")  # would clear the live rank 1
    assert os.path.exists(os.path.join(root, "rank1", "manifest.jsonl"))
    live.close()
    DumpWriter(root, 0, 1, if_exists="overwrite", fsync=False).close()
    assert sorted(os.listdir(root)) == ["rank0", "run.json"]


# ---- filters that match nothing, invalid values --------------------------------------------

@pytest.mark.parametrize("env, said", [
    ({"PARITY_DUMP_CALLS": "-1"}, "PARITY_DUMP_CALLS='-1': indices cannot be negative"),
    ({"PARITY_DUMP_LAYERS": "-1"}, "PARITY_DUMP_LAYERS='-1': indices cannot be negative"),
    ({"PARITY_DUMP_LAYERS": ","}, "selects nothing"),
    ({"PARITY_DUMP_CLASSES": ","}, "names no class"),
    ({"PARITY_DUMP_CLASSES": "NoSuchClass", "PARITY_DUMP_STAGES": "outputs"},
     "capture disabled: PARITY_DUMP_CLASSES: Odd has no module of class NoSuchClass"),
    ({"PARITY_DUMP_MODULES": "nothing$", "PARITY_DUMP_STAGES": "inputs"}, "matches no module path of Odd"),
])
def test_filters_that_select_nothing_disable_capture_with_one_line(tmp_path, capsys, monkeypatch, env, said):
    monkeypatch.setenv("PARITY_DUMP_DIR", str(tmp_path / "d"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    model = Odd(lambda y: y + 1)
    h = capture.install(model)
    assert not h.enabled and h.hook_count == 0
    err = capsys.readouterr().err
    assert err.count("parity:") == 1 and said in err, err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("cfg, said, modules", [
    ({"classes": frozenset({"Linear", "Nope"})}, "no module of class Nope", {"good"}),
    ({"layers": frozenset({7})}, "PARITY_DUMP_LAYERS=7 matches no layer of Odd (no module of it is in a layer)",
     {"good", "odd", "Odd"}),
    ({"classes": frozenset({"NoSuchClass"})}, "only taps are captured", set()),
])
def test_filters_matching_nothing_are_said_once_and_capture_goes_on(tmp_path, capsys, cfg, said, modules):
    model = Odd(lambda y: y + 1)
    h = capture.install(model, _cfg(tmp_path, **cfg))
    model(torch.ones(2, 4))
    _close_within(h)
    lines = capsys.readouterr().err.splitlines()
    assert said in lines[0] and lines[0].startswith("parity: "), lines
    # the one line at install; an empty dump is said once more when it closes
    assert lines[1:] == ([] if modules else [next(ln for ln in lines if "no record was captured" in ln)])
    assert {r.module for r in open_dump(str(tmp_path / "d")).records()} == modules


def test_calls_that_never_happen_say_so_at_close(tmp_path, capsys):
    model = Odd(lambda y: y + 1)
    h = capture.install(model, _cfg(tmp_path, calls=frozenset({5})))
    model(torch.ones(2, 4))
    _close_within(h)
    assert capsys.readouterr().err.count("no record was captured") == 1
    assert _run_json(tmp_path / "d")["complete"] is True


# ---- odds and ends ------------------------------------------------------------------------------

def test_context_values_json_cannot_hold_never_reach_the_host(tmp_path):
    import numpy as np

    model = Odd(lambda y: y + 1)
    h = capture.install(model, _cfg(tmp_path))
    h.set_context(phase="prefill", step=0, seq_ids=np.array([3, 4]), owner=object())
    model(torch.ones(2, 4))
    _close_within(h)
    meta = _readable(tmp_path / "d").records()[0].meta
    assert meta["seq_ids"] == [3, 4] and meta["owner"].startswith("<object")


def test_weight_dump_skips_meta_and_complex_parameters(tmp_path, capsys):
    model = nn.Module()
    model.real = nn.Linear(2, 2)
    model.lazy = nn.Parameter(torch.empty(3, device="meta"))
    model.register_buffer("phase", torch.complex(torch.ones(2), torch.ones(2)))
    n = capture.dump_weights(model, str(tmp_path / "w"))
    assert n == 2
    err = capsys.readouterr().err
    assert err.count("weight dump skips") == 2 and "tensors on meta" in err
    run = _run_json(tmp_path / "w")
    assert run["complete"] is True and run["skipped_records"] == 2
    assert {r.module for r in _readable(tmp_path / "w").records()} == {"real.weight", "real.bias"}


def test_a_forked_child_leaves_the_parents_run_alone(tmp_path):
    model = Odd(lambda y: y + 1)
    h = capture.install(model, _cfg(tmp_path))
    model(torch.ones(2, 4))
    pid = os.fork()
    if pid == 0:  # what the child's atexit would run: close the inherited session
        try:
            h._session.close()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert lock_holder(str(tmp_path / "d" / "rank0"))["pid"] == os.getpid()
    assert _run_json(tmp_path / "d")["complete"] is False
    model(torch.ones(2, 4))
    _close_within(h)
    assert _run_json(tmp_path / "d")["complete"] is True and len(_readable(tmp_path / "d").records()) == 6


def test_close_twice_and_after_failure_is_harmless(tmp_path, monkeypatch):
    model = Odd(lambda y: y + 1)
    h = capture.install(model, _cfg(tmp_path))
    s = h._session
    model(torch.ones(2, 4))
    _close_within(h)
    s.close()
    h.close()
    assert _run_json(tmp_path / "d")["complete"] is True


# ---- the same on a CUDA device (run with -m gpu) -----------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["full", "stats"])
def test_cuda_unsupported_kind_and_full_disk(tmp_path, capsys, monkeypatch, mode):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    model = Odd(KINDS["complex"]).cuda()
    x = torch.randn(3, 4, device="cuda")
    ref = model(x)
    h = capture.install(model, _cfg(tmp_path, mode=mode))
    outs = [model(x) for _ in range(3)]
    h.set_context(step=1)  # ships the held CUDA group
    h.flush()
    assert len(_readable(tmp_path / "d").records()) == 6
    _enospc_after(monkeypatch, 0)
    outs += [model(x) for _ in range(3)]
    h.set_context(step=2)
    _close_within(h)
    assert all(torch.equal(o, ref) for o in outs)
    err = capsys.readouterr().err
    assert err.count("skipping odd:output") == 1 and err.count("capture failed") == 1 and "No space left" in err
    assert len(_readable(tmp_path / "d").records()) == 6
    assert _run_json(tmp_path / "d")["complete"] is False
