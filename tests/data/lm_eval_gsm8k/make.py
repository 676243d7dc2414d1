"""Regenerate the lm-eval output fixtures in this folder (needs lm-eval installed).

    python3 tests/data/lm_eval_gsm8k/make.py

lm-eval's own evaluator runs its gsm8k task (yaml included as is, only the
dataset swapped for the synthetic questions of tests/gate_fixtures.py) with a
canned model, and its EvaluationTracker writes results_*.json and
samples_gsm8k_*.jsonl, saved here as results.json and samples_gsm8k.jsonl.
Machine-specific fields (environment dump, git hashes, temp paths) are
blanked.
"""

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parents[0]))

from gate_fixtures import answer_of, last_question, synth_docs, write_jsonl  # noqa: E402

DOCS = synth_docs(8)


def canned(i: int, prompt: str) -> str:
    a = answer_of(last_question(prompt), DOCS)
    return [
        f" Sam has the pens.\n#### {a}",                       # right, both filters
        f" So {a} pens in total.",                             # right for flexible only
        " Sam has 7 pens.\n#### 7",                            # wrong
        f" #### {a}\n\nQuestion: a made-up one with 99",       # ran past the stop sequence
        f" That is ${a}.",                                     # right for flexible ($ and . dropped)
        " I cannot tell.",                                     # nothing to extract
        f" It is {a}.00",                                      # wrong: string compare
        f" Sam has {a} pens.\n#### {a}",
    ][i % 8]


def main():
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    class Canned(LM):
        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            return [canned(int(last_question(r.args[0]).split(":")[0].split()[-1]), r.args[0])
                    for r in requests]

    tmp = Path(tempfile.mkdtemp())
    write_jsonl(tmp / "test.jsonl", DOCS)
    write_jsonl(tmp / "train.jsonl", synth_docs(12, 100, "Train"))
    base = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "gsm8k", "gsm8k.yaml")
    (tmp / "tasks").mkdir()
    (tmp / "tasks" / "gsm8k.yaml").write_text(
        f"include: {base}\ntask: gsm8k\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {tmp}/train.jsonl\n    test: {tmp}/test.jsonl\n"
        f"  cache_dir: {tmp}/cache\n")
    tm = TaskManager(include_path=str(tmp / "tasks"), include_defaults=False)
    res = lm_eval.simple_evaluate(model=Canned(), tasks=["gsm8k"], num_fewshot=2, limit=8,
                                  log_samples=True, task_manager=tm)
    samples = res.pop("samples")
    tracker = EvaluationTracker(output_path=str(tmp / "out"))
    tracker.save_results_aggregated(results=res, samples=samples)
    tracker.save_results_samples(task_name="gsm8k", samples=samples["gsm8k"])
    out = next(p for p in (tmp / "out").rglob("results_*.json"))
    smp = next(p for p in (tmp / "out").rglob("samples_gsm8k_*.jsonl"))
    results = json.loads(out.read_text())
    for key in ("pretty_env_info", "git_hash", "upper_git_hash"):
        results[key] = None
    text = json.dumps(results, indent=2, ensure_ascii=False).replace(str(tmp), "/tmp/fixture")
    (HERE / "results.json").write_text(text + "\n")
    (HERE / "samples_gsm8k.jsonl").write_text(re.sub(re.escape(str(tmp)), "/tmp/fixture", smp.read_text()))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
