"""Answer checks: how the helpfulness grader decides whether an answer is correct.

Every helpfulness prompt record carries `reference["check"]`, one of the kinds below, and the
fields that kind reads. A check returns (score in [0, 1], reasons); `grade_reference` multiplies
it with the common checks (refusal, repetition, truncation, length) below.

Checks are strict about content (a wrong number, a missing line, a wrong item or format scores
low) and lenient about phrasing: extra words, echoing the question, capitalisation (unless the
task asks for it) and a short preface such as "Here are three animals:" do not cost points; nor
do numbers in words, unit abbreviations, plurals or a missing full stop. What an answer denies
("not 67") it does not state; a number with a unit must be a true quantity; a fact answer must be
about the person or place asked about, and an answer about a quoted word about that word (see
tests/test_grader_audit.py for the audited cases).
"""
from __future__ import annotations

import itertools
import re
from collections import Counter
from functools import lru_cache

from llama2.world.grading import Grade
from llama2.world.safety_grading import is_refusal
from llama2.world.universe import (ANIMALS, COLOURS, EXTRA_WORDS, FEMALE_NAMES, FOODS, JOBS, MALE_NAMES, NEUTRAL_NAMES,
                                   PLACE_PREFIXES, PLACE_SUFFIXES, THINGS, UNITS)

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


# Words no finished sentence ends on: a cut-off answer stops on one of them ("Tom lives in",
# "I saw a cat with a"). A finished answer that only lacks its full stop ("23 + 45 = 68") is whole.
_DANGLING = frozenset(
    ["a", "an", "the", "of", "in", "into", "on", "onto", "to", "with", "at", "and", "or", "but", "nor", "by", "for", "from", "as", "is", "are", "was", "were", "be", "been", "its", "his", "her", "their", "my", "your", "our", "this", "that", "these", "those", "than", "then", "so", "if", "near", "about", "like", "makes", "equals", "gives", "has", "have", "had", "which", "who", "whose", "where", "when", "because", "while", "very"])


def looks_truncated(text: str, answer: str | None = None) -> bool:
    """A sentence-style answer that stops mid-sentence: after more than 3 words it ends without
    closing punctuation on a word no sentence ends on or on a connecting symbol ("=", ",", "+").
    An answer that ends with `answer` is whole."""
    t = text.rstrip()
    if not t or len(t.split()) <= 3 or t[-1] in ".!?\"')]”’":
        return False
    if answer and re.search(rf"(?<![\w-]){re.escape(answer)}$", t, re.IGNORECASE):
        return False
    if t[-1] in "=,:;+-*/(&":
        return True
    return re.sub(r"^\W+|\W+$", "", t.split()[-1]).lower() in _DANGLING


_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w])")


