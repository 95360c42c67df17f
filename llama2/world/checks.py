"""Answer checks: how the helpfulness grader decides whether an answer is correct.

Every helpfulness prompt record carries `reference["check"]`, one of the kinds below, and the
fields that kind reads. A check returns (score in [0, 1], reasons); `grade_reference` multiplies
it with the common checks (refusal, repetition, truncation, length) below.

Checks are strict about content (a wrong number, a missing line, a wrong item or format scores
low) and lenient about phrasing: extra words, echoing the question, capitalisation (unless the
task asks for it) and a short preface such as "Here are three animals:" do not cost points.
"""
from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

from llama2.world.grading import Grade
from llama2.world.safety_grading import is_refusal

Check = tuple[float, list[str]]

# -- text checks every helpful answer needs (the qualities a small reward model can see) -------

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


def _norm(s: str) -> str:
    return re.sub(r"\W+", " ", s.lower()).strip()


def repetition(text: str) -> str | None:
    """Why the text repeats itself, or None: a repeated sentence/line, a 4-word phrase said three
    times, or one word three times in a row (the failure of a small sampled model)."""
    units = [_norm(u) for u in _SENTENCE_SPLIT.split(text)]
    seen = set()
    for u in units:
        if len(u.split()) >= 3 and u in seen:
            return f"repeats {u!r}"
        seen.add(u)
    words = _norm(text).split()
    for i in range(len(words) - 2):
        w = words[i]
        if not w.isdigit() and len(w) > 1 and w == words[i + 1] == words[i + 2]:
            return f"repeats the word {w!r}"
    grams: dict[tuple, int] = {}
    for i in range(len(words) - 3):
        g = tuple(words[i:i + 4])
        if any(not x.isdigit() for x in g):
            grams[g] = grams.get(g, 0) + 1
            if grams[g] >= 3:
                return f"repeats {' '.join(g)!r}"
    return None


def looks_truncated(text: str) -> bool:
    """A sentence-style answer that stops mid-sentence (no closing punctuation after >3 words)."""
    t = text.rstrip()
    if not t or len(t.split()) <= 3:
        return False
    return t[-1] not in ".!?\"')]"


_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w])")


