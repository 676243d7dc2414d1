import json
import os

import torch
from click.testing import CliRunner

from parity.cli import cli
from parity.store import DumpWriter, Record


def _dump(root, tensors, run_info=None):
    w = DumpWriter(str(root), run_info=run_info)
    items = [(Record(key=f"{k}:output", module=k, stage="output", layer=i, seq=w.next_seq()), t)
             for i, (k, t) in enumerate(tensors.items())]
    w.write_batch(items)
    w.close()
    return str(root)


def test_inspect_table_json_and_nan_warning(tmp_path):
    bad = torch.ones(4)
    bad[1] = float("nan")
    d = _dump(tmp_path / "d", {"model.layers.0": torch.randn(2, 3), "model.layers.1": bad})
    r = CliRunner().invoke(cli, ["inspect", d])
    assert r.exit_code == 0, r.output
    assert "model.layers.0:output" in r.output and "warning" in r.output and "1 NaN" in r.output
    r = CliRunner().invoke(cli, ["inspect", d, "--format", "json", "--filter", "layers\\.1"])
    payload = json.loads(r.output.split("\nwarning")[0])
    assert [row["key"] for row in payload["rows"]] == ["model.layers.1:output"]
    assert payload["rows"][0]["nan"] == 1


def test_inspect_writes_out_file(tmp_path):
    d = _dump(tmp_path / "d", {"a": torch.randn(2)})
    out = tmp_path / "t.csv"
    r = CliRunner().invoke(cli, ["inspect", d, "--format", "csv", "--out", str(out)])
    assert r.exit_code == 0 and out.read_text().startswith("key,")


def test_bad_inputs_exit_2_without_traceback(tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["inspect", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    d = _dump(tmp_path / "d", {"a": torch.randn(100)})
    shard = next(f for f in os.listdir(os.path.join(d, "rank0")) if f.endswith(".safetensors"))
    with open(os.path.join(d, "rank0", "manifest.jsonl"), "a") as fh:
        fh.write("not json\n{\"key\": 1}\n")
    r = runner.invoke(cli, ["inspect", d])
    assert r.exit_code == 2 and "manifest.jsonl line 2" in r.output
    r = runner.invoke(cli, ["inspect", d, "--filter", "("])
    assert r.exit_code == 2
    assert shard


def test_schema_diff(tmp_path):
    a = _dump(tmp_path / "a", {"x": torch.zeros(2, 3), "y": torch.zeros(4), "only_a": torch.zeros(1)})
    b = _dump(tmp_path / "b", {"x": torch.zeros(3, 2), "y": torch.zeros(4, dtype=torch.bfloat16),
                               "only_b": torch.zeros(1)})
    r = CliRunner().invoke(cli, ["schema", a, b, "--format", "json"])
    assert r.exit_code == 1
    rows = {row["key"]: row["status"] for row in json.loads(r.output)["rows"]}
    assert rows == {"x:output": "shape differs", "y:output": "dtype differs",
                    "only_a:output": "only in A", "only_b:output": "only in B"}
    r = CliRunner().invoke(cli, ["schema", a, a])
    assert r.exit_code == 0 and "match" in r.output


def test_env_shows_active_config(monkeypatch):
    monkeypatch.setenv("PARITY_DUMP_DIR", "/tmp/x")
    monkeypatch.setenv("PARITY_DUMP_LAYERS", "0-2")
    r = CliRunner().invoke(cli, ["env"])
    assert r.exit_code == 0 and "capture: on" in r.output and "layers: 0,1,2" in r.output
    monkeypatch.setenv("PARITY_DUMP_MODE", "bogus")
    r = CliRunner().invoke(cli, ["env"])
    assert r.exit_code == 2 and "PARITY_DUMP_MODE" in r.output