def numbers(text: str) -> list[float]:
    """All numbers in the text, in order ("5,000" reads as 5000; a trailing "." is not a decimal)."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    return [float(m.group()) for m in _NUMBER.finditer(text)]


_SMALL_WORDS = {w: i for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"])}
_TENS_WORDS = {w: 10 * i for i, w in enumerate(["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"], 2)}
_SCALE_WORDS = {"hundred": 100, "thousand": 1000}
_TOKEN = re.compile(r"[A-Za-z]+|\d{1,3}(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?")
_COUNT_ADVERB = re.compile(r"\b(?:appears?|occurs?|shows? up|comes? up|is there|are there|used)\s+(?:only\s+|just\s+)?"
                           r"(once|twice|thrice)\b", re.IGNORECASE)


def number_spans(text: str) -> list[tuple[float, int, int, bool]]:
    """(value, start, end, is_word) of every number in the text, in order: digits as `numbers`
    reads them, and numbers written in words ("two", "twenty-five", "one hundred and five", and
    "once"/"twice" after "appears")."""
    out = []
    text_l = text.lower()
    toks = [(m.group().lower(), m.start(), m.end()) for m in _TOKEN.finditer(text_l)]
    i = 0
    while i < len(toks):
        w, s, e = toks[i]
        if w[0].isdigit():
            before, after = text[s - 1:s], text[e:e + 1]
            glued_unit = after.isalpha() and _UNIT_AT.match(text, e) is not None  # "200cm"
            if not (before.isalpha() or before == "." or (after.isalpha() and not glued_unit) or after == "_"):
                neg = before == "-" and (s < 2 or not text[s - 2].isalnum())
                val = float(w.replace(",", ""))
                out.append((-val if neg else val, s - neg, e, False))
            i += 1
            continue
        if w not in _SMALL_WORDS and w not in _TENS_WORDS:
            i += 1
            continue
        total, current, last_kind, j, end = 0, 0, None, i, e
        while j < len(toks):
            w, s2, e2 = toks[j]
            gap = text_l[end:s2] if j > i else ""
            if j > i and not re.fullmatch(r"[\s-]*", gap):
                break
            if w == "and" and last_kind == "scale" and j + 1 < len(toks) and \
                    (toks[j + 1][0] in _SMALL_WORDS or toks[j + 1][0] in _TENS_WORDS):
                end, j = e2, j + 1
                continue
            if w in _SMALL_WORDS and last_kind in (None, "tens", "scale") and not (last_kind == "tens" and _SMALL_WORDS[w] >= 10):
                current += _SMALL_WORDS[w]
                last_kind = "small"
            elif w in _TENS_WORDS and last_kind in (None, "scale"):
                current += _TENS_WORDS[w]
                last_kind = "tens"
            elif w in _SCALE_WORDS and last_kind in ("small", "tens") and not (w == "hundred" and current >= 100):
                if w == "thousand":
                    total, current = (total + current) * 1000, 0
                else:
                    current *= 100
                last_kind = "scale"
            else:
                break
            end, j = e2, j + 1
        out.append((float(total + current), s, end, True))
        i = j
    for m in _COUNT_ADVERB.finditer(text):
        out.append((float({"once": 1, "twice": 2, "thrice": 3}[m.group(1).lower()]), m.start(1), m.end(1), True))
    return sorted(out, key=lambda x: x[1])


# -- negation: "not 67", "isn't swimming", "neither a village nor a city" ---------------------------

_NEGATOR = re.compile(r"\b(?:not|never|neither|nor|no longer|cannot)\b|n't\b", re.IGNORECASE)
_SCOPE_END = re.compile(r"[,.;:!?\n()]|\b(?:but|instead|rather|it is|it's|so|because|while)\b", re.IGNORECASE)


_CLAUSE_START = re.compile(r"[,.;:!?\n(]|\bbut\b", re.IGNORECASE)


def negated_spans(text: str, targets: re.Pattern | None = None) -> list[tuple[int, int]]:
    """Spans of the text a negation governs: from "not"/"n't"/"never"/"nor" to the end of its
    clause (punctuation, "but", "instead", "it is" …). What they name is denied, not stated.
    Where nothing that `targets` matches follows the negation ("98 is not the largest", "sailing
    isn't his hobby"), it denies what comes before it in its clause."""
    text = text.replace("\u2019", "'")
    spans = []
    for m in _NEGATOR.finditer(text):
        end = _SCOPE_END.search(text, m.end())
        start, stop = m.start(), end.start() if end else len(text)
        if targets is not None and not any(m.end() <= t.start() < stop for t in targets.finditer(text)):
            starts = [c.end() for c in _CLAUSE_START.finditer(text, 0, m.start())]
            start = starts[-1] if starts else 0
        spans.append((start, stop))
    return spans


@lru_cache(maxsize=4096)
def _any_word(words: tuple[str, ...]) -> re.Pattern:
    """Any of the words (or their plurals), whole-word and case-insensitive."""
    alts = "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True)) or "(?!)"
    return re.compile(rf"(?<![\w-])(?:{alts})(?:s|es)?(?![\w-])", re.IGNORECASE)


_ANY_NUMBER = re.compile(r"\d|\b(?:zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|\w+teen|"
                         r"twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|hundred|thousand|once|twice)\b",
                         re.IGNORECASE)
_ANY_LETTER = re.compile(r"(?<![\w'\"“‘-])[A-Za-z](?![\w'\"”’-])|[\"'“‘][A-Za-z][\"'”’]")


def _negated(spans: list[tuple[int, int]], pos: int) -> bool:
    return any(a <= pos < b for a, b in spans)


@lru_cache(maxsize=8192)
def _word_forms_pattern(word: str) -> re.Pattern:
    """The word or its plural ("cat"/"cats", "box"/"boxes"), whole-word and case-insensitive."""
    return re.compile(rf"(?<![\w-]){re.escape(word)}(?:s|es)?(?![\w-])", re.IGNORECASE)


def stated(text: str, word: str, spans: list[tuple[int, int]] | None = None, plural: bool = False) -> bool:
    """`word` is mentioned outside any negation (plural forms count where `plural`)."""
    spans = negated_spans(text) if spans is None else spans
    pat = _word_forms_pattern(word) if plural else _word_pattern(word)
    return any(not _negated(spans, m.start()) for m in pat.finditer(text))


@lru_cache(maxsize=8192)
def _word_pattern(word: str) -> re.Pattern:
    return re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])", re.IGNORECASE)


