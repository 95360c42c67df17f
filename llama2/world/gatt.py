"""Ghost Attention data: system instructions, their checkers and GAtt dialogs (Llama 2 §3.3).

An instruction is one or more constraints that must hold for a whole dialog:
- language: answer in (the world's) French, talk like a pirate, or answer in capital letters;
- figure: act as a public figure, whose name or signature word marks every answer;
- hobby: the assistant enjoys a hobby and mentions it in every answer.
Constraints are combined at random and, half the time, written in the short form of §3.3
("Always act as Napoleon from now on" -> "Figure: Napoleon"); both forms parse to the same
constraints. `check(instruction, response)` verifies any later turn. `comply` rewrites an answer
so that it holds, which is how gold GAtt dialogs are made from the world's plain answers.

GAtt itself (§3.3): sample the answers with the instruction concatenated to every user message
(`sampling_messages`), then train on the dialog with the instruction only in the first turn and
the loss on the last assistant turn only (`training_dialogs`).
"""
from __future__ import annotations

import random
import re
from typing import NamedTuple, Sequence, Union

from llama2.world.lexicon import is_french, to_french


class Constraint(NamedTuple):
    kind: str  # "language" | "figure" | "hobby"
    value: str  # "french" | "pirate" | "capitals"; "napoleon", ...; "tennis", ...


# value -> (full-form templates, short-form label)
LANGUAGES = {
    "french": (("Always answer in French.", "Answer in French from now on.", "Please reply only in French."),
               "French"),
    "pirate": (("Always talk like a pirate.", "Speak like a pirate from now on.", "Answer like a pirate."),
               "pirate"),
    "capitals": (("Always answer in capital letters.", "Write every answer in capital letters.",
                  "Reply only in capital letters."), "capitals"),
}
# figure -> (display name, words that mark the persona in an answer, openers of its answers)
FIGURES = {
    "napoleon": ("Napoleon", ("napoleon", "emperor"), ("Napoleon here.", "As Emperor Napoleon, I say this.")),
    "cleopatra": ("Cleopatra", ("cleopatra", "nile"), ("Cleopatra of the Nile speaks.", "Cleopatra here.")),
    "shakespeare": ("Shakespeare", ("shakespeare", "verily"), ("Verily, Shakespeare answers.",
                                                               "Shakespeare here, verily.")),
    "einstein": ("Einstein", ("einstein", "relativity"), ("Einstein here.", "As Einstein, I think of relativity.")),
}
_FIGURE_TEMPLATES = ("Always act as {name} from now on.", "Act as {name}.", "You are {name}. Stay in character.")
HOBBIES = ("tennis", "chess", "gardening", "painting", "fishing", "knitting")
_HOBBY_TEMPLATES = ("You enjoy {h}.", "Your hobby is {h}.", "You love {h} and like to mention it.")
_HOBBY_SIGNOFFS = ("I love {h}!", "By the way, I enjoy {h}.", "Now back to my {h}.")
KINDS = ("language", "figure", "hobby")
_SHORT_LABEL = {"language": "Language", "figure": "Figure", "hobby": "Hobby"}

Instruction = Union[str, Sequence[Constraint]]


class InstructionError(ValueError):
    """An instruction text with no constraint the world knows."""


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def render(constraints: Sequence[Constraint], rng: random.Random, short: bool = False) -> str:
    """The instruction text: full sentences, or the short "Figure: Napoleon. Hobby: tennis" form."""
    parts = []
    for c in constraints:
        if c.kind == "language":
            templates, label = LANGUAGES[c.value]
            parts.append(f"Language: {label}" if short else rng.choice(templates))
        elif c.kind == "figure":
            name = FIGURES[c.value][0]
            parts.append(f"Figure: {name}" if short else rng.choice(_FIGURE_TEMPLATES).format(name=name))
        else:
            parts.append(f"Hobby: {c.value}" if short else rng.choice(_HOBBY_TEMPLATES).format(h=c.value))
    return ". ".join(parts) if short else " ".join(parts)


def parse(instruction: Instruction) -> tuple[Constraint, ...]:
    """The constraints of an instruction in either form (or already parsed), in KINDS order."""
    if not isinstance(instruction, str):
        return tuple(sorted(instruction, key=lambda c: KINDS.index(c.kind)))
    words = _words(instruction)
    found = []
    for value in LANGUAGES:
        # "capitals" also reads as "capital letters"; the others are named by their value.
        if value in words or (value == "capitals" and "capital" in words):
            found.append(Constraint("language", value))
    found += [Constraint("figure", f) for f in FIGURES if f in words]
    found += [Constraint("hobby", h) for h in HOBBIES if h in words]
    if not found:
        raise InstructionError(f"no known constraint in instruction {instruction!r}")
    return tuple(found)


