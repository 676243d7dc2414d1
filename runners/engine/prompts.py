"""How a served prompt becomes token ids: one BOS rule, and the chat template.

The rule: the checkpoint's ``tokenizer_config.json`` (``add_bos_token``)
decides whether a prompt starts with BOS, for text and token-id prompts
alike. Text is tokenized without special tokens; then, when the config says
so, BOS is put first unless the prompt already starts with it. Nothing is
ever taken away. Without the key, the tokenizer's own default (what
``tokenizer.json``'s post-processor adds to a plain ``encode``) decides.

Servers that tokenize text with the tokenizer's default but take token ids
as given (vLLM's way) answer two different prompts for one text whenever
a client tokenizes by another rule; lm-eval's ``local-completions`` does by
default (``add_bos_token=False``). One rule for both makes the answer
depend on the text only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runners.engine.errors import ParityError


def read_tokenizer_config(ckpt_dir) -> dict:
    p = Path(ckpt_dir) / "tokenizer_config.json"
    if not p.is_file():
        return {}
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ParityError(f"{p} is not readable JSON: {exc}") from None
    return cfg if isinstance(cfg, dict) else {}


def _chat_template_of(ckpt_dir, cfg: dict) -> str | None:
    jinja = Path(ckpt_dir) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # transformers' list of named templates
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) and tpl.strip() else None


@dataclass
class PromptRules:
    tokenizer: object | None
    bos_id: int | None
    add_bos: bool
    add_bos_source: str          # where add_bos came from, for the start-up line and /v1/models
    chat_template: str | None
    chat_template_source: str | None

    @classmethod
    def for_checkpoint(cls, ckpt_dir, tokenizer, chat_template: str | None = None,
                       chat_template_source: str | None = None) -> "PromptRules":
        cfg = read_tokenizer_config(ckpt_dir)
        bos_id = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
        if isinstance(cfg.get("add_bos_token"), bool):
            add_bos, source = cfg["add_bos_token"], "tokenizer_config.json add_bos_token"
        elif tokenizer is not None and bos_id is not None:
            probe = tokenizer.encode("a")
            add_bos, source = bool(probe) and probe[0] == bos_id, "the tokenizer's default"
        else:
            add_bos, source = False, "no BOS token"
        if chat_template is None:
            chat_template = _chat_template_of(ckpt_dir, cfg)
            chat_template_source = "the checkpoint" if chat_template else None
        return cls(tokenizer, bos_id, add_bos and bos_id is not None, source, chat_template,
                   chat_template_source)

    def with_bos(self, ids: list[int]) -> list[int]:
        if self.add_bos and (not ids or ids[0] != self.bos_id):
            return [self.bos_id] + ids
        return ids

    def encode_text(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ParityError("this checkpoint has no tokenizer.json: send token ids")
        return self.with_bos(list(self.tokenizer(text, add_special_tokens=False).input_ids))

    def encode(self, prompt) -> list[int]:
        return self.encode_text(prompt) if isinstance(prompt, str) else self.with_bos(list(prompt))

    def render_chat(self, messages: list[dict]) -> str:
        if self.chat_template is None:
            raise ParityError("this checkpoint has no chat template (no chat_template in its "
                              "tokenizer_config.json, no chat_template.jinja); use /v1/completions, "
                              "or start the server with --chat-template FILE")
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                  tokenize=False, add_generation_prompt=True)