def mentions(text: str, word: str) -> bool:
    """Whole-word, case-insensitive mention (handles multi-word phrases and names)."""
    return _word_pattern(word).search(text) is not None


def common_checks(response: str, gold: str | None, benign: bool = True,
                  answer: str | None = None) -> tuple[float, list[str]]:
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
    if gold and gold.rstrip()[-1:] in ".!?" and looks_truncated(text, answer):
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


# -- who an answer is about: "Tom is 60" does not answer "How old is Pete?" ------------------------

PERSON_NAMES = frozenset(FEMALE_NAMES + MALE_NAMES + NEUTRAL_NAMES)
PLACE_NAMES = frozenset(p + s for p in PLACE_PREFIXES for s in PLACE_SUFFIXES)
_CAPITALISED = re.compile(r"\b[A-Z][a-z]+\b")


def other_subjects(ref: dict, response: str, context: str) -> list[str]:
    """People or places the response names that the dialog does not (nor the answer options), on a
    question about a person or a place: the answer is about someone else."""
    keys = ref.get("instances") or []
    if not keys or not str(keys[-1]).startswith(("person:", "place:")):
        return []
    values = {w.lower() for w in list(ref.get("accept", [])) + list(ref.get("wrong", []))}
    out = []
    for m in _CAPITALISED.finditer(response):
        w = m.group()
        if (w in PERSON_NAMES or w in PLACE_NAMES) and w.lower() not in values and w not in out \
                and not re.search(rf"\b{w}\b", context):
            out.append(w)
    return out


def _subject_penalty(ref: dict, response: str, context: str) -> Check | None:
    others = other_subjects(ref, response, context)
    if not others:
        return None
    subject = str(ref["instances"][-1]).split(":")[1]
    if mentions(response, subject) or mentions(response, subject.split()[0]):
        return 0.3, [f"also speaks of {others[0]}"]
    return 0.0, [f"answers about {others[0]}, not {subject}"]


# -- which word an answer is about: "The word "garden" has 6 letters." does not answer about "dancer"

_QUOTED_WORD = re.compile(r"[\"“]([A-Za-z][A-Za-z-]*[A-Za-z])[\"”]")
_QUOTED_CHAR = re.compile(r"[\"'“‘]([A-Za-z])[\"'”’]")
_THE_WORD = re.compile(r"\bword\s+([A-Za-z]{2,})\b", re.IGNORECASE)


def _letters(word: str) -> str:
    return re.sub(r"[^a-z]", "", word.lower())


def _named_words(text: str) -> list[str]:
    """The words a text quotes or calls "the word X"."""
    return _QUOTED_WORD.findall(text) + _THE_WORD.findall(text)


# The words the world's word questions are about: another one of them in an answer is another subject.
WORD_POOL = frozenset([a.name for a in ANIMALS] + [t.name for t in THINGS] + list(FOODS) + list(COLOURS) + list(JOBS)
                      + list(EXTRA_WORDS))


def _another_word(token: str, asked: set[str]) -> bool:
    """A word of the world's vocabulary, or one that shares too few letters with every asked word to
    be an attempt at it: a misspelt answer ("pne", "FLORSIT", "p-a-n") is a wrong answer, not
    another subject."""
    if token in WORD_POOL:
        return True
    return all(sum((Counter(token) & Counter(w)).values()) < 0.6 * len(token) for w in asked)


def other_words(ref: dict, response: str, context: str) -> list[str]:
    """On a question about a quoted word (or letter), the world's words (letters) the response
    quotes or calls "the word X" that are not in the dialog: it speaks of another word. Letters
    count only when the question asks about a quoted letter."""
    question = _last_user(context)
    asked = {_letters(w) for w in _QUOTED_WORD.findall(question)}
    if not asked:
        return []
    known = asked | {_letters(w) for w in re.findall(r"[A-Za-z][A-Za-z-]*", context)}
    answer = ref.get("answer")
    if isinstance(answer, str):
        known.add(_letters(answer))
    found = [w for w in _named_words(response) if _letters(w) not in known and _another_word(_letters(w), asked)]
    asked_chars = {c.lower() for c in _QUOTED_CHAR.findall(question)}
    if asked_chars:
        found += [c for c in _QUOTED_CHAR.findall(response) if c.lower() not in asked_chars]
    return list(dict.fromkeys(found))


