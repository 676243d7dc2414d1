"""Bad input, damaged and incomplete dumps, and outputs that would clobber.

Every case asserts the exit code (2: bad input, one message naming the file
and the problem; 1: agreement cannot be claimed), the message, that no
traceback is printed, and that the inputs are byte for byte unchanged.
docs/reliability.md has the table of these cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct

import pytest
import torch
from click.testing import CliRunner

import dumpgen
from parity.cli import cli
from parity.store import DumpWriter, Record

PROMPTS = [[1, 2, 3], [4, 5, 6, 7]]
SHARD = "rank0/shard-000001.safetensors"
MANIFEST = "rank0/manifest.jsonl"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Small complete dumps: a reference, an engine run, a batch of two copies
    of one prompt, and two weight dumps."""
    root = tmp_path_factory.mktemp("bad")
    toy = dumpgen.Toy(hidden=16, layers=2, vocab=31, experts=4)
    d = {"ref": dumpgen.write_reference(root / "ref", toy, PROMPTS, mode="fp32", store=torch.float32,
                                        decode_steps=1),
         "eng": dumpgen.write_engine(root / "eng", toy, PROMPTS, mode="fp32", store=torch.float32,
                                     decode_steps=1),
         "batched": dumpgen.write_engine(root / "batched", toy, [PROMPTS[0], PROMPTS[0]], mode="fp32",
                                         store=torch.float32)}
    for name in ("wref", "wtgt"):
        w = DumpWriter(str(root / name), fsync=False)
        items = [(Record(key=f"model.layers.{i}.w.weight:weight", module=f"model.layers.{i}.w.weight",
                         stage="weight", layer=i, seq=w.next_seq()), torch.full((4, 4), float(i)))
                 for i in range(3)]
        w.write_batch(items)
        w.close()
        d[name] = w.root
    return {k: str(v) for k, v in d.items()}


@pytest.fixture
def copy(base, tmp_path):
    """copy(name) -> a fresh copy of a base dump to damage."""
    def make(name: str, as_name: str | None = None) -> str:
        dst = tmp_path / (as_name or name)
        shutil.copytree(base[name], dst, symlinks=True)
        return str(dst)
    return make


def _digest(paths) -> dict:
    """Every file under ``paths`` -> sha256 (links and special files by kind)."""
    out = {}
    for top in paths:
        for d, dirs, files in os.walk(top):
            for f in files + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
                p = os.path.join(d, f)
                if os.path.islink(p):
                    out[p] = "link:" + os.readlink(p)
                elif os.path.isfile(p):
                    out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
                else:
                    out[p] = "special"
    return out


def cli_run(*args, inputs=(), timeout=60):
    """Run parity in process, asserting no traceback and unchanged inputs."""
    before = _digest(inputs)
    signal.alarm(timeout)  # a read that blocks (a FIFO) must fail the test, not hang it
    try:
        r = CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        signal.alarm(0)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    assert "Traceback" not in r.output
    assert _digest(inputs) == before, "the command changed its inputs"
    return r


def bad(code, fragments, *args, inputs=()):
    r = cli_run(*args, inputs=inputs)
    assert r.exit_code == code, r.output
    for f in fragments:
        assert f in r.output, (f, r.output)
    return r


# ---- damage helpers ---------------------------------------------------------

def _header(path):
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _put_header(path, header, body, raw=None):
    h = raw if raw is not None else json.dumps(header).encode()
    open(path, "wb").write(struct.pack("<Q", len(h)) + h + body)


def _edit_header(fn):
    def damage(d):
        p = os.path.join(d, SHARD)
        h, body = _header(p)
        first = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        _put_header(p, fn(h, first), body)
    return damage


def _raw_header(raw):
    def damage(d):
        p = os.path.join(d, SHARD)
        _, body = _header(p)
        _put_header(p, None, body, raw=raw)
    return damage


def _bytes(fn):
    def damage(d):
        p = os.path.join(d, SHARD)
        data = open(p, "rb").read()
        open(p, "wb").write(fn(data))
    return damage