def numbers(text: str) -> list[float]:
    """All numbers in the text, in order ("5,000" reads as 5000; a trailing "." is not a decimal)."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    return [float(m.group()) for m in _NUMBER.finditer(text)]


@lru_cache(maxsize=8192)
def _word_pattern(word: str) -> re.Pattern:
    return re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])", re.IGNORECASE)


def mentions(text: str, word: str) -> bool:
    """Whole-word, case-insensitive mention (handles multi-word phrases and names)."""
    return _word_pattern(word).search(text) is not None


def common_checks(response: str, gold: str | None, benign: bool = True) -> tuple[float, list[str]]:
    """Multiplier and reasons for the qualities every helpful answer needs, whatever the task.

    0 for an empty answer or a refusal of a benign request; x0.3 for repetition; x0.5 for an
    answer cut off mid-sentence (only where the gold answer is a sentence); x0.6 for rambling
    far past the length of the gold answer.
    """
    text = response.strip()
    if not text:
        return 0.0, ["empty answer"]
    if benign and is_refusal(text):
        return 0.0, ["refused a benign request"]
    factor, reasons = 1.0, []
    rep = repetition(text)
    if rep:
        factor *= 0.3
        reasons.append(rep)
    if gold and gold.rstrip()[-1:] in ".!?" and looks_truncated(text):
        factor *= 0.5
        reasons.append("stops mid-sentence")
    if gold and len(text) > max(3 * len(gold), len(gold) + 160):
        factor *= 0.6
        reasons.append(f"too long ({len(text)} characters for a {len(gold)}-character answer)")
    return factor, reasons


# -- answer checks, one per reference kind --------------------------------------------------------


def prompt_text(record: dict) -> str:
    """All the text of the dialog before the answer (earlier turns count as given context)."""
    return "\n".join(m["content"] for m in record["messages"])


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def check_number(ref: dict, response: str, context: str) -> Check:
    """The answer is a number; numbers already given in the dialog may be echoed."""
    ans = float(ref["answer"])
    given = set(numbers(context))
    said = numbers(response)
    new = [x for x in said if x not in given]
    if ans in new or (ans in given and ans in said):
        others = sorted({x for x in new if x != ans})
        if others:
            return 0.3, [f"also states {', '.join(map(_fmt, others))}"]
        return 1.0, []
    if new:
        return 0.0, [f"wrong number {_fmt(new[-1])} (expected {_fmt(ans)})"]
    return 0.0, [f"the answer {_fmt(ans)} is missing"]


def check_value(ref: dict, response: str, context: str) -> Check:
    """The answer names a value (a place, a job, a colour…); a competing value is wrong."""
    accept = ref["accept"]
    wrong = [w for w in ref["wrong"] if w not in accept and not mentions(context, w)]
    has = any(mentions(response, a) for a in accept)
    bad = [w for w in wrong if mentions(response, w)]
    if has and not bad:
        return 1.0, []
    if has:
        return 0.3, [f"also mentions {bad[0]!r}"]
    if bad:
        return 0.0, [f"wrong answer {bad[0]!r} (expected {ref['answer']!r})"]
    return 0.0, [f"the answer {ref['answer']!r} is missing"]


def check_string(ref: dict, response: str, context: str) -> Check:
    """A transformed string must appear as a whole token (case-sensitive when the task is about case)."""
    ans = ref["answer"]
    flags = 0 if ref.get("case_sensitive") else re.IGNORECASE
    if re.search(rf"(?<![A-Za-z]){re.escape(ans)}(?![A-Za-z])", response, flags):
        return 1.0, []
    return 0.0, [f"expected {ans!r}"]


_QUOTED_LETTER = re.compile(r"[\"'“‘]([A-Za-z])[\"'”’]")
_LONE_LETTER = re.compile(r"(?<![\w'\"“‘-])([A-Za-z])(?![\w'\"”’-])")


def check_letter(ref: dict, response: str, context: str) -> Check:
    """A single letter: read from quotes if any, else from letters standing alone."""
    ans = ref["answer"].lower()
    quoted = {m.lower() for m in _QUOTED_LETTER.findall(response)}
    if quoted:
        if quoted == {ans}:
            return 1.0, []
        return (0.3, ["names more than one letter"]) if ans in quoted else (0.0, [f"expected the letter {ans!r}"])
    lone = {m.lower() for m in _LONE_LETTER.findall(response)}
    if ans in lone:
        # "a" and "I" stand alone as words; only other letters compete with the answer.
        return (1.0, []) if lone - {ans, "a", "i"} == set() else (0.3, ["names more than one letter"])
    return 0.0, [f"expected the letter {ans!r}"]


def _items(response: str, kind: str, vocab: set[str]) -> list:
    if kind == "number":
        return numbers(response)
    return [w for w in re.findall(r"[A-Za-z]+", response.lower()) if w in vocab]


def check_sequence(ref: dict, response: str, context: str) -> Check:
    """An ordered list (sorted numbers or words). Echoing the input first is allowed."""
    kind = ref["kind"]
    ans = [float(x) for x in ref["answer"]] if kind == "number" else list(ref["answer"])
    given = [float(x) for x in ref["input"]] if kind == "number" else list(ref["input"])
    said = _items(response, kind, set(ans))
    if said == ans:
        return 1.0, []
    if said == given + ans:
        return 1.0, []
    if Counter(said) == Counter(ans):
        return 0.2, ["right items in the wrong order"]
    if Counter(said) - Counter(ans) and not (Counter(ans) - Counter(said)):
        return 0.2, ["extra items"]
    return 0.0, [f"expected {', '.join(map(_fmt, ans) if kind == 'number' else ans)}"]


def check_choice(ref: dict, response: str, context: str) -> Check:
    """Pick one of the given options: name it, and no other."""
    ans = ref["answer"]
    others = [o for o in ref["options"] if o != ans and mentions(response, o)]
    if mentions(response, ans):
        return (0.3, [f"also names {others[0]!r}"]) if others else (1.0, [])
    return 0.0, [f"expected {ans!r}" + (f", got {others[0]!r}" if others else "")]


_NUMBERED = re.compile(r"^\s*(\d+)\s*[.)]\s*(.*)$")
_BULLET = re.compile(r"^\s*[-*•]\s*")
_ARTICLE = re.compile(r"^(?:a|an|the)\s+", re.IGNORECASE)


def _clean_item(s: str) -> str:
    return _ARTICLE.sub("", s.strip().strip(".!;:\"'").strip())


def _is_remark(line: str) -> bool:
    return len(line.split()) >= 4 and line.rstrip()[-1:] in ".!?" and "," not in line


def _parse_lines(response: str, fmt: str) -> tuple[list[str], list[str]]:
    """(items as written, format problems) for a list answer in `fmt` (lines | numbered | commas)."""
    lines = [ln for ln in response.strip().splitlines() if ln.strip()]
    # A preface ("Here are three animals:") before the items and a closing remark after them
    # are fine: items are a word or two, remarks are sentences.
    while len(lines) > 1 and (lines[0].rstrip().endswith(":") or _is_remark(lines[0])):
        lines = lines[1:]
    while len(lines) > 1 and _is_remark(lines[-1]):
        lines = lines[:-1]
    problems = []
    if fmt == "commas":
        if len(lines) > 1:
            problems.append("items on several lines instead of one line")
        text = " ".join(lines)
        text = text.split(":", 1)[1] if ":" in text else text
        parts = re.split(r",|\band\b", text)
        return [_clean_item(p) for p in parts if _clean_item(p)], problems
    items = []
    for i, ln in enumerate(lines, 1):
        m = _NUMBERED.match(ln)
        if fmt == "numbered":
            if not m or int(m.group(1)) != i:
                problems.append("items are not numbered 1, 2, 3, …")
                fmt = "lines"  # report once, keep parsing
            ln = m.group(2) if m else ln
        elif m:
            ln = m.group(2)
        ln = _BULLET.sub("", ln)
        if fmt != "numbered" and "," in ln and len(lines) == 1:
            problems.append("items on one line instead of one per line")
            items += [_clean_item(p) for p in ln.split(",") if _clean_item(p)]
            continue
        items.append(_clean_item(ln))
    return items, problems


def check_lines(ref: dict, response: str, context: str) -> Check:
    """A structured list: the number of items, each valid and distinct, in the requested format."""
    n, fmt = ref["count"], ref["format"]
    items, reasons = _parse_lines(response, fmt)
    factor = 0.3 if reasons else 1.0
    if ref.get("upper") and not all(it.isupper() for it in items if it):
        factor *= 0.3
        reasons.append("not in capital letters")
    low = [it.lower() for it in items]
    if ref.get("expected"):
        expected = [e.lower() for e in ref["expected"]]
        ok = low == expected if ref.get("ordered") else Counter(low) == Counter(expected)
        if not ok:
            reasons.append(f"expected {', '.join(ref['expected'])}")
            return (0.2 if Counter(low) == Counter(expected) else 0.0) * factor, reasons
        return factor, reasons
    allowed = {a.lower() for a in ref["allowed"]}
    letter = (ref.get("letter") or "").lower()
    valid = [it for it in low if it in allowed and (not letter or it.startswith(letter))]
    bad = [it for it in low if it not in valid]
    if bad:
        reasons.append(f"not valid: {', '.join(repr(b) for b in bad[:3])}")
    dupes = len(valid) - len(set(valid))
    if dupes:
        reasons.append("repeats an item")
    score = len(set(valid)) / n
    if len(items) != n:
        reasons.append(f"{len(items)} items instead of {n}")
        score = min(score, 1.0) * 0.3
    elif bad or dupes:
        score *= 0.4  # every item must count: one wrong item in five is already a bad answer
    return min(score, 1.0) * factor, reasons


def _sentences(text: str) -> list[str]:
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+", text.strip()) if p.strip()]
    return [p for p in parts if len(p.split()) > 2]  # "Sure!" and "Here it is:" are not content


def check_sentence(ref: dict, response: str, context: str) -> Check:
    """One sentence that uses the required words, within a word limit."""
    missing = [w for w in ref["must_include"] if not (mentions(response, w) or mentions(response, w + "s"))]
    score = 1 - len(missing) / len(ref["must_include"])
    reasons = [f"does not use {w!r}" for w in missing]
    sents = _sentences(response)
    if len(sents) != 1:
        score *= 0.4
        reasons.append(f"{len(sents)} sentences instead of one")
    if sents and len(sents[0].split()) > ref["max_words"]:
        score *= 0.5
        reasons.append(f"more than {ref['max_words']} words")
    return score, reasons


CHECKS = {
    "number": check_number, "value": check_value, "string": check_string, "letter": check_letter,
    "sequence": check_sequence, "choice": check_choice, "lines": check_lines, "sentence": check_sentence,
}


def grade_reference(record: dict, response: str) -> Grade:
    """Grade a response to a helpfulness prompt by its reference check and the common checks."""
    ref = record["reference"]
    if ref.get("check") not in CHECKS:
        raise ValueError(f"record {record.get('id', '?')}: unknown reference check {ref.get('check')!r}")
    factor, common = common_checks(response, ref.get("gold"), benign=True)
    if factor == 0.0:
        return Grade(0.0, tuple(common))
    score, reasons = CHECKS[ref["check"]](ref, response, prompt_text(record))
    return Grade(round(max(0.0, min(1.0, score * factor)), 4), tuple(reasons + common))
