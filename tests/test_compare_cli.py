import json
import os

import pytest
import torch
from click.testing import CliRunner

import dumpgen
from parity.cli import cli
from parity.compare.api import compare_dumps
from parity.store import DumpWriter

PROMPTS = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    toy = dumpgen.Toy()
    d = {
        "ref": dumpgen.write_reference(root / "ref", toy, PROMPTS, mode="fp32", decode_steps=1),
        "ok": dumpgen.write_engine(root / "ok", toy, PROMPTS, mode="bf16", decode_steps=1),
        "bug": dumpgen.write_engine(root / "bug", toy, PROMPTS, mode="bf16", decode_steps=1,
                                    perturb=dumpgen.scale_at(2, "mlp:output", 1.1)),
        # Noise-floor trio: reference in bf16, the same run in fp64 (stored fp32) as the floor.
        "ref_bf16": dumpgen.write_reference(root / "ref_bf16", toy, PROMPTS, mode="bf16-fused"),
        "floor": dumpgen.write_reference(root / "floor", toy, PROMPTS, mode="fp64", store=torch.float32),
        "eng": dumpgen.write_engine(root / "eng", toy, PROMPTS, mode="bf16"),
        "small_bug": dumpgen.write_engine(root / "small_bug", toy, PROMPTS, mode="bf16",
                                          perturb=dumpgen.noise_at(1, "self_attn:output", 0.015)),
    }
    return {k: str(v) for k, v in d.items()}


def run(*args):
    res = CliRunner().invoke(cli, list(args))
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res


def test_noise_alone_passes(dumps):
    r = run("ref-vs-target", "--ref", dumps["ref"], "--target", dumps["ok"])
    assert r.exit_code == 0, r.output
    assert "fail: 0" in r.output


def test_bug_fails_with_first_failure(dumps):
    r = run("ref-vs-target", "--ref", dumps["ref"], "--target", dumps["bug"])
    assert r.exit_code == 1
    assert "first_failure: model.layers.2.mlp:output (prefill step 0 seq 0)" in r.output


def test_formats_and_out(dumps, tmp_path):
    out = tmp_path / "r.json"
    r = run("ref-vs-target", "--ref", dumps["ref"], "--target", dumps["bug"], "--format", "json", "--out", str(out))
    assert r.exit_code == 1
    data = json.loads(out.read_text())
    assert data["fail"] > 0 and len(data["rows"]) == data["pairs"]
    first = next(row for row in data["rows"] if row["verdict"] == "fail")
    assert first["key"] == "model.layers.2.mlp:output" and first["layer"] == 2
    r = run("ref-vs-target", "--ref", dumps["ref"], "--target", dumps["bug"], "--format", "csv",
            "--filter", r"layers\.0\.")
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("key,layer,stage,phase,step,seq")
    assert all("layers.0." in ln for ln in lines[1:])
    r = run("ref-vs-target", "--ref", dumps["ref"], "--target", dumps["bug"], "--format", "markdown")
    assert r.output.startswith("| key |")


def test_plots(dumps, tmp_path):
    r = run("layer-bisect", "--ref", dumps["ref"], "--target", dumps["bug"], "--plot", str(tmp_path / "p"))
    assert r.exit_code == 1
    pngs = sorted(os.listdir(tmp_path / "p"))
    assert pngs == ["error_by_layer.png", "layer_stage_heatmap.png"]
    assert (tmp_path / "p" / pngs[0]).read_bytes()[:4] == b"\x89PNG"


def test_noise_floor_passes_noise_fails_small_bug(dumps):
    base = ["ref-vs-target", "--ref", dumps["ref_bf16"], "--floor", dumps["floor"]]
    r = run(*base, "--target", dumps["eng"])
    assert r.exit_code == 0, r.output
    assert "mode: noise floor" in r.output
    # The same bug under fixed bf16 thresholds only warns: it is the size of the noise they accept.
    fixed = compare_dumps(dumps["ref"], dumps["small_bug"])
    row = fixed.table[fixed.table["key"] == "model.layers.1.self_attn:output"]
    assert not (row["verdict"] == "fail").any()
    res = compare_dumps(dumps["ref_bf16"], dumps["small_bug"], floor=dumps["floor"])
    assert res.exit_code == 1
    first = res.table[res.table["verdict"] == "fail"].iloc[0]
    assert first["key"] == "model.layers.1.self_attn:output"
    assert first["err_target_floor"] > 3 * first["err_ref_floor"]
    assert "floor" in first["reason"]


