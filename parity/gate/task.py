"""GSM8K documents and prompts, built the way lm-eval's ``gsm8k`` task builds them.

Matching lm-eval byte for byte matters: a gate baseline recorded with
lm-eval and a run of ours must send the model the same prompts, or the
accuracies are not comparable. The prompt hash (sha256 of the prompt text)
is the same one lm-eval logs as ``prompt_hash``, so per-question records of
either tool can be paired and checked.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from parity.errors import ParityError

# lm-eval 0.4.13, lm_eval/tasks/gsm8k/gsm8k.yaml (task version 3.0).
LM_EVAL_VERSION_CHECKED = "0.4.13"
TASK_NAME = "gsm8k"
TASK_VERSION = 3.0
DOC_TO_TEXT = "Question: {question}\nAnswer:"
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
UNTIL = ("Question:", "</s>", "<|im_end|>")
# lm-eval's default max_gen_toks; the task yaml does not override it.
MAX_GEN_TOKS = 256
# lm-eval's default --fewshot_random_seed.
FEWSHOT_SEED = 1234
LM_EVAL_DEFAULT_NUM_FEWSHOT = 5


DATA_ENV = "PARITY_GSM8K_DATA"


def default_data_path() -> Path | None:
    """The GSM8K test split named by PARITY_GSM8K_DATA; None when unset
    (parity ships no data and assumes no folder layout)."""
    import os

    value = os.environ.get(DATA_ENV, "").strip()
    return Path(value) if value else None


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def iter_jsonl(path: Path, what: str | None = None):
    """(line number, object) for every non-blank line of a jsonl file; a
    line that is not JSON is one clear error naming the file and line."""
    prefix = f"{what}: " if what else ""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ParityError(f"{prefix}{path}:{lineno} is not JSON: {exc.msg}") from None


def load_docs(path: str | Path, what: str = "GSM8K data") -> list[dict]:
    """Read a GSM8K jsonl split (one {"question", "answer"} object per line)."""
    p = Path(path)
    if not p.is_file():
        raise ParityError(f"{what}: {p} does not exist")
    docs = []
    for lineno, doc in iter_jsonl(p, what):
        if not isinstance(doc, dict) or not isinstance(doc.get("question"), str) \
                or not isinstance(doc.get("answer"), str):
            raise ParityError(f"{what}: {p}:{lineno} needs string fields 'question' and 'answer'")
        docs.append({"question": doc["question"], "answer": doc["answer"]})
    if not docs:
        raise ParityError(f"{what}: {p} holds no documents")
    return docs


def doc_to_text(doc: dict) -> str:
    return DOC_TO_TEXT.format(question=doc["question"])


def fewshot_block(doc: dict) -> str:
    return doc_to_text(doc) + TARGET_DELIMITER + doc["answer"] + FEWSHOT_DELIMITER


@dataclass
class GateTask:
    """The prompts of one gate run, and what produced them."""

    docs: list[dict]
    prompts: list[str]
    num_fewshot: int
    limit: int | None
    data_path: str | None = None
    fewshot_path: str | None = None
    seed: int = FEWSHOT_SEED
    until: tuple[str, ...] = UNTIL
    max_gen_toks: int = MAX_GEN_TOKS
    hashes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.hashes:
            self.hashes = [prompt_hash(p) for p in self.prompts]

    def __len__(self):
        return len(self.prompts)


def build_prompts(test_docs: list[dict], fewshot_docs: list[dict] | None, num_fewshot: int,
                  limit: int | None = None, seed: int = FEWSHOT_SEED) -> list[str]:
    """Prompts for the first ``limit`` test documents.

    lm-eval draws each document's examples from one ``random.Random(seed)``
    shared by the whole run, in document order, with ``rnd.sample(train, k)``;
    the examples therefore depend on the document's position, and on the
    training split being in its published order. The test split is not the
    fewshot split, so the evaluated document is never excluded from the pool.
    """
    if num_fewshot < 0:
        raise ParityError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and limit < 1:
        raise ParityError(f"--limit must be >= 1, got {limit}")
    docs = test_docs if limit is None else test_docs[:limit]
    if num_fewshot > 0:
        if not fewshot_docs:
            raise ParityError("--num-fewshot > 0 needs the GSM8K train split (--fewshot-data)")
        if num_fewshot > len(fewshot_docs):
            raise ParityError(f"--num-fewshot {num_fewshot} exceeds the {len(fewshot_docs)} "
                              "documents of the fewshot split")
    rnd = random.Random(seed)
    prompts = []
    for doc in docs:
        context = ""
        if num_fewshot > 0:
            context = "".join(fewshot_block(d) for d in rnd.sample(fewshot_docs, num_fewshot))
        prompts.append(context + doc_to_text(doc))
    return prompts


def load_task(data: str | Path | None = None, fewshot_data: str | Path | None = None,
              num_fewshot: int = 3, limit: int | None = 100, seed: int = FEWSHOT_SEED) -> GateTask:
    """Load the test split (and the train split when fewshot examples are
    needed) and build the prompts. ``fewshot_data`` defaults to
    ``train.jsonl`` next to the test file, where lm-eval's ``fewshot_split:
    train`` finds it."""
    if data is None:
        data = default_data_path()
        if data is None or not data.is_file():
            where = f"at {data} ({DATA_ENV})" if data is not None else f"given ({DATA_ENV} is not set)"
            raise ParityError(f"no GSM8K test split {where}; pass --data PATH "
                              "(a jsonl of {\"question\", \"answer\"} objects)")
    test_docs = load_docs(data, "GSM8K test split")
    train_docs = None
    if num_fewshot > 0:
        if fewshot_data is None:
            fewshot_data = Path(data).parent / "train.jsonl"
            if not fewshot_data.is_file():
                raise ParityError(f"--num-fewshot {num_fewshot} needs the train split, expected at "
                                  f"{fewshot_data}; pass --fewshot-data PATH or --num-fewshot 0")
        train_docs = load_docs(fewshot_data, "GSM8K train split (fewshot examples)")
    prompts = build_prompts(test_docs, train_docs, num_fewshot, limit, seed)
    docs = test_docs[: len(prompts)]
    return GateTask(docs=docs, prompts=prompts, num_fewshot=num_fewshot, limit=limit,
                    data_path=str(data), fewshot_path=str(fewshot_data) if train_docs else None,
                    seed=seed)
