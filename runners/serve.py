"""Serve the engine over OpenAI-compatible HTTP (docs/serve.md).

    python -m runners.serve --ckpt DIR [--host 127.0.0.1] [--port P] ...

Needs the ``serve`` extra (FastAPI, uvicorn): ``pip install -e '.[serve]'``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PRECISIONS = ("fp32", "bf16", "fp8")


def _parser() -> argparse.ArgumentParser:
    from runners.server.run import DEFAULTS

    ap = argparse.ArgumentParser(prog="python -m runners.serve",
                                 description="OpenAI-compatible server on the engine.")
    ap.add_argument("--ckpt", required=True, help="checkpoint directory (config, safetensors, tokenizer)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-num-seqs", type=int, default=8, help="sequences batched in one step")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="prompt + completion tokens per sequence (default: the engine's)")
    ap.add_argument("--model-name", default=None, help="name in /v1/models (default: the checkpoint folder)")
    ap.add_argument("--chat-template", metavar="FILE", default=None,
                    help="Jinja chat template for /v1/chat/completions (default: the checkpoint's)")
    ap.add_argument("--max-concurrency", type=int, default=DEFAULTS["max_concurrency"],
                    help="requests in flight at once; more get 503 at once")
    ap.add_argument("--backlog", type=int, default=DEFAULTS["backlog"],
                    help="connections the kernel queues before they are accepted")
    ap.add_argument("--read-timeout", type=float, default=DEFAULTS["read_timeout"],
                    help="seconds a client has to send a request's head, and then its body")
    ap.add_argument("--shutdown-grace", type=float, default=DEFAULTS["grace"],
                    help="seconds in-flight requests get to finish after SIGINT/SIGTERM")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); 1 is steadier on a shared CPU")
    ap.add_argument("--quiet", action="store_true", help="no per-request log lines")
    return ap


def _check(args) -> None:
    from runners.engine.errors import ParityError

    checks = [
        (not Path(args.ckpt).is_dir(), f"--ckpt {args.ckpt}: no such directory"),
        (args.max_num_seqs < 1, "--max-num-seqs must be >= 1"),
        (args.max_model_len is not None and args.max_model_len < 2, "--max-model-len must be >= 2"),
        (not 0 <= args.port <= 65535, f"--port must be in 0..65535, got {args.port}"),
        (args.threads is not None and args.threads < 1, "--threads must be >= 1"),
        (args.max_concurrency < 1, "--max-concurrency must be >= 1"),
        (args.backlog < 1, "--backlog must be >= 1"),
        (not args.read_timeout > 0, "--read-timeout must be > 0"),
        (not args.shutdown_grace >= 0, "--shutdown-grace must be >= 0"),
        (args.chat_template is not None and not Path(args.chat_template).is_file(),
         f"--chat-template {args.chat_template}: no such file"),
    ]
    for failed, message in checks:
        if failed:
            raise ParityError(message)


def main(argv=None) -> int:
    try:
        from runners.server.run import Serving
    except ModuleNotFoundError as exc:
        sys.stderr.write(f"error: the server needs {exc.name}; install the serve extra "
                         "(pip install -e '.[serve]')\n")
        return 2
    from runners.engine.errors import ParityError

    args = _parser().parse_args(argv)
    try:
        _check(args)
        from runners.engine import Engine

        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        kwargs = {"precision": args.precision, "device": args.device, "max_num_seqs": args.max_num_seqs}
        if args.max_model_len is not None:
            kwargs["max_model_len"] = args.max_model_len
        t0 = time.monotonic()
        engine = Engine(args.ckpt, **kwargs)
        if engine.tokenizer is None:
            sys.stderr.write(f"note: {args.ckpt} has no tokenizer.json: only token-id prompts work "
                             "and texts come back empty\n")
        template = Path(args.chat_template).read_text(encoding="utf-8") if args.chat_template else None
        try:
            serving = Serving(engine, args.host, args.port, model_name=args.model_name, chat_template=template,
                              backlog=args.backlog, max_concurrency=args.max_concurrency,
                              read_timeout=args.read_timeout, grace=args.shutdown_grace,
                              log_requests=not args.quiet)
        except OSError as exc:
            raise ParityError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    except ParityError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    rules = serving.loop.rules
    sys.stderr.write(f"loaded {args.ckpt} ({args.precision}, {args.device}) in {time.monotonic() - t0:.1f} s; "
                     f"BOS {'added' if rules.add_bos else 'not added'} ({rules.add_bos_source}); chat "
                     f"template: {rules.chat_template_source or 'none (/v1/chat/completions answers 400)'}\n")
    serving.run(announce=lambda: print(f"serving {serving.model_name} at {serving.url}", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