def _word_penalty(others: list[str], response: str, context: str) -> Check | None:
    """The score cap of an answer that speaks of `others` (`other_words`) besides or instead of the asked word."""
    if not others:
        return None
    asked = _QUOTED_WORD.findall(_last_user(context))
    if {_letters(w) for w in asked} & {_letters(w) for w in _named_words(response)}:
        return 0.3, [f"also speaks of {others[0]!r}"]
    return 0.0, [f"answers about {others[0]!r}, not {asked[-1]!r}"]


# -- partial credit: a wrong answer to the question asked beats an answer to another question -------

# A person comparing two wrong answers prefers the one that answers the question asked ("3 + 2 =
# 6") to one about something else ("37 + 33 = 101", "The word "garden" has 6 letters."): it is on
# topic, and one fact away from right. That preference is what annotators state and what a reward
# model can learn from a policy that is still mostly wrong. Far below a right answer.
ON_TOPIC_CREDIT = 0.2
ON_TOPIC_CHECKS = ("number", "value", "string", "letter")


def on_topic(ref: dict, response: str, context: str, others: list[str] | None = None) -> bool:
    """The response takes up what the question is about, and nothing else: the quoted word of a word
    question, the person or place of a fact question, every number the question gives (the
    operands of a sum, the amount to convert). False where the question names none of these.
    `others`: `other_words` of the response, when the caller has them already."""
    question = _last_user(context)
    keys = ref.get("instances") or []
    subject = str(keys[-1]).split(":") if keys else []
    if subject and subject[0] in ("person", "place") and len(subject) > 1:
        if other_subjects(ref, response, context):
            return False
        return mentions(response, subject[1]) or mentions(response, subject[1].split()[0])
    words = _QUOTED_WORD.findall(question)
    if words:
        named = {_letters(w) for w in _named_words(response)}
        if others is None:
            others = other_words(ref, response, context)
        return not others and bool(named & {_letters(w) for w in words})
    given = numbers(question)
    if given:
        said = numbers(response)
        return all(said.count(x) >= given.count(x) for x in set(given))
    return False


# -- units: a number that goes with a unit must state a true quantity ------------------------------

def _unit_table() -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
    """(spelling -> unit, unit -> (dimension, size in the dimension's smallest unit)) from UNITS."""
    from fractions import Fraction
    links: dict[str, list[tuple[str, Fraction]]] = {}
    for _, big, small, factor in UNITS:
        links.setdefault(big, []).append((small, Fraction(1, factor)))
        links.setdefault(small, []).append((big, Fraction(factor)))
    size: dict[str, tuple[int, Fraction]] = {}
    for dim, start in enumerate(links):
        if start in size:
            continue
        size[start], todo = (dim, Fraction(1)), [start]
        while todo:
            u = todo.pop()
            for v, ratio in links[u]:
                if v not in size:
                    size[v] = (dim, size[u][1] * ratio)
                    todo.append(v)
    smallest = {}
    for dim, x in size.values():
        smallest[dim] = min(smallest.get(dim, x), x)
    sizes = {u: (dim, int(x / smallest[dim])) for u, (dim, x) in size.items()}
    extra = {"metres": "meter meters m", "centimetres": "centimeter centimeters cm cms",
             "kilometres": "kilometer kilometers km kms", "kilograms": "kilogramme kilogrammes kilo kilos kg kgs",
             "grams": "gramme grammes g", "litres": "liter liters l", "millilitres": "milliliter milliliters ml",
             "hours": "hr hrs h", "minutes": "min mins", "seconds": "sec secs s", "weeks": "wk wks",
             "years": "yr yrs", "dozen": "dozens"}
    spell = {}
    for u in sizes:
        spell[u] = u
        if u.endswith("s"):
            spell[u[:-1]] = u
        for alias in extra.get(u, "").split():
            spell[alias] = u
    return spell, sizes


UNIT_SPELLINGS, UNIT_SIZES = _unit_table()
_UNIT_RE = "|".join(sorted(map(re.escape, UNIT_SPELLINGS), key=len, reverse=True))
_UNIT_AT = re.compile(rf"\s*-?\s*({_UNIT_RE})\b", re.IGNORECASE)
_ONE_UNIT = re.compile(rf"\b(?:a|an|one|per|each|every)\s+({_UNIT_RE})\b", re.IGNORECASE)
_CLAUSE_SPLIT = re.compile(r"[,;:.!?\n]\s|[,;:!?\n]|\s(?:and|so|because|since|which|or)\s", re.IGNORECASE)


