"""The gate against a real (canned) HTTP server, through the CLI."""

import json
import time

import pytest
from click.testing import CliRunner

from gate_fixtures import CannedServer, answer_of, free_port, last_question, synth_docs, write_gsm8k
from parity.cli import cli
from parity.errors import ParityError
from parity.gate.clients import EndpointSource, completions_url

DOCS = synth_docs(8)


def right(prompt):
    return f" Sam counts the pens.\n#### {answer_of(last_question(prompt), DOCS)}"


def right_on_even(prompt):
    q = last_question(prompt)
    i = int(q.split(":")[0].split()[-1])
    return right(prompt) if i % 2 == 0 else " Sam counts 7 pens.\n#### 7"


def gate(args, data):
    res = CliRunner().invoke(cli, ["gate", "gsm8k", "--data", str(data), "--no-progress",
                                   "--backoff", "0.01", *args])
    return res


@pytest.fixture
def data(tmp_path):
    test, _ = write_gsm8k(tmp_path, n_test=8)
    return test


def test_endpoint_pass_and_outputs(tmp_path, data):
    with CannedServer(right_on_even, model="served-model") as srv:
        res = gate(["--endpoint", srv.url, "--num-fewshot", "2", "--min-accuracy", "0.5",
                    "--out-dir", str(tmp_path / "out"), "--concurrency", "3"], data)
    assert res.exit_code == 0, res.output
    assert "## GSM8K gate: PASS" in res.output and "4/8" in res.output
    body = srv.requests[0]
    # The request lm-eval's local-completions model sends for this task.
    assert body["model"] == "served-model" and body["max_tokens"] == 256
    assert body["temperature"] == 0 and body["stop"] == ["Question:", "</s>", "<|im_end|>"]
    assert body["prompt"].count("Question:") == 3 and body["prompt"].endswith("\nAnswer:")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["passed"] is True and summary["n"] == 8 and summary["num_fewshot"] == 2
    assert summary["accuracy"]["strict-match"]["acc"] == 0.5
    recs = [json.loads(l) for l in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in recs] == list(range(8))   # in order despite concurrency
    assert [r["correct_strict"] for r in recs] == [i % 2 == 0 for i in range(8)]
    assert recs[4]["target"] == "78000" and recs[4]["answer_strict"] == "78,000"
    assert {"prompt_hash", "generation", "answer_flexible", "question"} <= set(recs[0])


def test_endpoint_fail_exit_1(data):
    with CannedServer(right_on_even) as srv:
        res = gate(["--endpoint", srv.url + "/v1", "--min-accuracy", "0.6"], data)
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.output and "min-accuracy" in res.output


def test_baseline_tolerance(data):
    with CannedServer(right_on_even) as srv:
        ok = gate(["--endpoint", srv.url, "--baseline", "0.8", "--tolerance-stderr", "2"], data)
        bad = gate(["--endpoint", srv.url, "--baseline", "0.8", "--tolerance-stderr", "1"], data)
    # stderr of 4/8 is sqrt(.25/7) = 0.189: 0.5 >= 0.8 - 2 * 0.189 but < 0.8 - 0.189
    assert ok.exit_code == 0, ok.output
    assert bad.exit_code == 1, bad.output


def test_server_ignoring_stop_is_cut_and_flagged(tmp_path, data):
    with CannedServer(lambda p: right(p) + "\n\nQuestion: and 99 more") as srv:
        res = gate(["--endpoint", srv.url, "--score", "flexible-extract", "--min-accuracy", "1",
                    "--out-dir", str(tmp_path / "o")], data)
    assert res.exit_code == 0, res.output
    assert "ignored `stop`" in res.output
    rec = json.loads((tmp_path / "o" / "samples.jsonl").read_text().splitlines()[0])
    assert rec["past_stop"] is True and "Question" not in rec["generation"]


def test_retries_then_succeeds(data):
    with CannedServer(right, fail_first=3, fail_status=503) as srv:
        res = gate(["--endpoint", srv.url, "--model", "m", "--retries", "3", "--concurrency", "1",
                    "--limit", "2"], data)
    assert res.exit_code == 0, res.output
    assert len(srv.requests) == 5


def test_server_down_is_a_clear_error(data):
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    res = gate(["--endpoint", url, "--model", "m", "--retries", "2", "--timeout", "2"], data)
    assert res.exit_code == 2
    assert "failed after 3 attempts" in res.output and "is the server running" in res.output
    assert "Traceback" not in res.output
    assert time.monotonic() - t0 < 10


