"""A gate run that dies keeps what it got, says how far it got, and resumes;
inputs are checked before any question is asked; --format/--out."""

import json

from click.testing import CliRunner

from gate_fixtures import CannedServer, answer_of, free_port, last_question, synth_docs, write_gsm8k
from parity.cli import cli

DOCS = synth_docs(8)


def right(prompt):
    return f" Sam counts.\n#### {answer_of(last_question(prompt), DOCS)}"


def gate(data, *args):
    return CliRunner().invoke(cli, ["gate", "gsm8k", "--data", str(data), "--no-progress", "--backoff", "0.01",
                                    "--retries", "1", *args])


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_dies_mid_run_keeps_answers_and_resumes(tmp_path):
    data, _ = write_gsm8k(tmp_path, n_test=8)
    out = tmp_path / "out"
    with CannedServer(None) as srv:
        def reply(prompt):
            if len(srv.requests) == 5:   # the server goes down after five answers
                srv.fail_first = 10 ** 6
            return right(prompt)

        srv.reply = reply
        res = gate(data, "--endpoint", srv.url, "--model", "m", "--concurrency", "1", "--out-dir", str(out))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "5 of 8 questions were answered" in res.output and "--resume" in res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "incomplete" and summary["done"] == 5 and summary["n"] == 8
    assert "failed after 2 attempts" in summary["error"]
    kept = lines(out / "samples.jsonl")
    assert len(kept) == 5 and all(r["correct_strict"] for r in kept)

    # Without --resume the unfinished run is not thrown away.
    with CannedServer(right) as srv:
        again = gate(data, "--endpoint", srv.url, "--model", "m", "--out-dir", str(out))
        assert again.exit_code == 2 and "--resume" in again.output
        res = gate(data, "--endpoint", srv.url, "--model", "m", "--out-dir", str(out), "--resume",
                   "--min-accuracy", "1")
    assert res.exit_code == 0, res.output
    assert len(srv.requests) == 3                      # only the missing questions
    assert "resumed: 5 of 8" in res.output
    done = lines(out / "samples.jsonl")
    assert [r["doc_id"] for r in done] == list(range(8))
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"


def test_resume_refuses_another_runs_samples(tmp_path):
    data, _ = write_gsm8k(tmp_path, n_test=4)
    out = tmp_path / "out"
    with CannedServer(right) as srv:
        assert gate(data, "--endpoint", srv.url, "--out-dir", str(out), "--num-fewshot", "0").exit_code == 0
        res = gate(data, "--endpoint", srv.url, "--out-dir", str(out), "--resume")
    assert res.exit_code == 2 and "another run" in res.output


def test_cut_last_line_is_asked_again(tmp_path):
    data, _ = write_gsm8k(tmp_path, n_test=4)
    out = tmp_path / "out"
    with CannedServer(right) as srv:
        assert gate(data, "--endpoint", srv.url, "--out-dir", str(out)).exit_code == 0
        text = (out / "samples.jsonl").read_text().splitlines()
        (out / "samples.jsonl").write_text("\n".join(text[:2] + [text[2][:40]]))   # killed mid-write
        s = json.loads((out / "summary.json").read_text())
        (out / "summary.json").write_text(json.dumps({**s, "status": "running"}))
        n0 = len(srv.requests)
        res = gate(data, "--endpoint", srv.url, "--out-dir", str(out), "--resume")
    assert res.exit_code == 0, res.output
    assert len(srv.requests) - n0 == 2 and "cut short" in res.output


def test_inputs_checked_before_generating(tmp_path):
    data, _ = write_gsm8k(tmp_path, n_test=4)
    with CannedServer(right) as srv:
        res = gate(data, "--endpoint", srv.url, "--baseline-samples", str(tmp_path / "missing"))
        assert res.exit_code == 2 and "no samples file" in res.output
        assert srv.requests == []
        base = tmp_path / "base"
        assert gate(data, "--endpoint", srv.url, "--out-dir", str(base)).exit_code == 0
        n0 = len(srv.requests)
        into = gate(data, "--endpoint", srv.url, "--baseline-samples", str(base), "--out-dir", str(base))
        assert into.exit_code == 2 and "overlaps the input" in into.output
        bad_filter = gate(data, "--endpoint", srv.url, "--filter", "(")
        assert bad_filter.exit_code == 2
        assert len(srv.requests) == n0


def test_format_and_out(tmp_path):
    data, _ = write_gsm8k(tmp_path, n_test=4)
    with CannedServer(right) as srv:
        js = gate(data, "--endpoint", srv.url, "--format", "json")
        csv = gate(data, "--endpoint", srv.url, "--format", "csv", "--out", str(tmp_path / "r.csv"))
        again = gate(data, "--endpoint", srv.url, "--format", "csv", "--out", str(tmp_path / "r.csv"))
        picked = gate(data, "--endpoint", srv.url, "--filter", "Test 2:", "--format", "markdown")
        none = gate(data, "--endpoint", srv.url, "--filter", "nothing like this")
    doc = json.loads(js.output)
    assert js.exit_code == 0 and doc["status"] == "complete" and len(doc["rows"]) == 4
    import csv as csvlib

    assert csv.exit_code == 0 and len(list(csvlib.DictReader(open(tmp_path / "r.csv")))) == 4
    assert again.exit_code == 2 and "--force" in again.output
    assert picked.exit_code == 0 and "## GSM8K gate" in picked.output and picked.output.count("Test 2:") == 1
    assert none.exit_code == 2 and "matches no question" in none.output


def test_no_hidden_options():
    from parity.cli.gate import gsm8k_cmd

    assert [o.name for o in gsm8k_cmd.params if getattr(o, "hidden", False)] == []
    text = CliRunner().invoke(cli, ["gate", "gsm8k", "--help"]).output
    assert "--backoff S" in text and "--format" in text and "--out FILE" in text


def test_server_down_from_the_first_request_keeps_nothing_and_says_so(tmp_path):
    data, _ = write_gsm8k(tmp_path, n_test=2)
    res = gate(data, "--endpoint", f"http://127.0.0.1:{free_port()}", "--model", "m", "--timeout", "2",
               "--out-dir", str(tmp_path / "o"))
    assert res.exit_code == 2 and "0 of 2 questions" in res.output


def test_token_ids_that_differ_by_a_bos_are_counted(tmp_path):
    data, _ = write_gsm8k(tmp_path, n_test=4)
    a, b = tmp_path / "a", tmp_path / "b"
    with CannedServer(right) as srv:
        assert gate(data, "--endpoint", srv.url, "--out-dir", str(a)).exit_code == 0
        assert gate(data, "--endpoint", srv.url, "--out-dir", str(b)).exit_code == 0
    for d, lead in ((a, []), (b, [0])):   # the same text, BOS on one side only
        recs = lines(d / "samples.jsonl")
        for r in recs:
            r["prompt_token_ids"] = lead + [5, 6, 7]
        (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    d = CliRunner().invoke(cli, ["gate", "diff", str(a), str(b), "--format", "json"])
    doc = json.loads(d.output)
    assert doc["prompt hash mismatches"] == 0 and doc["prompt token mismatches"] == 4
    from parity.gate.run import load_samples, pair_with_baseline

    p = pair_with_baseline(load_samples(a), load_samples(b), "strict-match")
    assert p.token_mismatch == 4 and any("BOS" in n for n in p.notes)
