"""One rank of a tensor-parallel engine run, for the TP tests.

    torchrun --nproc-per-node 2 tests/tp_probe.py --ckpt DIR --out OUT --jobs JOBS.json

JOBS.json: ``{"prompts": [[ids...], ...], "new_tokens": N, "jobs": [{"name":
..., "fault": NAME or null, "weights": bool}, ...]}``. Every job is one fresh
``Engine`` (tensor parallel over all ranks of the launch) capturing into
``OUT/<name>/`` (each rank its ``rank{R}/``), and with ``weights`` also its
weights into ``OUT/<name>-weights/``. Rank 0 writes ``OUT/tokens.json``:
job name -> generated tokens. The jobs share one launch, so the imports and
the process group are paid once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@contextlib.contextmanager
def _env(**values):
    """Set (value) or unset (None) environment variables for a block."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, str(v))
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _all_prompt_logits(engine) -> None:
    """Logits of every prompt row, as the reference records them; sampling
    still reads each sequence's last row."""
    forward = engine.forward

    def full(chunks, phase="prefill", step=0, all_logits=False):
        logits = forward(chunks, phase=phase, step=step, all_logits=True)
        return logits if all_logits else logits[engine.last_meta.last_rows]

    engine.forward = full


def run_job(ckpt: str, out: Path, prompts: list[list[int]], new_tokens: int, job: dict) -> list[list[int]]:
    from runners.engine import Engine

    dump = out / job["name"]
    env = {"PARITY_DUMP_DIR": str(dump), "PARITY_DUMP_EXISTING": "overwrite",
           "PARITY_ENGINE_FAULT": job.get("fault") or None,
           "PARITY_WEIGHT_DUMP_DIR": str(out / f"{job['name']}-weights") if job.get("weights") else None}
    with _env(**env):
        engine = Engine(ckpt, max_num_seqs=len(prompts), max_model_len=128)
    handle = engine.capture
    if handle is None or not handle.enabled:
        raise RuntimeError(f"capture into {dump} did not start")
    try:
        _all_prompt_logits(engine)
        results = engine.generate(prompts, max_new_tokens=new_tokens, greedy=True, ignore_eos=True)
        generated = [list(r.token_ids) for r in results]
        handle.set_run_info(token_ids=[p + g for p, g in zip(prompts, generated)], generated=generated,
                            fault=job.get("fault"))
    finally:
        handle.close()
    return generated


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", required=True)
    args = ap.parse_args()
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    spec = json.loads(Path(args.jobs).read_text())
    out = Path(args.out)
    tokens = {}
    for job in spec["jobs"]:
        tokens[job["name"]] = run_job(args.ckpt, out, spec["prompts"], spec["new_tokens"], job)
        dist.barrier()  # every rank's dump is closed before the next job
    if dist.get_rank() == 0:
        (out / "tokens.json").write_text(json.dumps(tokens))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sys.exit(main())