def _flip_last(b):
    # The lowest mantissa byte of the last float32: a change far below any
    # threshold, which only the hash can see.
    b = bytearray(b)
    b[-4] ^= 0x01
    return bytes(b)


def _set(h, k, field, value):
    h[k][field] = value
    return h


def _overlap(h, first):
    h[first[1]]["data_offsets"][0] = h[first[0]]["data_offsets"][0]
    return h


def _beyond(h, first):
    h[first[-1]]["data_offsets"][1] += 64
    return h


def _rename(h, first):
    h["renamed"] = h.pop(first[0])
    return h


def _manifest_line(i, fn):
    """Rewrite line ``i`` (0-based) of rank0's manifest with fn(dict or raw)."""
    def damage(d):
        p = os.path.join(d, MANIFEST)
        lines = open(p, "rb").read().split(b"\n")
        new = fn(json.loads(lines[i]))
        lines[i] = new if isinstance(new, bytes) else json.dumps(new).encode()
        open(p, "wb").write(b"\n".join(lines))
    return damage


def _field(name, value):
    def fn(rec):
        rec[name] = value
        return rec
    return fn


def _meta(name, value):
    def fn(rec):
        rec["meta"][name] = value
        return rec
    return fn


def _replace_shard(kind):
    def damage(d):
        p = os.path.join(d, SHARD)
        outside = os.path.join(os.path.dirname(d), "outside.safetensors")
        if kind == "link-out":
            shutil.move(p, outside)
            os.symlink(outside, p)
        elif kind == "link-dev":
            os.remove(p)
            os.symlink("/dev/zero", p)
        elif kind == "fifo":
            os.remove(p)
            os.mkfifo(p)
        elif kind == "dir":
            os.remove(p)
            os.mkdir(p)
        elif kind == "missing":
            os.remove(p)
    return damage


# ---- shards: every damage is exit 2 for inspect and for a comparison -------