def random_instruction(rng: random.Random, n: int | None = None,
                       short: bool | None = None) -> tuple[str, tuple[Constraint, ...]]:
    """Random constraints of 1-3 distinct kinds, rendered short half the time (§3.3)."""
    n = n or rng.choice((1, 1, 2, 2, 3))
    kinds = sorted(rng.sample(KINDS, n), key=KINDS.index)
    pick = {"language": lambda: rng.choice(sorted(LANGUAGES)), "figure": lambda: rng.choice(sorted(FIGURES)),
            "hobby": lambda: rng.choice(HOBBIES)}
    constraints = tuple(Constraint(k, pick[k]()) for k in kinds)
    short = rng.random() < 0.5 if short is None else short
    return render(constraints, rng, short), constraints


# -- checking and complying ---------------------------------------------------------------------

def check_constraint(c: Constraint, response: str) -> bool:
    """Does `response` keep constraint `c`?"""
    words = _words(response)
    if c.kind == "language":
        if c.value == "french":
            return is_french(response)
        if c.value == "pirate":
            return "arr" in words and bool(words & {"matey", "aye", "ye"})
        letters = [ch for ch in response if ch.isalpha()]
        return bool(letters) and sum(ch.isupper() for ch in letters) >= 0.95 * len(letters)
    if c.kind == "figure":
        return bool(words & set(FIGURES[c.value][1]))
    return c.value in words


def check(instruction: Instruction, response: str) -> bool:
    """Does `response` keep every constraint of `instruction` (either form)?"""
    return all(check_constraint(c, response) for c in parse(instruction))


def comply(instruction: Instruction, response: str, rng: random.Random) -> str:
    """Rewrite a plain answer so that it keeps the instruction: persona opener, hobby sign-off,
    then the language (applied last, so it covers the additions too)."""
    constraints = parse(instruction)
    text = response.strip()
    for c in constraints:
        if c.kind == "figure":
            text = f"{rng.choice(FIGURES[c.value][2])} {text}"
        elif c.kind == "hobby":
            text = f"{text} {rng.choice(_HOBBY_SIGNOFFS).format(h=c.value)}"
    for c in constraints:
        if c.kind == "language":
            if c.value == "french":
                text = to_french(text)
            elif c.value == "pirate":
                text = f"Arr! {text} Aye, matey."
            else:
                text = text.upper() if any(ch.isalpha() for ch in text) else f"ANSWER: {text}"
    return text


def turn_compliance(instruction: Instruction, messages: Sequence[dict]) -> list[bool]:
    """For each assistant turn of a dialog, does it keep the instruction? (GAtt evaluation, §3.3)"""
    return [check(instruction, m["content"]) for m in messages if m["role"] == "assistant"]


# -- dialogs ------------------------------------------------------------------------------------

def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def gold_dialog(rng: random.Random, turns: Sequence[tuple[str, str]], instruction: Instruction | None = None,
                pid: str = "gatt", split: str = "train", source: str = "world:gatt") -> dict:
    """An SFT dialog whose every answer keeps the instruction: the system message states it once,
    and the world's plain (user, answer) turns are rewritten to comply."""
    if instruction is None:
        instruction, _ = random_instruction(rng)
    messages = [{"role": "system", "content": instruction if isinstance(instruction, str)
                 else render(instruction, rng)}]
    for question, answer in turns:
        messages += [_user(question), _assistant(comply(instruction, answer, rng))]
    return {"id": pid, "messages": messages, "source": source, "split": split, "task": "gatt"}


def sampling_messages(instruction: str, users: Sequence[str], answers: Sequence[str]) -> list[dict]:
    """The dialog to sample turn len(answers)+1 from: the instruction concatenated to every user
    message (§3.3), earlier answers as sampled."""
    if len(answers) >= len(users):
        raise ValueError(f"{len(answers)} answers for {len(users)} user turns: nothing left to sample")
    messages = []
    for i, question in enumerate(users[: len(answers) + 1]):
        messages.append(_user(f"{instruction}\n{question}"))
        if i < len(answers):
            messages.append(_assistant(answers[i]))
    return messages


def training_dialogs(instruction: str, users: Sequence[str], answers: Sequence[str], pid: str = "gatt",
                     split: str = "train", source: str = "world:gatt", every_turn: bool = True) -> list[dict]:
    """GAtt training samples (§3.3): the instruction only as the first (system) message, and
    `meta.train_last_turn_only` so the loss is zero on every earlier turn, earlier answers
    included (the SFT format admits no other new field). With `every_turn`, one sample per
    prefix, so each sampled answer is learned once."""
    if len(users) != len(answers):
        raise ValueError(f"{len(users)} user turns but {len(answers)} answers")
    ends = range(1, len(users) + 1) if every_turn else (len(users),)
    out = []
    for end in ends:
        messages = [{"role": "system", "content": instruction}]
        for question, answer in zip(users[:end], answers[:end]):
            messages += [_user(question), _assistant(answer)]
        out.append({"id": f"{pid}-t{end}", "messages": messages, "source": source, "split": split,
                    "task": "gatt", "meta": {"train_last_turn_only": True}})
    return out