def test_missing_dir_exit_2(dumps, tmp_path):
    r = run("ref-vs-target", "--ref", str(tmp_path / "nope"), "--target", dumps["ok"])
    assert r.exit_code == 2
    assert "does not exist" in r.output and "Traceback" not in r.output


def test_empty_dump_exit_2(dumps, tmp_path):
    w = DumpWriter(str(tmp_path / "empty"), fsync=False)
    w.close()
    r = run("ref-vs-target", "--ref", dumps["ref"], "--target", w.root)
    assert r.exit_code == 2
    assert "no tensor records" in r.output


def test_stats_only_dump_says_how_to_capture_tensors(dumps, tmp_path):
    from parity.store import Record

    w = DumpWriter(str(tmp_path / "stats"), fsync=False)
    w.write_batch([(Record(key="model.layers.0.mlp:output", module="model.layers.0.mlp", stage="output",
                           kind="stats", stats={"absmax": 1.0}, seq=w.next_seq()), None)])
    w.close()
    for args in (("ref-vs-target", "--ref", w.root, "--target", dumps["ref"]),
                 ("slot-invariance", "--dir", w.root, "--same-prompt")):
        r = run(*args)
        assert r.exit_code == 2 and "Traceback" not in r.output
        assert "summaries only" in r.output and "PARITY_DUMP_MODE=full" in r.output, r.output
    r = run("ref-vs-target", "--ref", dumps["ref"], "--target", dumps["ref"])
    assert "summaries only" not in r.output


def test_corrupt_manifest_exit_2(dumps, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(dumps["ok"], bad)
    m = bad / "rank0" / "manifest.jsonl"
    lines = m.read_text().splitlines()
    lines[3] = lines[3][:20]
    m.write_text("\n".join(lines) + "\n")
    r = run("ref-vs-target", "--ref", dumps["ref"], "--target", str(bad))
    assert r.exit_code == 2 and "corrupt" in r.output


def test_truncated_shard_exit_2(dumps, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(dumps["ok"], bad)
    shard = sorted((bad / "rank0").glob("shard-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    r = run("ref-vs-target", "--ref", dumps["ref"], "--target", str(bad))
    assert r.exit_code == 2 and "truncated" in r.output


def test_different_tokens_exit_2(dumps, tmp_path):
    other = dumpgen.write_engine(tmp_path / "o", dumpgen.Toy(), [[1, 2], [3], [4]])
    r = run("ref-vs-target", "--ref", dumps["ref"], "--target", str(other))
    assert r.exit_code == 2 and "different inputs" in r.output


def test_shape_mismatch_and_nan_rows(dumps, tmp_path):
    def perturb(layer, key, seq, t):
        if layer == 1 and key.endswith("self_attn:output"):
            return t[..., :-1]
        if layer == 3 and key.endswith("mlp:output") and seq == 1:
            t = t.clone()
            t[0, 0] = float("nan")
        return t

    eng = dumpgen.write_engine(tmp_path / "e", dumpgen.Toy(), PROMPTS, mode="bf16", decode_steps=1,
                               perturb=perturb)
    r = run("ref-vs-target", "--ref", dumps["ref"], "--target", str(eng), "--format", "json")
    assert r.exit_code == 1
    rows = json.loads(r.output)["rows"]
    shape = [x for x in rows if x["key"] == "model.layers.1.self_attn:output"]
    assert shape and all(x["verdict"] == "fail" and "shape mismatch" in x["reason"] for x in shape)
    nan = [x for x in rows if x["key"] == "model.layers.3.mlp:output" and x["seq"] == 1 and x["phase"] == "prefill"]
    assert nan[0]["verdict"] == "fail" and "NaN" in nan[0]["reason"]


def test_only_one_side_line(dumps, tmp_path):
    eng = dumpgen.write_engine(tmp_path / "e", dumpgen.Toy(), PROMPTS, mode="bf16", decode_steps=1,
                               rename=lambda m: m.replace("model.norm", "model.final_norm"))
    r = run("ref-vs-target", "--ref", dumps["ref"], "--target", str(eng))
    assert "only_in_reference: 6 piece(s) of 1 record(s): model.norm:output" in r.output
    assert "only_in_target: 6 piece(s) of 1 record(s): model.final_norm:output" in r.output


def test_conflicting_mapping_options_exit_2(dumps):
    r = run("ref-vs-target", "--ref", dumps["ref"], "--target", dumps["ok"], "--map", "x.yaml", "--preset", "identity")
    assert r.exit_code == 2
    r = run("ref-vs-target", "--ref", dumps["ref"], "--target", dumps["ok"], "--preset", "no-such-preset")
    assert r.exit_code == 2 and "unknown mapping preset" in r.output
