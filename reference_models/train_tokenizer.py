"""Train the byte-level BPE tokenizer that every synthesized checkpoint ships.

    python -m reference_models.train_tokenizer --data PATH/gsm8k/train.jsonl

The corpus is GSM8K train (questions and answers). The data itself is never
committed; only the trained ``tokenizer.json`` and the two small files
transformers needs to load it with ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# Order fixes the ids: bos 0, eos 1, pad 2, as in the presets' configs.
SPECIAL_TOKENS = [BOS, EOS, PAD]
VOCAB_SIZE = 4096
DEFAULT_OUT = Path(__file__).resolve().parent / "tokenizer"


def read_gsm8k_texts(path: str | os.PathLike) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                texts.append(row["question"])
                texts.append(row["answer"])
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # Every byte stays encodable, so no text outside GSM8K is ever lost.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    # A prompt starts with BOS like DeepSeek's chat format; ByteLevel offsets
    # are kept untouched (trim_offsets only matters for offsets, not ids).
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]),
        ]
    )
    return tok


def write_tokenizer(tok, out_dir: str | os.PathLike) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": 1048576,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,  # the post-processor already adds it
    }
    for name, payload in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (out / name).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="GSM8K train.jsonl")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)
    tok = build_tokenizer(read_gsm8k_texts(args.data), args.vocab_size)
    write_tokenizer(tok, args.out)
    print(f"wrote {args.out} (vocab {tok.get_vocab_size()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