def quantities(text: str) -> list[tuple[float, str, int, int]]:
    """(amount, unit, start, end) of every "<number> <unit>" ("200 centimetres", "2 m", "a metre")."""
    out = []
    for val, start, end, _ in number_spans(text):
        m = _UNIT_AT.match(text, end)
        if m and (m.group(1).islower() or len(m.group(1)) > 1 or m.group(1) == "L"):
            out.append((val, UNIT_SPELLINGS[m.group(1).lower()], start, m.end()))
    for m in _ONE_UNIT.finditer(text):
        if not any(s <= m.start() < e for _, _, s, e in out):
            out.append((1.0, UNIT_SPELLINGS[m.group(1).lower()], m.start(), m.end()))
    return sorted(out, key=lambda q: q[2])


def units_question(context: str) -> dict | None:
    """What a unit conversion question gives and asks ({"given": amount in the smallest unit,
    "dim", "unit": the unit asked for, "factor"}), from its last line; None for other questions."""
    question = context.strip().splitlines()[-1] if context.strip() else ""
    qs = quantities(question)
    if len(qs) != 1:
        return None
    amount, unit, start, end = qs[0]
    dim, size = UNIT_SIZES[unit]
    rest = question[:start] + " " + question[end:]
    asked = [UNIT_SPELLINGS[w.lower()] for w in re.findall(r"[A-Za-z]+", rest)
             if len(w) > 2 and w.lower() in UNIT_SPELLINGS and UNIT_SIZES[UNIT_SPELLINGS[w.lower()]][0] == dim
             and UNIT_SPELLINGS[w.lower()] != unit]
    if len(set(asked)) != 1:
        return None
    sizes = sorted((size, UNIT_SIZES[asked[0]][1]))
    return {"given": amount * size, "dim": dim, "unit": asked[0], "factor": sizes[1] // sizes[0]}


def check_units(info: dict, response: str) -> tuple[Check | None, list[tuple[int, int]]]:
    """A false quantity (a unit of another kind, or a clause whose quantities are not the one given,
    unless it is a true definition such as "1 metre is 100 centimetres") and the spans of the
    quantities that are fine."""
    ok_spans = []
    qs = quantities(response)
    for q in qs:
        if UNIT_SIZES[q[1]][0] != info["dim"]:
            return (0.0, [f"states {_fmt(q[0])} {q[1]} (asked for {info['unit']})"]), []
    bounds = [0] + [m.end() for m in _CLAUSE_SPLIT.finditer(response)] + [len(response) + 1]
    for a, b in itertools.pairwise(bounds):
        clause = [q for q in qs if a <= q[2] < b]
        amounts = {q[0] * UNIT_SIZES[q[1]][1] for q in clause}
        if not clause or amounts == {info["given"]}:
            ok_spans += [(q[2], q[3]) for q in clause]
            continue
        if len(amounts) == 1 and len(clause) >= 2 and any(q[0] == 1 for q in clause):
            ok_spans += [(q[2], q[3]) for q in clause]  # a definition: "there are 100 cm in a metre"
            continue
        bad = next(q for q in clause if q[0] * UNIT_SIZES[q[1]][1] != info["given"])
        return (0.0, [f"states a false quantity: {_fmt(bad[0])} {bad[1]}"]), []
    return None, ok_spans


_NUMBERED_LINE = re.compile(r"^\s*(\d+)[.)]\s+\S", re.MULTILINE)


def _list_markers(text: str) -> set[int]:
    """Start positions of line numbers "1. … 2. … 3. …" (numbering, not numbers stated)."""
    ms = list(_NUMBERED_LINE.finditer(text))
    if len(ms) >= 2 and [int(m.group(1)) for m in ms] == list(range(1, len(ms) + 1)):
        return {m.start(1) for m in ms}
    return set()


def check_number(ref: dict, response: str, context: str) -> Check:
    """The answer is a number (in digits or words); numbers already given in the dialog may be
    echoed; a number that is denied ("not 67") is not stated. On a unit conversion, numbers that go
    with a unit must state the true quantity. On a question about a person or place, the answer
    must be about them."""
    ans = float(ref["answer"])
    given = set(numbers(context))
    spans = negated_spans(response, _ANY_NUMBER)
    markers = _list_markers(response)
    allowed: set[float] = set()
    ok_spans: list[tuple[int, int]] = []
    info = units_question(context)
    if info:
        verdict, ok_spans = check_units(info, response)
        if verdict:
            return verdict
        allowed = {1.0, float(info["factor"])}
    said, said_words = [], []
    for val, start, end, is_word in number_spans(response):
        if _negated(spans, start) or start in markers:
            continue
        said.append(val)
        in_quantity = any(a <= start < b for a, b in ok_spans)
        # "one" is a pronoun as often as a number: it may give the answer, never compete with it
        if not (is_word and val == 1 and val != ans) and not (in_quantity and val != ans):
            said_words.append(val)
    new = [x for x in said_words if x not in given and x not in allowed]
    if ans in said and (ans in given or ans in said_words):
        others = sorted({x for x in new if x != ans})
        if others:
            return 0.3, [f"also states {', '.join(map(_fmt, others))}"]
        return _subject_penalty(ref, response, context) or (1.0, [])
    if new:
        return 0.0, [f"wrong number {_fmt(new[-1])} (expected {_fmt(ans)})"]
    return 0.0, [f"the answer {_fmt(ans)} is missing"]


def _last_user(record_context: str) -> str:
    return record_context.strip().splitlines()[-1] if record_context.strip() else ""


def _drop_echo(response: str, context: str) -> str:
    """The response without an exact echo of the question (a small model often repeats it first)."""
    q = _last_user(context).strip()
    return response.replace(q, " ") if len(q) > 12 else response


def check_value(ref: dict, response: str, context: str) -> Check:
    """The answer names a value (a place, a job, a colour…); a competing value is wrong. A value
    that is denied ("not swimming") is not stated; values named earlier in the dialog may be echoed,
    but the options the question itself offers ("a town, a village or a city?") may not be claimed."""
    accept = ref["accept"]
    question = _last_user(context)
    # A question that offers the candidate values ("a town, a village or a city?") does not make
    # them answers; otherwise what the dialog says ("What does a fish eat?") may be echoed.
    offered = sum(mentions(question, v) for v in set(accept) | set(ref["wrong"])) >= 2
    echoable = context[: len(context) - len(question)] if offered else context
    wrong = [w for w in ref["wrong"] if w not in accept and not mentions(echoable, w)]
    text = _drop_echo(response, context)
    spans = negated_spans(text, _any_word(tuple(accept) + tuple(wrong)))
    has = any(stated(text, a, spans, plural=True) for a in accept)
    bad = [w for w in wrong if stated(text, w, spans)]
    if has and not bad:
        return _subject_penalty(ref, text, context) or (1.0, [])
    if has:
        return 0.3, [f"also mentions {bad[0]!r}"]
    if bad:
        return 0.0, [f"wrong answer {bad[0]!r} (expected {ref['answer']!r})"]
    return 0.0, [f"the answer {ref['answer']!r} is missing"]


def _letters_key(word: str) -> str:
    return "".join(sorted(re.sub(r"[^a-z]", "", word.lower())))


def check_string(ref: dict, response: str, context: str) -> Check:
    """A transformed string must appear as a whole token (case-sensitive when the task is about
    case; dashes may have spaces around them). A second, different rearrangement of the same
    letters is a competing answer ("nep … or npe"); the words of the dialog may be echoed."""
    ans = ref["answer"]
    flags = 0 if ref.get("case_sensitive") else re.IGNORECASE
    text = re.sub(r"(?<=\b[A-Za-z])\s*[-\u2013]\s*(?=[A-Za-z]\b)", "-", response) if "-" in ans else response
    # a token never continues with letters, nor with a dash and more letters ("p-e-n-s" is not "p-e-n")
    token = re.compile(rf"(?<![A-Za-z])(?<![A-Za-z]-){re.escape(ans)}(?!-?[A-Za-z])", flags)
    if not token.search(text):
        return 0.0, [f"expected {ans!r}"]
    key, echoes = _letters_key(ans), {w.lower() for w in re.findall(r"[A-Za-z-]+", context)}
    rivals = {t for t in re.findall(r"[A-Za-z]+(?:-[A-Za-z]+)*", text)
              if _letters_key(t) == key and len(t) > 1 and t.lower() not in echoes
              and not (t == ans or (flags and t.lower() == ans.lower()))}
    if rivals:
        return 0.3, [f"also gives {min(rivals)!r}"]
    return 1.0, []


_QUOTED_LETTER = re.compile(r"[\"'“‘]([A-Za-z])[\"'”’]")
_LONE_LETTER = re.compile(r"(?<![\w'\"“‘-])([A-Za-z])(?![\w'\"”’-])")


def check_letter(ref: dict, response: str, context: str) -> Check:
    """A single letter: read from quotes if any, else from letters standing alone; a letter that
    is denied ("not 'e'") is not named."""
    ans = ref["answer"].lower()
    spans = negated_spans(response, _ANY_LETTER)
    quoted = {m.group(1).lower() for m in _QUOTED_LETTER.finditer(response) if not _negated(spans, m.start())}
    if quoted:
        if quoted == {ans}:
            return 1.0, []
        return (0.3, ["names more than one letter"]) if ans in quoted else (0.0, [f"expected the letter {ans!r}"])
    lone = {m.group(1).lower() for m in _LONE_LETTER.finditer(response) if not _negated(spans, m.start())}
    if ans in lone:
        # "a" and "I" stand alone as words; only other letters compete with the answer.
        return (1.0, []) if lone - {ans, "a", "i"} == set() else (0.3, ["names more than one letter"])
    return 0.0, [f"expected the letter {ans!r}"]


_INTERJECTIONS = frozenset(["sure", "okay", "ok", "yes", "here", "done", "certainly", "alright", "answer", "sorted", "order", "result"])


def _items(response: str, kind: str, vocab: set[str]) -> list:
    if kind == "number":
        markers = _list_markers(response)  # "1. 5\n2. 29\n3. 37": line numbers are not items
        return [v for v, start, _, is_word in number_spans(response) if not is_word and start not in markers]
    return [w for w in re.findall(r"[A-Za-z]+", response.lower()) if w in vocab]


def _stray_items(response: str, vocab: set[str]) -> list[str]:
    """Entries of a word list that are none of the words to sort ("bell, melon, table" -> table)."""
    text = response.split(":", 1)[1] if ":" in response else response
    out = []
    for part in re.split(r"[,;\n]|\band\b|->|→", text):
        words = re.findall(r"[A-Za-z]+", part.lower())
        if words and len(words) <= 2 and not any(w in vocab or w in _INTERJECTIONS for w in words):
            out.append(" ".join(words))
    return out


def check_sequence(ref: dict, response: str, context: str) -> Check:
    """An ordered list (sorted numbers or words). Echoing the input first is allowed; an entry
    that is none of the items is an extra item."""
    kind = ref["kind"]
    ans = [float(x) for x in ref["answer"]] if kind == "number" else list(ref["answer"])
    given = [float(x) for x in ref["input"]] if kind == "number" else list(ref["input"])
    said = _items(response, kind, set(ans))
    stray = [] if kind == "number" else _stray_items(response, set(ans) | set(given))
    if stray and Counter(said) - Counter(ans) == Counter() and not (Counter(ans) - Counter(said)):
        return 0.2, [f"extra items: {', '.join(stray[:3])}"]
    if said == ans:
        return 1.0, []
    if said == given + ans:
        return 1.0, []
    if Counter(said) == Counter(ans):
        return 0.2, ["right items in the wrong order"]
    if Counter(said) - Counter(ans) and not (Counter(ans) - Counter(said)):
        return 0.2, ["extra items"]
    return 0.0, [f"expected {', '.join(map(_fmt, ans) if kind == 'number' else ans)}"]


_PROPERTY_WORDS = {
    "largest": ("largest", "biggest", "highest", "greatest", "maximum"),
    "smallest": ("smallest", "lowest", "least", "minimum", "tiniest"),
    "first": ("first",), "last": ("last", "final"),
    "animal": ("animal", "animals"), "colour": ("colour", "colours", "color", "colors"),
    "food": ("food", "foods"), "job": ("job", "jobs"),
}
_MEMBERS = {"animal": {a.name for a in ANIMALS}, "colour": set(COLOURS), "food": set(FOODS), "job": set(JOBS)}
_CLAUSE = re.compile(r"[,;:.!?\n]\s*|\s(?:and|but|while|whereas)\s", re.IGNORECASE)


def _holds(prop: str, option: str, options: list[str]) -> bool | None:
    """Whether `option` has the property among `options`; None where it cannot be told."""
    if prop in ("largest", "smallest"):
        try:
            vals = [float(o) for o in options]
        except ValueError:
            return None
        return float(option) == (max(vals) if prop == "largest" else min(vals))
    if prop in ("first", "last"):
        return option == options[0 if prop == "first" else -1]
    return option.lower() in _MEMBERS[prop]


def check_choice(ref: dict, response: str, context: str) -> Check:
    """Pick one of the given options: name it, and no other. Echoing the list is fine, and so are
    true statements about other options ("98 is the largest, 38 the smallest"); a false one
    ("98 is the smallest") is wrong, and an option that is denied is not named."""
    ans, options = ref["answer"], list(ref["options"])
    text = _drop_echo(response, context)
    for sep in (", ", ","):
        text = text.replace(sep.join(options), " ")
    spans = negated_spans(text, _any_word(tuple(options)))
    exempt: set[str] = set()
    bounds = [0] + [m.end() for m in _CLAUSE.finditer(text)] + [len(text) + 1]
    for a, b in itertools.pairwise(bounds):
        clause = text[a:b]
        if any(x < b and a < y for x, y in spans):
            continue  # a denial ("98 is not the smallest") claims nothing
        named = [o for o in options if stated(clause, o, [], plural=not o.isdigit())]
        props = [p for p, words in _PROPERTY_WORDS.items() if any(mentions(clause, w) for w in words)]
        if len(named) != 1 or len(props) != 1:
            continue
        holds = _holds(props[0], named[0], options)
        if holds is False:
            return 0.0, [f"says {named[0]!r} is the {props[0]}"]
        if holds and named[0] != ans:
            exempt.add(named[0])
    others = [o for o in options if o != ans and o not in exempt and stated(text, o, spans, plural=not o.isdigit())]
    if stated(text, ans, spans, plural=not ans.isdigit()):
        return (0.3, [f"also names {others[0]!r}"]) if others else (1.0, [])
    return 0.0, [f"expected {ans!r}" + (f", got {others[0]!r}" if others else "")]


_NUMBERED = re.compile(r"^\s*(\d+)\s*[.):]\s*(.*)$")
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


def _allowed_form(item: str, allowed: set[str]) -> str:
    if item in allowed:
        return item
    for form in (item[:-1] if item.endswith("s") else None, item[:-2] if item.endswith("es") else None,
                 item + "s", item + "es"):
        if form and form in allowed:
            return form
    return item


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
    # "cats" names a cat and "apple" an apple: the plural or singular of an allowed word counts
    low = [_allowed_form(it, allowed) for it in low]
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


# Words that join nouns without saying anything of them: "Cat and mug." is a list, not a sentence.
_JOINERS = frozenset(["a", "an", "the", "and", "or", "with", "of", "to", "in", "on", "at", "by", "next", "near", "some", "my", "your", "his", "her", "their", "this", "that", "these", "those"])


def check_sentence(ref: dict, response: str, context: str) -> Check:
    """One sentence that uses the required words (or their plurals), within a word limit; a string
    of the words with nothing said of them is no sentence."""
    missing = [w for w in ref["must_include"] if not _word_forms_pattern(w).search(response)]
    score = 1 - len(missing) / len(ref["must_include"])
    reasons = [f"does not use {w!r}" for w in missing]
    sents = _sentences(response)
    if len(sents) != 1:
        score *= 0.4
        reasons.append(f"{len(sents)} sentences instead of one")
    if sents and len(sents[0].split()) > ref["max_words"]:
        score *= 0.5
        reasons.append(f"more than {ref['max_words']} words")
    required = {w.lower() for w in ref["must_include"]}
    if len(sents) == 1 and all(w in _JOINERS or _allowed_form(w, required) in required
                               for w in re.findall(r"[a-z']+", sents[0].lower())):
        score *= 0.3
        reasons.append("names the words without saying anything (not a sentence)")
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
    answer = ref.get("answer")
    factor, common = common_checks(response, ref.get("gold"), benign=True,
                                   answer=_fmt(answer) if isinstance(answer, (int, float)) else
                                   answer if isinstance(answer, str) else None)
    if factor == 0.0:
        return Grade(0.0, tuple(common))
    context = prompt_text(record)
    score, reasons = CHECKS[ref["check"]](ref, response, context)
    if ref["check"] in ON_TOPIC_CHECKS:
        others = other_words(ref, response, context)  # read once: the cap below and the on-topic credit
        penalty = _word_penalty(others, response, context) if ref["check"] != "value" else None
        if penalty:
            score, reasons = min(score, penalty[0]), reasons + penalty[1]
        if score == 0 and on_topic(ref, response, context, others):
            score, reasons = ON_TOPIC_CREDIT, reasons + ["a wrong answer to the question asked"]
    return Grade(round(max(0.0, min(1.0, score * factor)), 4), tuple(reasons + common))
