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


def _output_folder(tmp_path, stamp="2026-01-02T03-04-05.678901", results=None):
    d = tmp_path / "out" / "canned"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"results_{stamp}.json").write_text(json.dumps(results or json.loads(RESULTS.read_text())))
    (d / f"samples_gsm8k_{stamp}.jsonl").write_text(SAMPLES.read_text())
    return tmp_path / "out"


def test_output_folder_finds_the_runs_files(tmp_path):
    out = _output_folder(tmp_path)
    _output_folder(tmp_path, "2026-01-01T00-00-00.000000")   # an older run in the same folder
    run = load_lm_eval(out)
    assert run.results_path.endswith("results_2026-01-02T03-04-05.678901.json")
    assert run.samples_path.endswith("samples_gsm8k_2026-01-02T03-04-05.678901.jsonl")
    assert len(run.samples) == 8 and any("judged the newest" in n for n in run.notes)
    r = CliRunner().invoke(cli, ["gate", "gsm8k", "--lm-eval-results", str(out), "--min-accuracy", "0.3"])
    assert r.exit_code == 0, r.output
    (tmp_path / "empty").mkdir()
    with pytest.raises(ParityError, match="no results_"):
        load_lm_eval(tmp_path / "empty")


def test_samples_of_another_run_are_refused(tmp_path):
    other = tmp_path / "other.jsonl"
    recs = [json.loads(x) for x in SAMPLES.read_text().splitlines()]
    recs[0]["prompt_hash"] = "0" * 64
    other.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ParityError, match="not from the run"):
        load_lm_eval(RESULTS, other)
    r = CliRunner().invoke(cli, ["gate", "gsm8k", "--lm-eval-results", str(RESULTS), "--lm-eval-samples",
                                 str(other)])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_model_args_that_tokenize_otherwise_are_named(tmp_path):
    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-gsm8k"
    results = json.loads(RESULTS.read_text())
    results["config"] = {**results["config"], "model": "local-completions",
                         "model_args": f"model={ckpt},base_url=http://x/v1/completions,add_bos_token=True"}
    run = load_lm_eval(_output_folder(tmp_path, results=results))
    assert any("add_bos_token=True" in n and "add_bos_token=false" in n for n in run.notes), run.notes
    results["config"]["model_args"] = f"model={ckpt},base_url=http://x/v1/completions"
    (next((tmp_path / "out").rglob("results_*.json"))).write_text(json.dumps(results))
    assert load_lm_eval(tmp_path / "out").notes == []