SHARD_DAMAGE = {
    "flipped_byte": (_bytes(_flip_last), "does not match its hash"),
    "truncated": (_bytes(lambda b: b[: len(b) // 2]), "truncated"),
    "empty": (_bytes(lambda b: b""), "truncated (0 bytes"),
    "header_beyond_file": (_bytes(lambda b: struct.pack("<Q", 1 << 40) + b[8:]), "header of 1099511627776 bytes"),
    "header_not_json": (_raw_header(b"{not json" + b" " * 7), "corrupt header (not JSON)"),
    "header_not_utf8": (_raw_header(b"\xff\xfe\xfd\xfc" + b" " * 4), "corrupt header (not JSON)"),
    "header_a_list": (_raw_header(b"[1, 2]  "), "corrupt header (a JSON list, not an object)"),
    "negative_offset": (_edit_header(lambda h, f: _set(h, f[0], "data_offsets", [-8, h[f[0]]["data_offsets"][1]])),
                        "is corrupt"),
    "overlapping_offsets": (_edit_header(_overlap), "is corrupt: invalid offset"),
    "offsets_beyond_file": (_edit_header(_beyond), "truncated: expected"),
    "shape_vs_bytes": (_edit_header(lambda h, f: _set(h, f[0], "shape", [999])), "is corrupt: invalid shape"),
    "unknown_dtype": (_edit_header(lambda h, f: _set(h, f[0], "dtype", "XX")), "is corrupt"),
    "missing_offsets": (_edit_header(lambda h, f: (h[f[0]].pop("data_offsets"), h)[1]), "is corrupt"),
    "shape_a_string": (_edit_header(lambda h, f: _set(h, f[0], "shape", "4")), "is corrupt"),
    "entry_not_object": (_edit_header(lambda h, f: {**h, f[0]: 5}), "is corrupt"),
    "trailing_bytes": (_bytes(lambda b: b + b"\0" * 16), "is corrupt: incomplete metadata"),
    "tensor_not_in_header": (_edit_header(_rename), "has no tensor"),
    "missing_shard": (_replace_shard("missing"), "is missing (named by"),
    "fifo_shard": (_replace_shard("fifo"), "is a FIFO, not a regular file"),
    "folder_shard": (_replace_shard("dir"), "is a folder, not a regular file"),
    "link_outside": (_replace_shard("link-out"), "outside rank0/"),
    "link_to_device": (_replace_shard("link-dev"), "outside rank0/"),
    "absolute_path": (_manifest_line(0, _field("file", "/etc/passwd")), "not a file name inside rank0/"),
    "dotdot_path": (_manifest_line(0, _field("file", "../rank0/shard-000001.safetensors")),
                    "not a file name inside rank0/"),
    "subfolder_path": (_manifest_line(0, _field("file", "sub/shard-000001.safetensors")),
                       "not a file name inside rank0/"),
    "manifest_shape_differs": (_manifest_line(0, _field("shape", [7, 17])), "the manifest says"),
    "manifest_dtype_differs": (_manifest_line(0, _field("dtype", "float64")), "the manifest says"),
}


@pytest.mark.parametrize("case", sorted(SHARD_DAMAGE))
def test_damaged_shard_inspect_exit_2(case, copy):
    damage, fragment = SHARD_DAMAGE[case]
    d = copy("eng")
    damage(d)
    r = bad(2, [fragment], "inspect", d, "--verify", inputs=[d])
    assert r.output.count("parity: error:") == 1


@pytest.mark.parametrize("case", sorted(SHARD_DAMAGE))
def test_damaged_shard_never_passes_a_comparison(case, base, copy):
    damage, fragment = SHARD_DAMAGE[case]
    d = copy("eng")
    damage(d)
    bad(2, [fragment], "ref-vs-target", "--ref", base["ref"], "--target", d, inputs=[d, base["ref"]])


def test_flipped_byte_fails_every_tensor_reading_command(base, copy):
    d = copy("batched")
    _bytes(_flip_last)(d)
    bad(2, ["does not match its hash"], "slot-invariance", "--dir", d, "--same-prompt", inputs=[d])
    w = copy("wtgt")
    _bytes(_flip_last)(w)
    bad(2, ["does not match its hash"], "weights", "--ref", base["wref"], "--target", w, inputs=[w])


def test_inspect_without_verify_says_hashes_were_not_checked(copy):
    d = copy("eng")
    _bytes(_flip_last)(d)
    r = bad(0, ["hashes not checked: give --verify"], "inspect", d, inputs=[d])
    assert "every hash verified" not in r.output


def test_no_verify_is_an_explicit_opt_out(base, copy):
    d = copy("eng")
    _bytes(_flip_last)(d)
    bad(0, ["pass"], "ref-vs-target", "--ref", base["ref"], "--target", d, "--no-verify", inputs=[d])


def test_link_inside_the_rank_folder_is_followed(base, copy):
    d = copy("eng")
    p = os.path.join(d, SHARD)
    os.rename(p, os.path.join(d, "rank0", "real.safetensors"))
    os.symlink("real.safetensors", p)
    bad(0, ["fail: 0"], "ref-vs-target", "--ref", base["ref"], "--target", d, inputs=[d])


# ---- manifest lines and run.json of the wrong shape -------------------------

MANIFEST_DAMAGE = {
    "line_not_json": (b"not json", "line 1 is corrupt"),
    "line_a_list": (b"[1, 2]", "line 1 is corrupt: not a JSON object (a list)"),
    "line_a_number": (b"5", "line 1 is corrupt: not a JSON object (a number)"),
    "line_not_utf8": (b"\xff\xfe{}", "line 1 is corrupt"),
    "missing_key": (_field("key", None), "field 'key' must be a non-empty string"),
    "shape_string": (_field("shape", "4x4"), "field 'shape' must be a list of non-negative integers"),
    "negative_dim": (_field("shape", [-1, 4]), "field 'shape' must be a list"),
    "negative_rank": (_field("rank", -1), "field 'rank' must be a non-negative integer"),
    "unknown_kind": (_field("kind", "weird"), "field 'kind' must be 'tensor' or 'stats'"),
    "stats_a_list": (_field("stats", [1, 2]), "field 'stats' must be an object"),
    "meta_a_string": (_field("meta", "x"), "field 'meta' must be an object"),
    "seq_ids_string": (_meta("seq_ids", "abc"), "meta 'seq_ids' must be a list of integers"),
    "cu_seqlens_decreasing": (_meta("cu_seqlens", [0, 5, 3]), "meta 'cu_seqlens' must be a non-decreasing"),
    "bad_hash": (_field("hash", "md5:00"), "field 'hash' must be 'sha256:<hex>'"),
    "tensor_without_file": (_field("file", None), "a tensor record needs 'file'"),
    "unknown_dtype": (_field("dtype", "float7"), "unsupported dtype 'float7'"),
    "bool_layer": (_field("layer", True), "field 'layer' must be an integer or null"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_DAMAGE))
def test_malformed_manifest_line_exit_2(case, base, copy):
    edit, fragment = MANIFEST_DAMAGE[case]
    d = copy("eng")
    _manifest_line(0, (lambda rec: edit) if isinstance(edit, bytes) else edit)(d)
    bad(2, ["manifest.jsonl line 1", fragment], "inspect", d, inputs=[d])
    bad(2, ["manifest.jsonl line 1"], "ref-vs-target", "--ref", base["ref"], "--target", d, inputs=[d])


RUN_DAMAGE = {
    "not_json": (b"{broken", "run.json is corrupt"),
    "a_list": (b"[1, 2]", "run.json is corrupt: a JSON list, not an object"),
    "not_utf8": (b"\xff\xfe", "run.json is corrupt"),
    "token_ids_string": (b'{"token_ids": "abc", "complete": true}', "'token_ids' must be list"),
    "token_ids_mixed": (b'{"token_ids": [[1], "a"], "complete": true}', "'token_ids' must be a list of token ids"),
    "complete_string": (b'{"complete": "yes"}', "'complete' must be bool"),
    "newer_format": (b'{"format_version": 99, "complete": true}', "format version 99"),
}


@pytest.mark.parametrize("case", sorted(RUN_DAMAGE))
def test_malformed_run_json_exit_2(case, base, copy):
    text, fragment = RUN_DAMAGE[case]
    d = copy("eng")
    open(os.path.join(d, "run.json"), "wb").write(text)
    bad(2, [fragment], "inspect", d, inputs=[d])
    bad(2, [fragment], "ref-vs-target", "--ref", base["ref"], "--target", d, inputs=[d])


@pytest.mark.parametrize("what", ["run.json", MANIFEST])
@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_special_run_files_are_refused(what, kind, copy):
    d = copy("eng")
    p = os.path.join(d, what)
    os.remove(p)
    os.mkfifo(p) if kind == "fifo" else os.mkdir(p)
    bad(2, [what, "a FIFO" if kind == "fifo" else "a folder", "not a regular file"], "inspect", d, inputs=[d])


def test_missing_and_empty_dump_folders(tmp_path):
    bad(2, ["does not exist"], "inspect", tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    bad(2, ["is not a parity dump"], "inspect", tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    bad(2, ["is not a folder"], "inspect", tmp_path / "file")


def test_a_dump_with_no_records_exit_2(tmp_path):
    w = DumpWriter(str(tmp_path / "d"), fsync=False)
    w.close()
    bad(2, ["holds no records"], "inspect", w.root, inputs=[w.root])


def test_two_runs_in_one_folder_are_reported(copy):
    d = copy("eng")
    p = os.path.join(d, MANIFEST)
    lines = open(p).read().splitlines()
    open(p, "w").write("\n".join(lines + lines[:3]) + "\n")  # a second writer's first records
    bad(2, ["two runs wrote into this folder"], "inspect", d, inputs=[d])


def test_orphan_shard_is_a_warning(copy):
    d = copy("eng")
    shutil.copy(os.path.join(d, SHARD), os.path.join(d, "rank0", "shard-000099.safetensors"))
    bad(0, ["1 shard file(s) no manifest line names"], "inspect", d, inputs=[d])


# ---- incomplete runs ----------------------------------------------------------

def _unclosed(d, keep_lines=None, cut=False, reason=None):
    """A run killed mid-capture: run.json without its end (old style: no
    end_time; new: complete false), the manifest cut after ``keep_lines``."""
    run = json.load(open(os.path.join(d, "run.json")))
    run.pop("end_time", None)
    run.pop("complete", None)
    if reason:
        run.update(complete=False, incomplete_reason=reason)
    json.dump(run, open(os.path.join(d, "run.json"), "w"))
    p = os.path.join(d, MANIFEST)
    if os.path.exists(os.path.join(d, "rank0", "rank.json")):
        os.remove(os.path.join(d, "rank0", "rank.json"))
    if keep_lines is not None:
        lines = open(p).read().splitlines()
        text = "\n".join(lines[:keep_lines]) + "\n"
        if cut:
            text += lines[keep_lines][:25]
        open(p, "w").write(text)
    return d


COMMANDS = {
    "inspect": (2, lambda b, d: ["inspect", d]),
    "schema": (1, lambda b, d: ["schema", b["eng"], d]),
    "ref-vs-target": (1, lambda b, d: ["ref-vs-target", "--ref", b["ref"], "--target", d]),
    "layer-bisect": (1, lambda b, d: ["layer-bisect", "--ref", b["ref"], "--target", d]),
    "summary-diff": (1, lambda b, d: ["summary-diff", "--ref", b["eng"], "--target", d]),
    "topk": (1, lambda b, d: ["topk", "--ref", b["ref"], "--target", d]),
}


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_every_command_says_a_dump_is_incomplete(cmd, base, copy):
    code, args = COMMANDS[cmd]
    d = _unclosed(copy("eng"))
    r = bad(code, ["incomplete", "capture never closed"], *args(base, d), inputs=[d])
    if cmd != "inspect":
        assert "--allow-incomplete" in r.output
        bad(0, [], *args(base, d), "--allow-incomplete", inputs=[d])


def test_slot_invariance_and_weights_say_a_dump_is_incomplete(base, copy):
    d = _unclosed(copy("batched"))
    bad(1, ["batched dump is incomplete"], "slot-invariance", "--dir", d, "--same-prompt", inputs=[d])
    w = _unclosed(copy("wtgt"))
    bad(1, ["target dump is incomplete"], "weights", "--ref", base["wref"], "--target", w, inputs=[w])


def test_incomplete_reason_is_shown(base, copy):
    d = _unclosed(copy("eng"), reason="disk full while writing shard 3")
    bad(1, ["disk full while writing shard 3"], "ref-vs-target", "--ref", base["ref"], "--target", d, inputs=[d])


def test_cut_last_line_is_incomplete_not_a_warning(base, copy):
    d = _unclosed(copy("eng"), keep_lines=10, cut=True)
    r = bad(2, ["ends in a line cut short"], "inspect", d, inputs=[d])
    assert "UserWarning" not in r.output and "warning: the" not in r.output  # said once, as the error


def test_killed_target_fails_with_the_missing_count(base, copy):
    # Killed in the decode step: its first 3 records made it to the manifest, the 4th was cut.
    d = _unclosed(copy("eng"), keep_lines=20, cut=True)
    for cmd in ("ref-vs-target", "layer-bisect"):
        r = bad(1, ["are missing from the target", "incomplete"], cmd, "--ref", base["ref"], "--target", d,
                inputs=[d])
        assert "28 piece(s) of 14 reference record(s)" in r.output
    # Judged as far as it goes, the missing records still fail...
    bad(1, ["are missing from the target"], "ref-vs-target", "--ref", base["ref"], "--target", d,
        "--allow-incomplete", inputs=[d])
    # ...unless the user filters them out.
    bad(0, ["fail: 0"], "ref-vs-target", "--ref", base["ref"], "--target", d, "--allow-incomplete",
        "--filter", r"embed_tokens|layers\.0\.(input_layernorm|self_attn)", inputs=[d])


def test_narrower_capture_fails_until_filtered(base, copy):
    d = copy("eng")
    p = os.path.join(d, MANIFEST)
    lines = [x for x in open(p).read().splitlines() if "lm_head" not in x]
    open(p, "w").write("\n".join(lines) + "\n")
    bad(1, ["missing from the target"], "ref-vs-target", "--ref", base["ref"], "--target", d, inputs=[d])
    bad(1, ["missing from the target"], "summary-diff", "--ref", base["eng"], "--target", d, inputs=[d])
    bad(0, ["fail: 0"], "ref-vs-target", "--ref", base["ref"], "--target", d, "--filter", "^model", inputs=[d])


def test_missing_decision_taps_fail_topk(base, copy):
    d = copy("eng")
    p = os.path.join(d, MANIFEST)
    lines = [x for x in open(p).read().splitlines() if "layers.1.mlp.topk" not in x]
    open(p, "w").write("\n".join(lines) + "\n")
    bad(1, ["missing from the target"], "topk", "--ref", base["ref"], "--target", d, inputs=[d])
    bad(0, ["differ: 0"], "topk", "--ref", base["ref"], "--target", d, "--filter", r"layers\.0\.", inputs=[d])


def test_missing_run_json_and_rank_manifest_are_incomplete(copy):
    d = copy("eng")
    os.remove(os.path.join(d, "run.json"))
    bad(2, ["run.json is missing"], "inspect", d, inputs=[d])
    d2 = copy("eng", "eng2")
    os.mkdir(os.path.join(d2, "rank1"))
    bad(2, ["rank1 has no manifest.jsonl"], "inspect", d2, inputs=[d2])


def test_rank_json_of_an_unfinished_rank(copy):
    d = copy("eng")
    os.mkdir(os.path.join(d, "rank1"))
    shutil.copy(os.path.join(d, MANIFEST), os.path.join(d, "rank1", "manifest.jsonl"))
    json.dump({"rank": 1, "complete": False}, open(os.path.join(d, "rank1", "rank.json"), "w"))
    bad(2, ["rank1/rank.json: capture never closed"], "inspect", d, inputs=[d])


# ---- outputs never clobber -------------------------------------------------------

def test_out_refuses_an_existing_file_unless_force(base, tmp_path):
    out = tmp_path / "r.csv"
    out.write_text("mine")
    bad(2, ["already exists", "--force"], "inspect", base["eng"], "--out", out, inputs=[base["eng"]])
    assert out.read_text() == "mine"
    bad(0, [], "inspect", base["eng"], "--out", out, "--force", "--format", "csv")
    assert out.read_text().startswith("key,")


@pytest.mark.parametrize("target", ["run.json", MANIFEST, SHARD, "rank0/new.txt"])
def test_out_never_writes_inside_an_input_dump(target, base, copy):
    d = copy("eng")
    for force in ((), ("--force",)):
        bad(2, ["is inside the input"], "inspect", d, "--out", os.path.join(d, target), *force, inputs=[d])
        bad(2, ["is inside the input"], "ref-vs-target", "--ref", d, "--target", base["eng"], "--out",
            os.path.join(d, target), *force, inputs=[d])


def test_out_through_a_link_into_a_dump_is_refused(base, copy, tmp_path):
    d = copy("eng")
    os.symlink(d, tmp_path / "alias")
    bad(2, ["is inside the input"], "schema", base["eng"], d, "--out", tmp_path / "alias" / "run.json",
        "--force", inputs=[d])


def test_out_folder_or_missing_parent_is_refused(base, tmp_path):
    bad(2, ["is a folder"], "inspect", base["eng"], "--out", tmp_path)
    bad(2, ["does not exist"], "inspect", base["eng"], "--out", tmp_path / "no" / "r.txt")


def test_plot_folder_inside_an_input_is_refused(base, copy):
    d = copy("eng")
    bad(2, ["--plot", "is inside the input"], "ref-vs-target", "--ref", base["ref"], "--target", d,
        "--plot", os.path.join(d, "plots"), inputs=[d])


def test_out_is_refused_before_the_work(base, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("{}")
    bad(2, ["already exists"], "layer-bisect", "--ref", base["ref"], "--target", base["eng"], "--out", out)


def test_tables_are_cut_only_on_a_terminal(base, tmp_path, monkeypatch):
    import parity.report.tables as tables

    monkeypatch.setattr(tables.shutil, "get_terminal_size", lambda fallback=None: os.terminal_size((100, 15)))
    out = tmp_path / "t.txt"
    r = cli_run("inspect", base["ref"], "--out", out)
    assert "rows not shown" not in out.read_text() and "rows not shown" not in r.output
    piped = cli_run("inspect", base["ref"])  # stdout is not a terminal here
    assert "rows not shown" not in piped.output
    monkeypatch.setattr(tables, "_stdout_is_tty", lambda: True)
    tty = cli_run("inspect", base["ref"])
    assert "rows not shown" in tty.output
    out2 = tmp_path / "t2.txt"
    cli_run("inspect", base["ref"], "--out", out2)
    assert "rows not shown" not in out2.read_text()


# ---- filters that match nothing ----------------------------------------------------

FILTERED = {
    "inspect": lambda b: ["inspect", b["eng"]],
    "schema": lambda b: ["schema", b["eng"], b["ref"]],
    "ref-vs-target": lambda b: ["ref-vs-target", "--ref", b["ref"], "--target", b["eng"]],
    "layer-bisect": lambda b: ["layer-bisect", "--ref", b["ref"], "--target", b["eng"]],
    "summary-diff": lambda b: ["summary-diff", "--ref", b["eng"], "--target", b["eng"]],
    "slot-invariance": lambda b: ["slot-invariance", "--dir", b["batched"], "--same-prompt"],
    "topk": lambda b: ["topk", "--ref", b["ref"], "--target", b["eng"]],
    "weights": lambda b: ["weights", "--ref", b["wref"], "--target", b["wtgt"]],
}


@pytest.mark.parametrize("cmd", sorted(FILTERED))
def test_filter_matching_nothing_is_an_error(cmd, base):
    r = bad(2, ["--filter", "nomatch"], *FILTERED[cmd](base), "--filter", "nomatch", inputs=list(base.values()))
    assert r.output.count("parity: error:") == 1


# ---- the top level turns input errors into one message ----------------------------

@pytest.mark.parametrize("exc, fragment", [
    (PermissionError(13, "Permission denied", "/data/run.json"), "cannot use /data/run.json: Permission denied"),
    (IsADirectoryError(21, "Is a directory", "/data/x"), "cannot use /data/x: Is a directory"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not UTF-8 text"),
    (json.JSONDecodeError("Expecting value", "x", 0), "not valid JSON"),
])
def test_top_level_turns_input_errors_into_exit_2(exc, fragment, base, monkeypatch):
    import parity.inspect

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(parity.inspect, "inspect_dump", boom)
    bad(2, ["parity: error:", fragment], "inspect", base["eng"])


def test_a_bug_keeps_its_traceback(base, monkeypatch):
    import parity.inspect

    def bug(*a, **k):
        raise RuntimeError("a bug in parity")

    monkeypatch.setattr(parity.inspect, "inspect_dump", bug)
    r = CliRunner().invoke(cli, ["inspect", base["eng"]])
    assert isinstance(r.exception, RuntimeError)  # not dressed up as bad input


def test_no_command_module_failure_is_swallowed():
    import parity.cli as pc

    assert not hasattr(pc, "_register")
    assert {"inspect", "schema", "ref-vs-target", "topk", "gate"} <= set(pc.cli.commands)
