"""Jinja chat templates, rendered the way transformers' `apply_chat_template` renders them.

A template belongs to a tokenizer (tokenizer_config.json or a GGUF's metadata), and it tells two
layers something: the chat format renders dialogs with it (`llama2.chat_format`), and the
tokenizer learns from it which special token ends an assistant turn, its stop token besides EOS
(`end_of_turn`). Both sit on this module, so neither needs the other.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A template that does not compile, fails, or refuses the dialog (`raise_exception`)."""


def _raise(message: str):
    raise ChatTemplateError(f"the chat template refused the dialog: {message}")


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    # A template comes with a downloaded model: run it sandboxed, with the options and helpers
    # transformers gives templates (they are written against those).
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"invalid chat template: {e}") from None


def render(template: str, messages: list[dict], add_generation_prompt: bool, variables: dict) -> str:
    """Render a Jinja chat template like transformers' apply_chat_template(tokenize=False)."""
    compiled = _compile(template)
    try:
        return compiled.render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables
        )
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from None


def end_of_turn(template: str, special_tokens: list[str], variables: dict) -> str | None:
    """The special token the template writes right after an assistant answer, if any.

    Found by rendering a probe dialog rather than by a list of names, so any template works:
    ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>, Llama 2's </s>.
    """
    marker = "llama2-answer-probe"
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}]
    try:
        text = render(template, dialog, False, variables)
    except Exception:  # a template that refuses this dialog says nothing about its end token
        return None
    if marker not in text:
        return None
    after = text[text.rindex(marker) + len(marker) :].lstrip()
    for name in sorted(special_tokens, key=len, reverse=True):
        if after.startswith(name):
            return name
    return None
