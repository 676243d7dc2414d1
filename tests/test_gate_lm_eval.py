"""Ingesting lm-eval's output. The fixtures in tests/data/lm_eval_gsm8k were
written by lm-eval 0.4.13's own evaluator and tracker on synthetic questions
(make.py regenerates them)."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from parity.cli import cli
from parity.errors import ParityError
from parity.gate.clients import load_lm_eval
from parity.gate.run import GateConfig, gate_lm_eval, load_samples

FIX = Path(__file__).parent / "data" / "lm_eval_gsm8k"
RESULTS, SAMPLES = FIX / "results.json", FIX / "samples_gsm8k.jsonl"


def test_results_only():
    run = load_lm_eval(RESULTS)
    assert run.task == "gsm8k" and run.n == 8 and run.num_fewshot == 2
    assert run.lm_eval_version == "0.4.13"
    res = gate_lm_eval(run, GateConfig(min_accuracy=0.3))
    assert res.passed and res.records.empty
    assert res.accuracy["strict-match"].acc == 0.375 and res.accuracy["strict-match"].correct == 3
    assert any("aggregate accuracy only" in n for n in res.notes)


def test_samples_rescored_reproduce_lm_evals_numbers():
    run = load_lm_eval(RESULTS, SAMPLES)
    res = gate_lm_eval(run, GateConfig())
    r = json.loads(RESULTS.read_text())["results"]["gsm8k"]
    for filt in ("strict-match", "flexible-extract"):
        assert res.accuracy[filt].acc == pytest.approx(r[f"exact_match,{filt}"])
        assert res.accuracy[filt].stderr == pytest.approx(r[f"exact_match_stderr,{filt}"])
    # No note that our extraction or score differs from what lm-eval logged.
    assert not any("differs" in n or "reported" in n for n in res.notes), res.notes
    rec = res.records.set_index("doc_id")
    assert rec.loc[3, "past_stop"] and rec.loc[3, "answer_flexible"] == "99"
    assert len(rec.loc[0, "prompt_hash"]) == 64


def test_lm_eval_samples_as_baseline_and_in_diff(tmp_path):
    df = load_samples(SAMPLES)
    assert list(df["doc_id"]) == list(range(8))
    r = CliRunner().invoke(cli, ["gate", "gsm8k", "--lm-eval-results", str(RESULTS),
                                 "--lm-eval-samples", str(SAMPLES), "--baseline-samples", str(SAMPLES),
                                 "--min-agreement", "1", "--out-dir", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    d = CliRunner().invoke(cli, ["gate", "diff", str(SAMPLES), str(tmp_path / "o"), "--score",
                                 "flexible-extract"])
    assert d.exit_code == 0, d.output
    assert "no question differs" in d.output


def test_cli_exit_codes():
    r = CliRunner()
    fail = r.invoke(cli, ["gate", "gsm8k", "--lm-eval-results", str(RESULTS), "--min-accuracy", "0.4"])
    assert fail.exit_code == 1 and "FAIL" in fail.output
    ok = r.invoke(cli, ["gate", "gsm8k", "--lm-eval-results", str(RESULTS), "--score",
                        "flexible-extract", "--min-accuracy", "0.5"])
    assert ok.exit_code == 0, ok.output
    paired = r.invoke(cli, ["gate", "gsm8k", "--lm-eval-results", str(RESULTS),
                            "--baseline-samples", str(SAMPLES)])
    assert paired.exit_code == 2 and "--lm-eval-samples" in paired.output
    alone = r.invoke(cli, ["gate", "gsm8k", "--endpoint", "http://x", "--lm-eval-samples", str(SAMPLES)])
    assert alone.exit_code == 2
    limit = r.invoke(cli, ["gate", "gsm8k", "--lm-eval-results", str(RESULTS), "--limit", "5"])
    assert limit.exit_code == 2 and "--limit do not apply" in limit.output


def test_bad_files(tmp_path):
    with pytest.raises(ParityError, match="does not exist"):
        load_lm_eval(tmp_path / "none.json")
    (tmp_path / "r.json").write_text('{"results": {"arc_easy": {"acc,none": 0.5}}}')
    with pytest.raises(ParityError, match="no single gsm8k task"):
        load_lm_eval(tmp_path / "r.json")
    (tmp_path / "s.jsonl").write_text('{"doc_id": 0}\n')
    with pytest.raises(ParityError, match="not an lm-eval sample"):
        load_lm_eval(RESULTS, tmp_path / "s.jsonl")
    (tmp_path / "x.json").write_text("nope")
    with pytest.raises(ParityError, match="not JSON"):
        load_lm_eval(tmp_path / "x.json")
