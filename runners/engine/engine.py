"""The engine's public face: load a checkpoint, take requests, step, generate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from runners.engine import faults, metadata, parallel
from runners.engine.cache import CacheManager
from runners.engine.errors import ParityError
from runners.engine.ops import invariant
from runners.engine.precision import activation_dtype
from runners.engine.sampling import SamplingParams, sample
from runners.engine.scheduler import Request, Scheduler
from runners.engine.weights import load_model


@dataclass
class GenerationResult:
    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens only
    text: str
    finish_reason: str | None


@dataclass
class StepOutput:
    request_id: int
    new_token: int | None  # None while the request is still prefilling
    finished: bool
    finish_reason: str | None


def _load_tokenizer(ckpt_dir):
    if not (Path(ckpt_dir) / "tokenizer.json").exists():
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(ckpt_dir), local_files_only=True)


# "As the environment says": the interface for a process nobody can edit.
# Code that builds an Engine passes its settings instead.
FROM_ENV = "env"


def _install_capture(model, config, run_info, tp: parallel.TP):
    if config is None:
        return None
    try:
        from parity import capture
        from parity.config import CaptureConfig
    except Exception:  # capture is optional
        return None
    config = None if config == FROM_ENV else config
    if tp.size > 1:
        # each rank writes its own rank{R}/ of one dump, whatever launched it
        try:
            config = (config or CaptureConfig.from_env()).replace(rank=tp.rank, world_size=tp.size)
        except Exception:  # noqa: BLE001 - a bad setting: install() reports it
            pass
    return capture.install(model, config, run_info=run_info)


class Engine:
    def __init__(self, ckpt_dir, precision: str = "fp32", device="cpu", max_num_seqs: int = 8,
                 max_model_len: int = 4096, max_num_batched_tokens: int = 4096, prefill_chunk: int | None = None,
                 block_size: int | None = None, num_blocks: int | None = None, strict: bool = True,
                 fault: str | None = FROM_ENV, capture=FROM_ENV, tp: int | None = None):
        """``fault``: a bug-zoo fault name, None for none, or FROM_ENV
        (PARITY_ENGINE_FAULT). ``capture``: a parity CaptureConfig, None for
        no capture, or FROM_ENV (the PARITY_DUMP_* variables). ``tp``: ranks
        of tensor parallelism; None: every process of the launch (torchrun),
        1 without one (runners/engine/parallel.py)."""
        self.ckpt_dir, self.precision, self.device = str(ckpt_dir), precision, torch.device(device)
        # Read once here, so the hot path pays one set lookup per fault site.
        faults.load(None if fault == FROM_ENV else (fault or ""))
        self.fault = faults.current()
        self.tp = parallel.init(self.device, tp)
        self.model, self.config, self.load_report = load_model(ckpt_dir, precision, self.device, strict=strict,
                                                               tp=self.tp)
        self.cache = CacheManager(self.config, max_num_seqs, max_model_len, dtype=activation_dtype(precision),
                                  device=self.device, block_size=block_size, num_blocks=num_blocks)
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_num_batched_tokens, prefill_chunk)
        self.tokenizer = _load_tokenizer(ckpt_dir)
        self.capture = _install_capture(self.model, capture, self.run_info, self.tp)
        self.requests: dict[int, Request] = {}
        self.decode_step = 0
        self.last_meta: metadata.ForwardMeta | None = None

    @property
    def run_info(self) -> dict:
        """What a dump of this engine declares about its run (run.json): a
        compare picks its thresholds by ``precision`` and its slot rule by
        ``batch_invariant`` (the promise docs/engine.md states), its mapping
        onto the reference by ``mapping_preset``."""
        info = {"impl": "engine", "precision": self.precision, "checkpoint": self.ckpt_dir, "fault": self.fault,
                "batch_invariant": invariant.enabled(torch.empty(0, device=self.device)),
                "mapping_preset": "deepseek_v4"}
        if self.tp.size > 1:
            info["tensor_parallel"] = self.tp.size
        return info

    # --- tokens -------------------------------------------------------
    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ParityError(f"{self.ckpt_dir} has no tokenizer.json; pass token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    # --- step-level API -----------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None, request_id: int | None = None) -> int:
        ids = self.encode(prompt)
        if not ids:
            raise ParityError("empty prompt")
        params = params or SamplingParams()
        rid = self.scheduler.next_id() if request_id is None else request_id
        if rid in self.requests:
            raise ParityError(f"request id {rid} is already in use")
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        req = Request(rid, ids, params, generator=gen)
        self.scheduler.add(req)
        self.requests[rid] = req
        return rid

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort_request(self, request_id: int) -> None:
        """Stop a request now; its slot and blocks are free for the next step."""
        req = self.requests.get(request_id)
        if req is not None and not req.finished:
            self.scheduler.abort(req)

    def get_request(self, request_id: int) -> Request:
        """The request's state (prompt_ids, output_ids, finished, finish_reason)."""
        return self.requests[request_id]

    def release(self, request_id: int) -> Request:
        """Forget a finished request (step-API users call this once they read it)."""
        return self.requests.pop(request_id)

    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        prefill = any(req.in_prefill for req, _ in batch)
        if prefill:
            phase, step = "prefill", 0
        else:
            self.decode_step += 1
            phase, step = "decode", self.decode_step
        chunks = [metadata.SeqChunk(req.request_id, self.cache.slot_of[req.request_id], req.num_computed,
                                    req.all_ids[req.num_computed:req.num_computed + n],
                                    self.cache.blocks_of[req.request_id]) for req, n in batch]
        logits = self.forward(chunks, phase=phase, step=step)
        # Row i belongs to the i-th output: a server reads logprobs from here.
        self.last_logits = logits
        outs = []
        for (req, n), row in zip(batch, logits):
            req.num_computed += n
            if req.num_computed < req.num_tokens:  # a prompt chunk: nothing to sample yet
                outs.append(StepOutput(req.request_id, None, False, None))
                continue
            tok = sample(row, req.params, req.generator)
            req.output_ids.append(tok)
            reason = self._stop_reason(req, tok)
            if reason:
                self.scheduler.finish(req, reason)
            outs.append(StepOutput(req.request_id, tok, req.finished, req.finish_reason))
        return outs

    def _stop_reason(self, req: Request, tok: int) -> str | None:
        p = req.params
        stop_ids = self.config.eos_token_id if p.stop_token_ids is None else p.stop_token_ids
        if not p.ignore_eos and tok in stop_ids:
            return "stop"
        if p.stop and self.tokenizer is not None:
            req.text = self.decode(req.output_ids)
            for s in p.stop:
                at = req.text.find(s)
                if at >= 0:
                    req.text = req.text[:at]
                    return "stop"
        if len(req.output_ids) >= p.max_new_tokens:
            return "length"
        return None

    def forward(self, chunks: list[metadata.SeqChunk], phase: str = "prefill", step: int = 0,
                all_logits: bool = False) -> torch.Tensor:
        """One model forward over scheduled chunks; logits of each chunk's last row (or all rows)."""
        meta = metadata.build(self.config, chunks, self.cache.cache.num_slots, self.cache.block_size,
                              device=self.device, phase=phase, step=step)
        self.last_meta = meta
        if self.capture is not None:
            # start_positions tells a compare where each sequence's rows sit
            # when a prompt is split over several prefill forwards
            self.capture.set_context(phase=phase, step=step, seq_ids=[self._capture_id(c.seq_id) for c in chunks],
                                     cu_seqlens=meta.cu_seqlens, slot_ids=meta.slots,
                                     start_positions=[c.start for c in chunks])
        return self.model(meta, self.cache.cache, all_logits=all_logits)

    def _capture_id(self, request_id: int) -> int:
        req = self.requests.get(request_id)
        return req.seq_index if req is not None and req.seq_index is not None else request_id

    # --- convenience ----------------------------------------------------
    def generate(self, prompts, max_new_tokens: int = 16, greedy: bool = True, temperature: float = 1.0,
                 top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
                 ignore_eos: bool = False, stop_token_ids: list[int] | None = None) -> list[GenerationResult]:
        """Run prompts (strings or token-id lists) to completion; one result per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        self.decode_step = 0
        rids = []
        for i, p in enumerate(prompts):
            params = SamplingParams(max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
                                    top_p=top_p, stop=list(stop or []), stop_token_ids=stop_token_ids,
                                    ignore_eos=ignore_eos, seed=None if seed is None else seed + i)
            rid = self.add_request(p, params)
            self.requests[rid].seq_index = i
            rids.append(rid)
        if self.capture is not None:
            # prompt_lens: how a compare tells prompt rows from decode rows by position
            self.capture.set_run_info(token_ids=[self.requests[r].prompt_ids for r in rids],
                                      prompt_lens=[len(self.requests[r].prompt_ids) for r in rids],
                                      impl="engine", precision=self.precision)
        while self.has_unfinished():
            if not self.step():
                raise ParityError("the scheduler cannot place any waiting request (cache too small)")
        results = []
        for rid in rids:
            req = self.requests.pop(rid)
            text = req.text if req.params.stop else self.decode(req.output_ids)
            results.append(GenerationResult(rid, req.prompt_ids, list(req.output_ids), text, req.finish_reason))
        return results