def test_client_error_is_not_retried(data):
    with CannedServer(right, fail_first=100, fail_status=400) as srv:
        res = gate(["--endpoint", srv.url, "--model", "m", "--retries", "5"], data)
    assert res.exit_code == 2 and "HTTP 400" in res.output
    assert len(srv.requests) == 1


def test_failure_mid_run_stops_the_rest():
    calls = []

    def reply(prompt):
        calls.append(prompt)
        return " #### 1"

    with CannedServer(reply) as srv:
        src = EndpointSource(srv.url, "m", concurrency=2, retries=1, backoff=0.01)
        srv.fail_first, srv.fail_status = 0, 503
        got = {}
        src.generate(["Question: a\nAnswer:"], max_new_tokens=8, stop=["Q"], progress=False,
                     on_done=lambda i, a: got.__setitem__(i, a.text))
        assert got == {0: " #### 1"}
        srv.fail_first = 10 ** 6   # every later request fails
        with pytest.raises(ParityError, match="failed after 2 attempts"):
            src.generate([f"Question: {i}\nAnswer:" for i in range(50)], max_new_tokens=8,
                         stop=["Q"], progress=False, on_done=lambda i, a: None)
    assert len(srv.requests) < 20


def test_bad_usage_exit_2(tmp_path, data):
    r = CliRunner()
    both = r.invoke(cli, ["gate", "gsm8k", "--endpoint", "http://x", "--engine", str(tmp_path)])
    assert both.exit_code == 2 and "exactly one source" in both.output
    none = r.invoke(cli, ["gate", "gsm8k"])
    assert none.exit_code == 2
    agree = gate(["--endpoint", "http://x", "--min-agreement", "0.9"], data)
    assert agree.exit_code == 2 and "--baseline-samples" in agree.output
    missing = r.invoke(cli, ["gate", "gsm8k", "--endpoint", "http://x", "--data", str(tmp_path / "no.jsonl")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_completions_url_forms():
    assert completions_url("http://h:8000") == "http://h:8000/v1/completions"
    assert completions_url("http://h:8000/v1/") == "http://h:8000/v1/completions"
    assert completions_url("h:8000/v1/completions") == "http://h:8000/v1/completions"


def test_paired_against_stored_run_and_diff(tmp_path, data):
    base = tmp_path / "base"
    with CannedServer(right) as srv:
        assert gate(["--endpoint", srv.url, "--out-dir", str(base)], data).exit_code == 0
        same = gate(["--endpoint", srv.url, "--baseline-samples", str(base),
                     "--min-agreement", "1.0"], data)
    assert same.exit_code == 0, same.output
    assert "8/8" in same.output and "McNemar" in same.output

    worse = tmp_path / "worse"
    with CannedServer(lambda p: " I think 7.\n#### 7") as srv:
        res = gate(["--endpoint", srv.url, "--baseline-samples", str(base / "samples.jsonl"),
                    "--out-dir", str(worse)], data)
    assert res.exit_code == 1, res.output
    assert "significantly worse" in res.output
    summary = json.loads((worse / "summary.json").read_text())
    assert summary["paired"]["only_baseline"] == 8
    assert summary["paired"]["p_value"] == pytest.approx(2 / 256)

    d = CliRunner().invoke(cli, ["gate", "diff", str(base), str(worse)])
    assert d.exit_code == 1, d.output
    assert "lost" in d.output and "differing questions: 8" in d.output
    d = CliRunner().invoke(cli, ["gate", "diff", str(base), str(base), "--format", "json"])
    assert d.exit_code == 0 and json.loads(d.output)["differing questions"] == 0


def test_prompt_mismatch_is_noted(tmp_path, data):
    base = tmp_path / "base"
    with CannedServer(right) as srv:
        assert gate(["--endpoint", srv.url, "--out-dir", str(base), "--num-fewshot", "0"], data).exit_code == 0
        res = gate(["--endpoint", srv.url, "--baseline-samples", str(base)], data)
    assert res.exit_code == 0
    assert "prompts differ" in res.output


def test_diff_text_only(tmp_path, data):
    a, b = tmp_path / "a", tmp_path / "b"
    with CannedServer(right) as srv:
        assert gate(["--endpoint", srv.url, "--out-dir", str(a)], data).exit_code == 0
    with CannedServer(lambda p: right(p).replace("counts", "adds up")) as srv:
        assert gate(["--endpoint", srv.url, "--out-dir", str(b)], data).exit_code == 0
    plain = CliRunner().invoke(cli, ["gate", "diff", str(a), str(b)])
    assert plain.exit_code == 0 and "same answer, other generation: 8" in plain.output
    strict = CliRunner().invoke(cli, ["gate", "diff", str(a), str(b), "--text", "--format", "csv"])
    assert strict.exit_code == 1 and strict.output.count("text only") == 8
