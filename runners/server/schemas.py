"""Request bodies of the OpenAI-compatible endpoints, as pydantic models.

Unknown fields are accepted and ignored (lm-eval passes a task's leftover
``gen_kwargs`` through). Fields that would change what is generated and
that the engine cannot honour are accepted only at the value that means
"off", so a client never silently gets something other than it asked for.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from runners.engine.serving import MAX_LOGPROBS, SEED_RANGE, Sampling

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_N = 16

# field -> the values that mean "off"
OFF_VALUES = {
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "logit_bias": (None, {}),
    "top_k": (None, -1, 0),
    "min_tokens": (None, 0),
}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: StrictInt | None = Field(None, ge=1, le=MAX_N)
    best_of: StrictInt | None = None
    stream: StrictBool = False
    stream_options: dict | None = None
    ignore_eos: StrictBool = False   # vLLM's extension: fixed-length outputs for benchmarks
    user: StrictStr | None = None

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _number(cls, v):
        if v is not None and not _is_number(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and any(s == "" for s in v) or v == "":
            raise ValueError("stop sequences must not be empty strings")
        return v

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for the first field set to something the engine cannot do."""
        extra = self.model_extra or {}
        for name, allowed in OFF_VALUES.items():
            if name in extra and not any(_same(extra[name], a) for a in allowed):
                return name, (f"{name}={extra[name]!r} is not supported (accepted: "
                              f"{', '.join(repr(a) for a in allowed)})")
        if self.best_of is not None and self.best_of != (self.n or 1):
            return "best_of", "best_of other than n is not supported"
        return None

    def sampling(self, max_tokens: int | None, **more) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Sampling(max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
                        temperature=1.0 if self.temperature is None else float(self.temperature),
                        top_p=1.0 if self.top_p is None else float(self.top_p), stop=stop,
                        seed=self.seed, ignore_eos=self.ignore_eos, n=self.n or 1, **more)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


def _same(value, allowed) -> bool:
    if allowed is None or isinstance(allowed, bool):
        return value is allowed
    if isinstance(allowed, (int, float)):
        return _is_number(value) and value == allowed
    return type(value) is type(allowed) and value == allowed


class CompletionRequest(_Common):
    prompt: Any = Field(None, validate_default=True)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    return_token_ids: StrictBool = False   # vLLM's extension: each choice carries prompt_token_ids

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, p):
        if p is None:
            raise ValueError("prompt is required")
        if isinstance(p, str):
            if not p:
                raise ValueError("prompt is an empty string")
            return [p]
        if isinstance(p, list) and p:
            if all(isinstance(x, str) for x in p):
                if any(not x for x in p):
                    raise ValueError("prompt holds an empty string")
                return list(p)
            if all(_is_int(x) for x in p):
                return [list(p)]
            if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p):
                return [list(x) for x in p]
        if isinstance(p, list) and not p:
            raise ValueError("prompt is an empty list")
        raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of "
                         "token-id lists")

    def to_sampling(self) -> Sampling:
        return self.sampling(self.max_tokens, logprobs=self.logprobs, echo=self.echo)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: StrictStr
    content: StrictStr | list[dict] | None = None

    def plain(self) -> dict:
        content = self.content
        if isinstance(content, list):  # OpenAI's content parts: text only
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        return {"role": self.role, "content": content or ""}


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def to_sampling(self) -> Sampling:
        top = self.top_logprobs if self.logprobs else None
        if self.logprobs and top is None:
            top = 0
        return self.sampling(self.max_completion_tokens or self.max_tokens, logprobs=top)
