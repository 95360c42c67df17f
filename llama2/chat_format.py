"""The chat format: dialogs to token ids, for generation and for training (Llama 2 §3, §5.3).

Llama 2's format is the one of Meta's reference code: the system prompt is wrapped in
`<<SYS>>`/`<</SYS>>` and merged into the first user message; every completed exchange is
`<s>[INST] {user} [/INST] {answer} </s>`, and the open one `<s>[INST] {user} [/INST]`.
A model imported with its own Jinja chat template (SmolLM2's ChatML, ...) is rendered with that
template instead, the way transformers' `apply_chat_template` does.

Training needs more than ids: which tokens are the assistant's (the SFT loss is computed on
answers only, §3.1; Ghost Attention only on the last answer, §3.3). The ids of a training dialog
are built so that its prompt part is exactly what `prompt_ids` gives for that prefix: the model
learns to continue the very tokens it will see at inference.
"""
from __future__ import annotations

from typing import Literal, TypedDict

from llama2 import chat_template
from llama2.chat_template import ChatTemplateError
from llama2.tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
# The chat format's tags: content containing them could forge turns.
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = list[Message]


class ChatFormatError(ValueError):
    """A dialog that cannot be formatted; the message says which message and what is wrong."""


def render_template(template: str, messages: list[dict], add_generation_prompt: bool, variables: dict) -> str:
    """Render a Jinja chat template like transformers' apply_chat_template(tokenize=False)."""
    try:
        return chat_template.render(template, messages, add_generation_prompt, variables)
    except ChatTemplateError as e:
        raise ChatFormatError(str(e)) from None


