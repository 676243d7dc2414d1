"""lm-eval 0.4.13 against the engine's server, over real HTTP on loopback:
its local-completions (token ids it makes itself with the checkpoint's
tokenizer, its default) and local-chat-completions models on a few GSM8K
questions, its output folder judged by the gate, and loglikelihood
requests (logprobs + echo)."""

import json
import math
import os

import pytest
from click.testing import CliRunner

from gate_fixtures import CKPT, load_engine, synth_docs, write_jsonl
from parity.cli import cli

pytest.importorskip("fastapi")
pytest.importorskip("aiohttp")
lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.skipif(not (CKPT / "config.json").exists(), reason="no tiny-gsm8k checkpoint")

N_TEST, SHOTS, MAX_GEN = 3, 1, 24
# lm-eval sends the fewshot examples as turns; this template joins them back
# into the completions prompt (an answer follows " " and ends with "\n\n").
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %} {{ m['content'] }}\n\n"
            "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def server():
    from runners.server.run import Serving

    srv = Serving(load_engine()).start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval-data")
    write_jsonl(root / "test.jsonl", synth_docs(N_TEST))
    write_jsonl(root / "train.jsonl", synth_docs(12, 100, "Train"))
    base = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "gsm8k", "gsm8k.yaml")
    (root / "tasks").mkdir()
    # lm-eval's own gsm8k task, only the dataset swapped for local files.
    (root / "tasks" / "gsm8k.yaml").write_text(
        f"include: {base}\ntask: gsm8k\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {root}/train.jsonl\n    test: {root}/test.jsonl\n"
        f"  cache_dir: {root}/cache\n")
    return root


def evaluate(data, out, **kwargs):
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(tasks=["gsm8k"], num_fewshot=SHOTS, limit=N_TEST, log_samples=True,
                                  task_manager=TaskManager(include_path=str(data / "tasks"),
                                                           include_defaults=False), **kwargs)
    samples = res.pop("samples")
    tracker = EvaluationTracker(output_path=str(out))
    tracker.save_results_aggregated(results=res, samples=samples)
    tracker.save_results_samples(task_name="gsm8k", samples=samples["gsm8k"])
    return [s["resps"][0][0] for s in sorted(samples["gsm8k"], key=lambda s: s["doc_id"])
            if s["filter"] == "strict-match"]


@pytest.fixture(scope="module")
def gate_run(server, data, tmp_path_factory):
    """The gate's own run on the same questions: text prompts, the server tokenizes."""
    out = tmp_path_factory.mktemp("gate") / "out"
    res = CliRunner().invoke(cli, ["gate", "gsm8k", "--endpoint", server.url, "--data", str(data / "test.jsonl"),
                                   "--num-fewshot", str(SHOTS), "--max-new-tokens", str(MAX_GEN),
                                   "--no-progress", "--out-dir", str(out)])
    assert res.exit_code == 0, res.output
    return out


def generations(out):
    return [json.loads(line)["generation"] for line in (out / "samples.jsonl").read_text().splitlines()]


def test_local_completions_with_its_own_token_ids_answers_as_the_text_does(server, data, gate_run, tmp_path):
    # lm-eval's defaults: it tokenizes with the checkpoint's tokenizer
    # (add_bos_token=False) and sends token ids; the server's BOS rule makes
    # them the prompt the gate's text becomes.
    gens = evaluate(data, tmp_path / "lm", model="local-completions",
                    model_args=f"model={CKPT},base_url={server.url}/v1/completions,max_gen_toks={MAX_GEN},"
                               "num_concurrent=3")
    assert gens == generations(gate_run)
    # Its output folder, judged by the gate against the gate's own run.
    res = CliRunner().invoke(cli, ["gate", "gsm8k", "--lm-eval-results", str(tmp_path / "lm"),
                                   "--baseline-samples", str(gate_run), "--min-agreement", "1"])
    assert res.exit_code == 0, res.output
    assert "add_bos_token" not in res.output          # lm-eval's rule is the checkpoint's
    diff = CliRunner().invoke(cli, ["gate", "diff", str(gate_run), str(tmp_path / "lm"), "--text"])
    assert diff.exit_code == 0, diff.output


def test_local_chat_completions(server, data, gate_run, tmp_path, monkeypatch):
    monkeypatch.setattr(server.loop.rules, "chat_template", TEMPLATE)
    gens = evaluate(data, tmp_path / "chat", model="local-chat-completions", apply_chat_template=True,
                    model_args=f"model=tiny-gsm8k,base_url={server.url}/v1/chat/completions,"
                               f"max_gen_toks={MAX_GEN}")
    assert len(gens) == N_TEST and all(isinstance(g, str) and g for g in gens)
    # The fewshot turns rendered back into the same text: the same answers.
    assert gens == generations(gate_run)


def test_loglikelihood_requests(server):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=f"{server.url}/v1/completions", model=str(CKPT), batch_size=2)
    ctx = "Question: Sam has 3 boxes of 4 pens. How many pens?\nAnswer:"
    reqs = [Instance("loglikelihood", {}, (ctx, cont), i) for i, cont in enumerate([" Sam", " zebra purple"])]
    (likely, greedy), (unlikely, _) = lm.loglikelihood(reqs, disable_tqdm=True)
    assert math.isfinite(likely) and math.isfinite(unlikely) and unlikely < likely < 0
    assert isinstance(greedy, bool)
