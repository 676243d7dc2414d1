"""Answer extraction and scoring, against hand-checked cases and, when
lm-eval is installed, against lm-eval's own filters, metric and prompts."""

import json
import os

import pytest

from gate_fixtures import synth_docs, write_jsonl
from parity.gate import extract as ex
from parity.gate.task import UNTIL, build_prompts

# Generations shaped like what base and instruct models write after a
# GSM8K fewshot prompt, including the awkward ones.
GENERATIONS = [
    " Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18",
    " She makes 9 * 2 = $18 every day.\n#### $18",
    " The total is 1,200 + 34 = 1,234 dollars.\n#### 1,234",
    " He loses 5 - 8 = -3 points.\n#### -3",
    " The answer is 18.",
    " The answer is 18.00",
    " So she earns $18.\n\n",
    " That is 3 bolts.\n####3",
    " 12 / 4 = 3.5\n#### 3.5.",
    " #### 42\n#### 43",
    " I am not sure.",
    "",
    " 5 apples and 7 pears make 12 fruits. So 12.",
    " First 10.5%, then 20 people. Answer: 20.",
    " Total: $1,000,000.",
    " 7.\n",
    " .5 of 10 is 5",
    " Result: -,.",
    " #### 0.25",
    " He pays 3*$4=$12 and keeps 100-12=88.\n#### 88",
    " 2,5",
    " the answer is seventy",
]
TARGETS = ["18", "18", "1,234", "-3", "18", "18", "18", "3", "3.5", "42", "5", "0", "12", "20", "1000000",
           "7", "5", "0", "0.25", "88", "25", "70"]


def test_strict_match():
    assert ex.extract(GENERATIONS[0], "strict-match") == "18"
    assert ex.extract(GENERATIONS[1], "strict-match") == "[invalid]"   # "$" is not in the class
    assert ex.extract(GENERATIONS[2], "strict-match") == "1,234"
    assert ex.extract(GENERATIONS[3], "strict-match") == "-3"
    assert ex.extract(GENERATIONS[7], "strict-match") == "[invalid]"   # no space after ####
    assert ex.extract(GENERATIONS[8], "strict-match") == "3.5."
    assert ex.extract(GENERATIONS[9], "strict-match") == "42"          # the first one


def test_flexible_extract_takes_the_last_number():
    assert ex.extract(GENERATIONS[1], "flexible-extract") == "$18"
    assert ex.extract(GENERATIONS[4], "flexible-extract") == "18."
    assert ex.extract(GENERATIONS[9], "flexible-extract") == "43"
    assert ex.extract(GENERATIONS[13], "flexible-extract") == "20."
    assert ex.extract(GENERATIONS[10], "flexible-extract") == "[invalid]"
    assert ex.extract(GENERATIONS[15], "flexible-extract") == "7."


def test_normalisation_and_correctness():
    assert ex.target_answer("work\n#### 1,234") == "1234"
    assert ex.is_correct("$18", "#### 18")
    assert ex.is_correct("18.", "#### 18")
    assert ex.is_correct("1,234", "#### 1234")
    assert not ex.is_correct("18.00", "#### 18")       # string compare, not numeric
    assert not ex.is_correct("18..", "#### 18")        # only one trailing period goes
    assert not ex.is_correct("[invalid]", "#### 18")
    assert ex.truncate_at_stop(" x\n#### 4\n\nQuestion: y 9", UNTIL) == " x\n#### 4\n\n"
    s = ex.score(" 3 then 4.\n#### 4", "#### 4")
    assert s == {"answer_strict": "4", "correct_strict": True,
                 "answer_flexible": "4", "correct_flexible": True}


# ----------------------------------------------------------------------------- lm-eval

def _lm_eval_yaml():
    lm_eval = pytest.importorskip("lm_eval")
    import yaml

    path = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "gsm8k", "gsm8k.yaml")
    with open(path) as fh:
        # The yaml holds !function tags in other tasks, not in gsm8k's.
        return path, yaml.safe_load(fh)


def test_task_constants_match_lm_evals_yaml():
    _, cfg = _lm_eval_yaml()
    assert cfg["doc_to_text"] == "Question: {{question}}\nAnswer:"
    assert cfg["fewshot_split"] == "train" and cfg["test_split"] == "test"
    assert tuple(cfg["generation_kwargs"]["until"]) == UNTIL
    assert cfg["generation_kwargs"]["do_sample"] is False
    metric = cfg["metric_list"][0]
    assert metric["metric"] == "exact_match"
    assert tuple(metric["regexes_to_ignore"]) == ex.REGEXES_TO_IGNORE
    assert metric["ignore_case"] is ex.IGNORE_CASE
    assert metric["ignore_punctuation"] is ex.IGNORE_PUNCTUATION
    filters = {f["name"]: f["filter"] for f in cfg["filter_list"]}
    for name, (pattern, group) in ex.FILTERS.items():
        steps = filters[name]
        assert steps[0]["function"] == "regex" and steps[0]["regex_pattern"] == pattern
        assert steps[0].get("group_select", 0) == group
        assert steps[1]["function"] == "take_first"


def test_extraction_and_scoring_match_lm_eval():
    _, cfg = _lm_eval_yaml()
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.filters.selection import TakeFirstFilter

    metric = {k: v for k, v in cfg["metric_list"][0].items()
              if k in ("ignore_case", "ignore_punctuation", "regexes_to_ignore")}
    docs = [{"question": "q", "answer": f"work\n#### {t}"} for t in TARGETS]
    for f in cfg["filter_list"]:
        regex = RegexFilter(**{k: v for k, v in f["filter"][0].items() if k != "function"})
        theirs = list(TakeFirstFilter().apply(regex.apply([[g] for g in GENERATIONS], docs), docs))
        ours = [ex.extract(g, f["name"]) for g in GENERATIONS]
        assert ours == theirs, f["name"]
        for got, doc in zip(ours, docs):
            em = exact_match_hf_evaluate(predictions=[got], references=[doc["answer"]], **metric)
            assert ex.is_correct(got, doc["answer"]) == bool(em["exact_match"]), (f["name"], got)


def test_prompts_match_lm_eval_task(tmp_path):
    """lm-eval's own ConfigurableTask, fed the same small splits, builds the
    same prompts (fewshot examples, delimiters, seed) as build_prompts."""
    path, _ = _lm_eval_yaml()
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

    test, train = synth_docs(5), synth_docs(30, 100, "Train")
    write_jsonl(tmp_path / "test.jsonl", test)
    write_jsonl(tmp_path / "train.jsonl", train)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "fixture.yaml").write_text(
        f"include: {path}\ntask: gsm8k_fixture\ndataset_path: json\ndataset_name: null\n"
        "dataset_kwargs:\n  data_files:\n"
        f"    train: {tmp_path / 'train.jsonl'}\n    test: {tmp_path / 'test.jsonl'}\n"
        f"  cache_dir: {tmp_path / 'cache'}\n")
    loaded = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False).load(["gsm8k_fixture"])
    task = next(t for t in loaded["tasks"].values() if isinstance(t, Task))
    task.set_config(key="num_fewshot", value=3)
    task.set_fewshot_seed(1234)  # the evaluator's default --fewshot_random_seed
    task.build_all_requests(limit=4, rank=0, world_size=1)
    theirs = [inst.args[0] for inst in sorted(task.instances, key=lambda i: i.doc_id)]
    assert theirs == build_prompts(test, train, 3, limit=4)
    gen_kwargs = task.instances[0].args[1]
    assert tuple(gen_kwargs["until"]) == UNTIL