# -- the format -----------------------------------------------------------------------------------
class ChatFormat:
    """Dialogs -> token ids in Llama 2's format (§3) or the tokenizer's own chat template.

    style: "llama2" (Meta's format), "template" (the tokenizer's Jinja template) or "auto"
    (the template if the tokenizer has one, else Llama 2's).
    """

    def __init__(self, tokenizer: Tokenizer, style: str = "auto"):
        if style not in ("auto", "llama2", "template"):
            raise ValueError(f"chat style must be auto, llama2 or template, got {style!r}")
        if style == "template" and not tokenizer.chat_template:
            raise ChatFormatError("this tokenizer has no chat template; use the llama2 format")
        self.tokenizer = tokenizer
        self.style = "template" if tokenizer.chat_template and style != "llama2" else "llama2"
        if self.style == "llama2":
            if tokenizer.bos_id is None or tokenizer.eos_id is None:
                raise ChatFormatError("the Llama 2 chat format needs a tokenizer with BOS and EOS tokens")
            self.forbidden = list(SPECIAL_TAGS)
            self.stop_ids = {tokenizer.eos_id}
            self.stop_strings: list[str] = []
        else:
            # Every special-token string would become a control token when the rendered
            # template is tokenized, so none may appear inside a message; nor may Llama 2's tags
            # when the template writes them itself.
            tags = [t for t in SPECIAL_TAGS if t in tokenizer.chat_template]
            self.forbidden = sorted(set(tokenizer.special_tokens) | set(tags), key=len, reverse=True)
            self.stop_ids = set(tokenizer.stop_ids)
            self.stop_strings = [tokenizer.id_to_piece(i) for i in sorted(self.stop_ids)]
        # Whether encoding a piece of text on its own adds a leading space marker (SentencePiece's
        # dummy prefix); such a tokenizer cannot encode a continuation separately.
        first = tokenizer.encode("a")[:1]
        self._prefix_space = bool(first) and tokenizer.id_to_piece(first[0]).startswith(("▁", "Ġ"))

    # -- public -----------------------------------------------------------------------------------
    def prompt_ids(self, dialog: Dialog) -> list[int]:
        """Ids of a dialog that ends with a user message, ready for the model to answer."""
        self._check(dialog, last="user")
        return [i for ids, _ in self._segments(dialog) for i in ids]

    def training_ids(self, dialog: Dialog, last_turn_only: bool = False) -> tuple[list[int], list[bool]]:
        """Ids of a dialog that ends with an answer, and a mask that is True on answer tokens.

        The mask covers each answer and its closing EOS / end-of-turn token, so the model learns
        to stop (§3.1: loss on answer tokens only). `last_turn_only` keeps only the final answer
        (Ghost Attention and last-turn SFT, §3.3).
        """
        self._check(dialog, last="assistant")
        segments = self._segments(dialog)
        answers = [k for k, (_, is_answer) in enumerate(segments) if is_answer]
        ids: list[int] = []
        mask: list[bool] = []
        for k, (seg, is_answer) in enumerate(segments):
            ids += seg
            learn = is_answer and (not last_turn_only or k == answers[-1])
            mask += self._answer_mask(seg) if learn else [False] * len(seg)
        return ids, mask

    def render(self, dialog: Dialog, add_generation_prompt: bool = True) -> str:
        """The dialog as text (special tokens written out), e.g. to inspect or print it."""
        self._check(dialog, last=None)
        if self.style == "template":
            return self._render(dialog, add_generation_prompt)
        bos, eos = self.tokenizer.id_to_piece(self.tokenizer.bos_id), self.tokenizer.id_to_piece(self.tokenizer.eos_id)
        return "".join(
            f"{bos}{prompt}{answer}{eos}" if answer is not None else f"{bos}{prompt}"
            for prompt, answer in _llama2_turns(dialog)
        )

    # -- validation -------------------------------------------------------------------------------
    def _check(self, dialog, last: str | None) -> None:
        if not isinstance(dialog, list) or not dialog:
            raise ChatFormatError("a dialog must be a non-empty list of {role, content} messages")
        offset = 0
        for i, m in enumerate(dialog):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ChatFormatError(f"message {i}: expected an object with 'role' and 'content'")
            role, content = m["role"], m["content"]
            if role not in ROLES:
                raise ChatFormatError(f"message {i}: unknown role {role!r} (expected system, user or assistant)")
            if not isinstance(content, str):
                raise ChatFormatError(f"message {i}: content must be a string, got {type(content).__name__}")
            for tag in self.forbidden:
                if tag in content:
                    raise ChatFormatError(
                        f"message {i} ({role}): contains the special tag {tag!r}; refused so that "
                        "turns cannot be forged"
                    )
            if role == "system":
                if i > 0:
                    raise ChatFormatError(f"message {i}: a system message may only come first")
                offset = 1
                continue
            expected = "a user" if (i - offset) % 2 == 0 else "an assistant"
            if role != expected.split()[1]:
                raise ChatFormatError(
                    f"message {i}: expected {expected} message, got {role} "
                    "(after an optional system message, roles alternate user/assistant)"
                )
        if len(dialog) == offset:
            raise ChatFormatError("message 0: a system message must be followed by a user message")
        final = dialog[-1]["role"]
        if last == "user" and final != "user":
            raise ChatFormatError(
                f"message {len(dialog) - 1}: a prompt must end with a user message, got {final}"
            )
        if last == "assistant" and final != "assistant":
            raise ChatFormatError(
                f"message {len(dialog) - 1}: a training dialog must end with an assistant answer, got {final}"
            )

    # -- token ids --------------------------------------------------------------------------------
    def _segments(self, dialog: Dialog) -> list[tuple[list[int], bool]]:
        """The dialog's ids as (ids, is_answer) segments, alternating prompt and answer."""
        if self.style == "llama2":
            return self._llama2_segments(dialog)
        return self._template_segments(dialog)

    def _llama2_segments(self, dialog):
        # Meta's reference: each exchange is encoded as one string with BOS and EOS, the open
        # user turn without EOS. The answer starts where the prompt's tokens end.
        encode = self.tokenizer.encode
        out = []
        for prompt, answer in _llama2_turns(dialog):
            prompt_ids = encode(prompt, bos=True)
            if answer is None:
                out.append((prompt_ids, False))
                continue
            ids = encode(prompt + answer, bos=True, eos=True)
            if ids[: len(prompt_ids)] != prompt_ids:
                raise ChatFormatError(
                    f"this tokenizer merges {E_INST!r} with the answer that follows, so a prompt would "
                    "tokenize differently at inference than in training"
                )
            out += [(prompt_ids, False), (ids[len(prompt_ids) :], True)]
        return out

    def _template_segments(self, dialog):
        # Render every prefix that ends at an answer boundary; with an incremental template
        # (ChatML and nearly all others) each rendering extends the previous one.
        texts: list[tuple[str, bool]] = []  # (text so far, the piece just added is an answer)
        for i, m in enumerate(dialog):
            if m["role"] == "assistant":
                texts.append((self._render(dialog[:i], True), False))
                texts.append((self._render(dialog[: i + 1], False), True))
        if dialog[-1]["role"] == "user":
            texts.append((self._render(dialog, True), False))
        for (a, _), (b, _) in zip(texts, texts[1:]):
            if not b.startswith(a):
                raise ChatFormatError(
                    "the chat template renders earlier turns differently once later turns are "
                    "added, so a prompt would tokenize differently at inference than in training"
                )
        # Tokenize the whole text so far at every boundary and keep what it adds: the result is
        # whole-text tokenization (what transformers gives) whenever no token crosses a boundary.
        encode = self.tokenizer.encode_special
        out: list[tuple[list[int], bool]] = []
        ids: list[int] = []
        done = 0
        for text, is_answer in texts:
            whole = encode(text)
            if whole[: len(ids)] == ids:
                new = whole[len(ids) :]
            elif not self._prefix_space:
                # A token would span the boundary (an answer that starts with a newline after
                # "assistant\n"): encode the new piece on its own so the prompt stays as it is.
                new = encode(text[done:])
            else:
                raise ChatFormatError(
                    "this tokenizer merges the prompt with the answer that follows, so a prompt "
                    "would tokenize differently at inference than in training"
                )
            out.append((new, is_answer))
            ids += new
            done = len(text)
        return out

    def _answer_mask(self, seg: list[int]) -> list[bool]:
        """True up to and including the first stop token; template glue after it (a newline the
        model never generates) stays False."""
        for k, i in enumerate(seg):
            if i in self.stop_ids:
                return [True] * (k + 1) + [False] * (len(seg) - k - 1)
        return [True] * len(seg)

    def _render(self, dialog, add_generation_prompt: bool) -> str:
        return render_template(
            self.tokenizer.chat_template, dialog, add_generation_prompt, self.tokenizer.template_variables()
        )


def _llama2_turns(dialog: Dialog) -> list[tuple[str, str | None]]:
    """(prompt, answer) texts of Meta's format; the answer is None for the open user turn."""
    if dialog[0]["role"] == "system":
        first = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        dialog = [{"role": "user", "content": first}] + dialog[2:]
    turns = []
    for k in range(0, len(dialog), 2):
        prompt = f"{B_INST} {dialog[k]['content'].strip()} {E_INST}"
        answer = f" {dialog[k + 1]['content'].strip()} " if k + 1 < len(dialog) else None
        turns.append((prompt, answer))
    return turns
