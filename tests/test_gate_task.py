import random

import pytest

from gate_fixtures import synth_docs, write_gsm8k, write_jsonl
from parity.errors import ParityError
from parity.gate import task as gt


def test_prompt_format_zero_shot():
    docs = synth_docs(2)
    prompts = gt.build_prompts(docs, None, 0)
    assert prompts[0] == f"Question: {docs[0]['question']}\nAnswer:"
    assert not prompts[0].endswith(" ")  # the target delimiter only follows fewshot questions


def test_fewshot_blocks_and_seeded_sampling():
    test, train = synth_docs(4), synth_docs(10, 100, "Train")
    prompts = gt.build_prompts(test, train, 3)
    # One Random(1234) for the run, drawn in document order.
    rnd = random.Random(1234)
    for doc, prompt in zip(test, prompts):
        shots = rnd.sample(train, 3)
        want = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
        assert prompt == want + f"Question: {doc['question']}\nAnswer:"
    assert prompts[0].count("Question:") == 4
    # The examples depend on the position, so limit does not change earlier prompts.
    assert gt.build_prompts(test, train, 3, limit=2) == prompts[:2]


def test_load_task_defaults_to_train_next_to_test(tmp_path):
    test, _ = write_gsm8k(tmp_path, n_test=5)
    t = gt.load_task(test, num_fewshot=2, limit=3)
    assert len(t) == 3 and len(t.docs) == 3
    assert t.fewshot_path.endswith("train.jsonl")
    assert t.hashes[0] == gt.prompt_hash(t.prompts[0]) and len(t.hashes[0]) == 64


def test_load_task_errors(tmp_path):
    with pytest.raises(ParityError, match="does not exist"):
        gt.load_task(tmp_path / "nope.jsonl", num_fewshot=0)
    only_test = write_jsonl(tmp_path / "alone" / "test.jsonl", synth_docs(2))
    with pytest.raises(ParityError, match="train split"):
        gt.load_task(only_test, num_fewshot=3)
    assert len(gt.load_task(only_test, num_fewshot=0)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ParityError, match="answer"):
        gt.load_docs(bad)
    with pytest.raises(ParityError, match="exceeds"):
        gt.build_prompts(synth_docs(1), synth_docs(2), 3)


def test_missing_default_data_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(gt, "default_data_path", lambda: tmp_path / "none" / "test.jsonl")
    with pytest.raises(ParityError, match="--data"):
        gt.load_task(None)
