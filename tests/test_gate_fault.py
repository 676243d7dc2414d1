"""The accuracy gate must catch a broken engine, and pass the clean one against itself."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from parity.cli import cli
from tests.gate_fixtures import write_gsm8k

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-gsm8k"


def _gate(tmp_path, out, *extra):
    test, train = write_gsm8k(tmp_path, n_test=4, n_train=8)
    args = ["gate", "gsm8k", "--engine", str(CKPT), "--precision", "fp32", "--data", str(test),
            "--fewshot-data", str(train), "--limit", "4", "--num-fewshot", "1", "--max-new-tokens", "24",
            "--score", "flexible-extract", "--no-progress", "--out-dir", str(tmp_path / out), *extra]
    return CliRunner().invoke(cli, args)


@pytest.mark.skipif(not CKPT.is_dir(), reason="needs the trained tiny checkpoint")
def test_clean_engine_passes_and_a_zoo_fault_fails_the_paired_gate(tmp_path, monkeypatch):
    monkeypatch.delenv("PARITY_ENGINE_FAULT", raising=False)
    base = _gate(tmp_path, "clean")
    assert base.exit_code == 0, base.output
    again = _gate(tmp_path, "again", "--baseline-samples", str(tmp_path / "clean"), "--min-agreement", "0.8")
    assert again.exit_code == 0, again.output
    monkeypatch.setenv("PARITY_ENGINE_FAULT", "skip_inverse_rope")
    broken = _gate(tmp_path, "broken", "--baseline-samples", str(tmp_path / "clean"), "--min-agreement", "0.8")
    assert broken.exit_code == 1, broken.output
    summary = json.loads((tmp_path / "broken" / "summary.json").read_text())
    assert summary["passed"] is False
    assert summary["paired"]["agreement"] < 0.8
