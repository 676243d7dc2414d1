"""Train the `tiny` preset on GSM8K so that greedy decoding means something.

    python -m runners.train_tiny --out checkpoints/tiny-gsm8k [--data PATH] [--seed 0] [--steps 1500]

Random weights make greedy generations a coin toss and any accuracy gate
meaningless. A few minutes on one GPU teach the tiny model the GSM8K answer
format (a worked solution ending in `#### N`); its accuracy stays low, and is
reported as it is.

Training text is what the gate's few-shot prompts look like: worked examples
"Question: ...\\nAnswer: ..." joined by blank lines, packed into windows.
Deterministic from --seed (data order, initial weights).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TRAINED_INDEX_HEADS = 4


def default_train_path() -> Path:
    return REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def build_stream(tokenizer, docs, seed: int) -> list[list[int]]:
    """Token ids of each worked example, as a few-shot block would show it."""
    rng = random.Random(seed)
    docs = list(docs)
    rng.shuffle(docs)
    sep = tokenizer("\n\n", add_special_tokens=False).input_ids
    out = []
    for d in docs:
        text = f"Question: {d['question']}\nAnswer: {d['answer']}"
        out.append(tokenizer(text, add_special_tokens=False).input_ids + sep)
    return out


def batches(examples: list[list[int]], bos: int, seq_len: int, batch: int, seed: int):
    """Windows of seq_len+1 tokens, each starting with BOS at an example boundary."""
    rng = random.Random(seed + 1)
    while True:
        rows = []
        for _ in range(batch):
            ids = [bos]
            i = rng.randrange(len(examples))
            while len(ids) < seq_len + 1:
                ids.extend(examples[i])
                i = (i + 1) % len(examples)
            rows.append(ids[: seq_len + 1])
        yield torch.tensor(rows, dtype=torch.long)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runners.train_tiny", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=str(default_train_path()))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-minutes", type=float, default=7.0, help="stop early (still saving) after this long")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)

    from reference_models.load import load_reference, load_tokenizer
    from reference_models.synth import synthesize

    data = Path(args.data)
    if not data.is_file():
        print(f"error: GSM8K train split not found at {data} (pass --data)", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"error: {out} is not empty; pass --force to replace it", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    init_dir = Path(tempfile.mkdtemp()) / "init"
    # The committed checkpoint was trained with 4 indexer heads, before the
    # preset moved to 16; pinning it keeps this script reproducing that model.
    synthesize("tiny", seed=args.seed, out=init_dir, dtype="fp32", index_n_heads=TRAINED_INDEX_HEADS)
    model = load_reference(init_dir, precision="fp32", device=args.device)
    tok = load_tokenizer(init_dir)
    model.train()
    docs = [json.loads(line) for line in open(data, encoding="utf-8") if line.strip()]
    examples = build_stream(tok, docs, args.seed)
    n_tokens = sum(len(e) for e in examples)
    params = sum(p.numel() for p in model.parameters())
    log = [f"# tiny-gsm8k training: {params / 1e6:.2f}M parameters, {len(docs)} examples, "
           f"{n_tokens} tokens per epoch, device {args.device}, torch {torch.__version__}",
           f"# args: {json.dumps(vars(args))}"]
    print("\n".join(log), flush=True)

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else torch.autocast("cpu", enabled=False)
    t0 = time.time()
    seen = 0
    for step, batch in enumerate(batches(examples, tok.bos_token_id, args.seq_len, args.batch, args.seed)):
        if step >= args.steps or (time.time() - t0) > args.max_minutes * 60:
            break
        batch = batch.to(args.device)
        with amp:
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        seen += batch[:, 1:].numel()
        if step % 50 == 0 or step == args.steps - 1:
            line = (f"step {step:5d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                    f"tokens {seen}  epoch {seen / n_tokens:.2f}  elapsed {time.time() - t0:.0f}s")
            log.append(line)
            print(line, flush=True)
    log.append(f"# finished after {step} steps, {time.time() - t0:.0f}s, final loss {loss.item():.4f}")
    print(log[-1], flush=True)

    model.eval()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # bf16 weights, shards under 16 MB so no file in the repository is large.
    model.to(torch.bfloat16).save_pretrained(str(out), max_shard_size="12MB", safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (init_dir / f).exists():
            shutil.copyfile(init_dir / f, out / f)
    (out / "train_log.txt").write_text("\n".join(log) + "\n")
    (out / "provenance.json").write_text(json.dumps({"script": "runners/train_tiny.py", **vars(args)}, indent=1) + "\n")
    shutil.rmtree(init_dir.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
