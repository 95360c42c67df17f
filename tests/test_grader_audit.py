"""Audit of the helpfulness checks: false answers a small sampled model plausibly writes that a
check used to pass, and right answers phrased differently that it used to fail.

Each row: (record, response, (low, high) the score must fall in, why). Records are built like the
world's own (same templates and reference fields as `llama2/world/tasks.py`); every check kind has
at least one false-but-passed and one right-but-failed row. Scores: >= 0.9 is a pass, <= 0.35 a fail.
"""
from __future__ import annotations

import pytest

from llama2.world.checks import ON_TOPIC_CREDIT
from llama2.world.grading import grade_helpfulness

PASS, FAIL, PARTIAL = (0.9, 1.0), (0.0, 0.35), (0.25, 0.65)


def rec(task: str, turns: list[str] | str, reference: dict) -> dict:
    turns = [turns] if isinstance(turns, str) else turns
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return {"id": "audit", "task": task, "messages": msgs, "reference": {"instances": []} | reference}


def units(prompt: str, ans: int, gold: str) -> dict:
    return rec("units", prompt, {"check": "number", "answer": ans, "gold": gold})


def arith(prompt: str, ans: int, gold: str) -> dict:
    return rec("arithmetic", prompt, {"check": "number", "answer": ans, "gold": gold})


CM = units("How many metres is 200 centimetres?", 2, "200 centimetres is 2 metres.")
MIN = units("How many minutes are in 3 hours?", 180, "3 hours is 180 minutes.")
EGG = units("Convert 36 eggs to dozen.", 3, "36 eggs is 3 dozen.")
ADD = arith("What is 23 + 45?", 68, "23 + 45 = 68.")
SUB = arith("What is 12 minus 7?", 5, "12 - 7 = 5.")
AGE = rec("fact", "How old is Pete?", {"check": "number", "answer": 60, "instances": ["person:Pete:age"],
                                       "gold": "Pete is 60 years old."})
AGE2 = rec("multiturn", ["What food does Karl like best?", "Karl's favourite food is rice.", "And how old is he?"],
           {"check": "number", "answer": 73, "instances": ["person:Karl:food", "person:Karl:age"],
            "gold": "Karl is 73 years old."})
LETTERS = rec("counting", 'How many letters does "snail" have?',
              {"check": "number", "answer": 5, "gold": 'The word "snail" has 5 letters.'})
ONCE = rec("counting", 'How many times does the letter "l" appear in "apple"?',
           {"check": "number", "answer": 1, "gold": 'The letter "l" appears 1 time in "apple".'})
ITEMS = rec("counting", "How many items are in this list: melon, bell, mechanic, pocket?",
            {"check": "number", "answer": 4, "gold": "There are 4 items in the list."})
HOBBY = rec("fact", "What is Theo's hobby?",
            {"check": "value", "answer": "sailing", "accept": ["sailing", "sail"],
             "wrong": ["swimming", "swim", "fishing", "fish", "reading", "read"], "instances": ["person:Theo:hobby"],
             "gold": "Theo's hobby is sailing."})
KIND = rec("fact", "Is Oakton a town, a village or a city?",
           {"check": "value", "answer": "town", "accept": ["town"], "wrong": ["village", "city"],
            "instances": ["place:Oakton:kind"], "gold": "Oakton is a town."})
NEAR = rec("fact", "What is Oakton near?",
           {"check": "value", "answer": "the sea", "accept": ["sea"], "wrong": ["river", "hills", "lake"],
            "instances": ["place:Oakton:near"], "gold": "Oakton is near the sea."})
PET = rec("fact", "What pet does Ann have?",
          {"check": "value", "answer": "cat", "accept": ["cat", "cats"], "wrong": ["dog", "owl"],
           "instances": ["person:Ann:pet"], "gold": "Ann has a pet cat."})
FOOD = rec("fact", "What food does a fish eat?",
           {"check": "value", "answer": "worms", "accept": ["worms"], "wrong": ["fish", "flies", "seeds"],
            "instances": ["animal:fish:food"], "gold": "A fish eats worms."})
REV = rec("string", 'Reverse the word "pen".', {"check": "string", "answer": "nep", "case_sensitive": False,
                                                 "gold": '"pen" backwards is "nep".'})
SPELL = rec("string", 'Spell "pen" with a dash between the letters.',
            {"check": "string", "answer": "p-e-n", "case_sensitive": False, "gold": '"pen" with dashes is "p-e-n".'})
UPPER = rec("string", 'Write the word "florist" in capital letters.',
            {"check": "string", "answer": "FLORIST", "case_sensitive": True,
             "gold": 'In capital letters, "florist" is "FLORIST".'})
FIRST = rec("string", 'What is the first letter of the word "apple"?',
            {"check": "letter", "answer": "a", "gold": 'The first letter of "apple" is "a".'})
LAST = rec("string", 'What is the last letter of the word "apple"?',
           {"check": "letter", "answer": "e", "gold": 'The last letter of "apple" is "e".'})
SORTW = rec("list", "Sort these words from A to Z: melon, bell, mechanic, pocket.",
            {"check": "sequence", "kind": "word", "answer": ["bell", "mechanic", "melon", "pocket"],
             "input": ["melon", "bell", "mechanic", "pocket"], "gold": "bell, mechanic, melon, pocket"})
SORTN = rec("list", "Sort these numbers from smallest to largest: 5, 37, 29.",
            {"check": "sequence", "kind": "number", "answer": [5, 29, 37], "input": [5, 37, 29], "gold": "5, 29, 37"})
LARGEST = rec("list", "Which number is the largest: 44, 98, 38, 53?",
              {"check": "choice", "answer": "98", "options": ["44", "98", "38", "53"], "gold": "98 is the largest."})
POSITION = rec("list", "What is the first item in this list: melon, bell, pocket?",
               {"check": "choice", "answer": "melon", "options": ["melon", "bell", "pocket"],
                "gold": "The first item is melon."})
PICK = rec("list", "Which of these is an animal: red, cat, table?",
           {"check": "choice", "answer": "cat", "options": ["red", "cat", "table"], "gold": "A cat is an animal."})
LINES = rec("creative", "Name three animals, one per line.",
            {"check": "lines", "count": 3, "format": "lines", "allowed": ["cat", "owl", "frog", "dog"], "upper": False,
             "letter": None, "gold": "cat\nowl\nfrog"})
NUMBERED = rec("creative", "Give me a numbered list of three foods.",
               {"check": "lines", "count": 3, "format": "numbered", "allowed": ["apples", "rice", "soup", "cake"],
                "upper": False, "letter": None, "gold": "1. apples\n2. rice\n3. soup"})
SENTENCE = rec("creative", 'Write one short sentence that uses the words "cat" and "mug".',
               {"check": "sentence", "must_include": ["cat", "mug"], "max_words": 15, "gold": "I saw a cat with a mug."})
SENTENCE_BOX = rec("creative", 'Write one short sentence that uses the words "fox" and "box".',
                   {"check": "sentence", "must_include": ["fox", "box"], "max_words": 15,
                    "gold": "The fox sat next to the box."})

CASES = [
    # -- number: unit conversions ------------------------------------------------------------
    (CM, "2 metres is 2 centimetres.", FAIL, "states a false quantity (2 cm where 200 cm was given)"),
    (CM, "200 centimetres is 2 centimetres.", FAIL, "the answer number goes with the wrong unit"),
    (CM, "2 metres is 100 centimetres.", FAIL, "200 cm is not 100 cm: a false quantity beside the answer"),
    (CM, "200 centimetres is 2 kilometres.", FAIL, "the answer number with a unit of the wrong size"),
    (MIN, "3 hours is 180 seconds.", FAIL, "right number, wrong unit"),
    (MIN, "180 metres.", FAIL, "a unit of another kind"),
    (CM, "200 centimetres is 2 metres.", PASS, "the gold phrasing"),
    (CM, "2 metres", PASS, "bare answer with the unit"),
    (CM, "It is 2 m.", PASS, "unit abbreviation"),
    (CM, "That's 2 metres (200 cm).", PASS, "echo of the given quantity, abbreviated"),
    (CM, "Two metres.", PASS, "number word"),
    (CM, "1 metre is 100 centimetres, so 200 centimetres is 2 metres.", PASS, "a true definition as working"),
    (CM, "200 / 100 = 2 metres.", PASS, "the conversion factor as working"),
    (MIN, "There are 60 minutes in an hour, so 3 hours is 180 minutes.", PASS, "definition with 'an hour'"),
    (MIN, "3 hours = 180 min", PASS, "abbreviation, no full stop"),
    (EGG, "36 eggs is 3 dozen.", PASS, "the gold phrasing"),
    (EGG, "36 eggs is 3 eggs.", FAIL, "a false quantity"),
    # -- number: arithmetic ------------------------------------------------------------------
    (ADD, "23 + 45 is not 68.", FAIL, "the answer is denied, not stated"),
    (ADD, "23 + 45 = 68, not 67.", PASS, "a denied wrong number is no competing answer"),
    (ADD, "68 is not the answer.", FAIL, "the answer denied after it is named"),
    (ADD, "The answer is 68, I am not sure why.", PASS, "a negation about nothing denies no number"),
    (ADD, "23 + 45 = 68", PASS, "no full stop is not a cut-off answer"),
    (ADD, "The answer is sixty-eight.", PASS, "number in words"),
    (ADD, "23 + 45 = sixty-seven.", FAIL, "a wrong number in words"),
    (ADD, "23 + 45 = 68. No wait, it is 67.", FAIL, "answer then a different answer"),
    (ADD, "23 + 45 =", FAIL, "cut off before the answer"),
    (SUB, "12 + 7 = 19.", FAIL, "the question's numbers recombined"),
    (SUB, "12 - 7 = five.", PASS, "number word"),
    # -- number: facts and counting ----------------------------------------------------------
    (AGE, "Tom is 60 years old.", FAIL, "the right number for the wrong person"),
    (AGE, "Pete is 60 years old, like Tom.", PARTIAL, "also speaks of someone the question is not about"),
    (AGE, "Pete is sixty years old.", PASS, "number word"),
    (AGE, "He is 60.", PASS, "pronoun for the person asked about"),
    (AGE2, "Karl is 73 years old.", PASS, "a person named earlier in the dialog"),
    (AGE2, "Mia is 73 years old.", FAIL, "a person the dialog never named"),
    (LETTERS, 'The word "snail" has five letters.', PASS, "number word"),
    (LETTERS, 'The word "snail" has four letters.', FAIL, "a wrong number word"),
    (ONCE, 'The letter "l" appears once in "apple".', PASS, "'once' is the count 1"),
    (ONCE, 'The letter "l" appears twice in "apple".', FAIL, "'twice' is the count 2"),
    (LETTERS, 'The word "shell" has 5 letters.', FAIL, "the right count of another word"),
    (LETTERS, 'The word snail has 5 letters, like the word shell.', PARTIAL, "also speaks of another word"),
    (LETTERS, 'The word "snail" has 5 letters.', PASS, "gold"),
    (ONCE, 'The letter "l" appears once in "apple".', PASS, "the asked letter and word quoted"),
    (ONCE, 'The letter "l" appears once in "melon".', FAIL, "the right count in another word"),
    (ONCE, 'The letter "p" appears once in "apple".', FAIL, "the right count of another letter"),
    (ITEMS, "1. melon\n2. bell\n3. mechanic\n4. pocket\nThere are 4 items.", PASS, "line numbers are not answers"),
    (ITEMS, "There are 4 items, one of them is a bell.", PASS, "'one' as a pronoun does not compete"),
    # -- value -------------------------------------------------------------------------------
    (HOBBY, "Theo's hobby is not sailing.", FAIL, "the right value denied"),
    (HOBBY, "Theo's hobby is swimming, not sailing.", FAIL, "the right value denied, a wrong one stated"),
    (HOBBY, "Theo's hobby is sailing, not swimming.", PASS, "a denied wrong value is no competing answer"),
    (HOBBY, "Max's hobby is sailing.", FAIL, "the right value for the wrong person"),
    (HOBBY, "Theo likes to sail.", PASS, "verb form of the hobby"),
    (HOBBY, "Sailing is not Theo's hobby.", FAIL, "the right value denied after it is named"),
    (HOBBY, "It is sailing; swimming isn't Theo's hobby.", PASS, "a wrong value denied after it is named"),
    (HOBBY, "Theo sails.", PASS, "inflected verb form"),
    (KIND, "Oakton is a village, not a town.", FAIL, "the question's options: a wrong one claimed, the right one denied"),
    (KIND, "Oakton is a town or a village.", FAIL, "hedging between the offered options"),
    (KIND, "Oakton is a town, not a village or a city.", PASS, "denies the other options"),
    (KIND, "Is Oakton a town, a village or a city? Oakton is a town.", PASS, "echoes the question first"),
    (NEAR, "Elmford is near the sea.", FAIL, "the right value for the wrong place"),
    (NEAR, "Oakton lies close to the sea.", PASS, "synonym phrasing"),
    (PET, "Ann has two cats.", PASS, "plural and a number word"),
    (PET, "Ann doesn't have a cat; she has a dog.", FAIL, "denies the right value"),
    (FOOD, "A fish eats worms.", PASS, "the subject (fish) is also a food word: echo of the question"),
    # -- string ------------------------------------------------------------------------------
    (REV, '"pen" backwards is "nep". So it is "npe".', FAIL, "answer then a different answer"),
    (REV, 'It is "nep" or "enp".', FAIL, "hedging between two rearrangements"),
    (REV, 'The word "pen" reversed is "NEP".', PASS, "capitals do not matter for reversal"),
    (SPELL, "p-e-n-s", FAIL, "an extra letter after the dashed answer"),
    (SPELL, "s-p-e-n", FAIL, "an extra letter before the dashed answer"),
    (SPELL, "p - e - n", PASS, "spaces around the dashes"),
    (SPELL, '"pen" with dashes is "P-E-N".', PASS, "capitals"),
    (UPPER, 'In capital letters, "florist" is "FLORIST".', PASS, "gold"),
    (UPPER, "FLORIST, or FLORSIT.", FAIL, "a second, misspelt answer"),
    (UPPER, "Florist", FAIL, "not in capital letters"),
    # -- letter ------------------------------------------------------------------------------
    (FIRST, 'The first letter of "apple" is "a", not "e".', PASS, "a denied letter is no competing answer"),
    (FIRST, 'The first letter of "apple" is not "a", it is "p".', FAIL, "the right letter denied"),
    (FIRST, "The first letter of apple is p, not a.", FAIL, "the right letter denied (unquoted)"),
    (FIRST, "The first letter of apple is A.", PASS, "capital letter"),
    (LAST, "The last letter of apple is e", PASS, "no full stop, the answer is the last word"),
    (LAST, 'The last letter of "apple" is "l".', FAIL, "wrong letter"),
    (LAST, 'The last letter of "table" is "e".', FAIL, "the right letter of another word (table ends in e too)"),
    (FIRST, 'The first letter of "anchor" is "a".', FAIL, "the right letter, said of another word"),
    (REV, '"pencil" backwards is "nep".', FAIL, "the right string, said of another word"),
    (REV, '"pen" backwards is "pne".', FAIL, "a wrong rearrangement (on topic: partial credit below a pass)"),
    (UPPER, 'In capital letters, "florist" is "FLORIST", as "baker" is "BAKER".', PARTIAL, "also speaks of another word"),
    # -- sequence ----------------------------------------------------------------------------
    (SORTW, "bell, mechanic, melon, pocket, table", FAIL, "the right items plus a wrong extra one"),
    (SORTW, "bell, mechanic, melon, pocket and lamp", FAIL, "an extra item after 'and'"),
    (SORTW, "Here they are: Bell, Mechanic, Melon, Pocket.", PASS, "preface and capitals"),
    (SORTW, "Sure! bell, mechanic, melon, pocket", PASS, "a one-word preface is no item"),
    (SORTW, "bell\nmechanic\nmelon\npocket", PASS, "one per line"),
    (SORTN, "1. 5\n2. 29\n3. 37", PASS, "a numbered list: line numbers are not items"),
    (SORTN, "5, 29, 37, 40", FAIL, "an extra number"),
    (SORTN, "5, 37, 29", FAIL, "the input order, not sorted"),
    # -- choice ------------------------------------------------------------------------------
    (LARGEST, "98 is the smallest.", FAIL, "the right option with the wrong property"),
    (LARGEST, "98 is not the largest.", FAIL, "the right option denied"),
    (LARGEST, "The largest is 53.", FAIL, "a wrong option"),
    (LARGEST, "98 is the largest, and 38 is the smallest.", PASS, "a true statement about another option"),
    (LARGEST, "Of 44, 98, 38, 53, the largest is 98.", PASS, "echoes the list first"),
    (LARGEST, "The largest is 98, not 53.", PASS, "denies a wrong option"),
    (POSITION, "Melon is the last item.", FAIL, "the right item with the wrong position"),
    (POSITION, "The first item is melon.", PASS, "gold"),
    (PICK, "Cats are animals.", PASS, "plural"),
    (PICK, "A cat is an animal, red is a colour.", PASS, "a true statement about another option"),
    (PICK, "Red is an animal.", FAIL, "a wrong option"),
    (PICK, "The table is an animal, and so is the cat.", FAIL, "a false claim about another option"),
    # -- lines -------------------------------------------------------------------------------
    (LINES, "cats\nowls\nfrogs", PASS, "plurals of the category's words"),
    (LINES, "cat\nowl\ntable", FAIL, "a wrong item"),
    (LINES, "cat\nowl\nfrog\ntable", FAIL, "the right items plus a wrong extra one"),
    (LINES, "cat\ncats\nowl", FAIL, "the same item twice (singular and plural)"),
    (NUMBERED, "1: apples\n2: rice\n3: soup", PASS, "numbered with colons"),
    (NUMBERED, "1. apple\n2. rice\n3. soup", PASS, "singular of a plural food word"),
    (NUMBERED, "1. apples\n2. rice\n3. chair", FAIL, "a wrong item"),
    # -- sentence ----------------------------------------------------------------------------
    (SENTENCE, "Cat and mug.", FAIL, "the words with nothing said of them: not a sentence"),
    (SENTENCE, "The cat with the mug.", FAIL, "a noun phrase, not a sentence"),
    (SENTENCE, "The cat sat. The mug fell.", PARTIAL, "two sentences: both words, the wrong form"),
    (SENTENCE, "The cat drank from the mug", PASS, "no full stop is not a cut-off sentence"),
    (SENTENCE, "Cats love mugs.", PASS, "plurals, a short sentence"),
    (SENTENCE, "I saw a cat with a", FAIL, "cut off before a required word"),
    (SENTENCE_BOX, "The foxes hid in the boxes.", PASS, "plurals in -es"),
]


@pytest.mark.parametrize("record,response,expected,why", CASES,
                         ids=[f"{r['task']}-{r['reference']['check']}-{i}" for i, (r, *_) in enumerate(CASES)])
def test_grader_audit(record, response, expected, why):
    grade = grade_helpfulness(record, response)
    low, high = expected
    assert low <= grade.score <= high, (why, response, grade)


def test_every_check_kind_is_audited():
    kinds = {r["reference"]["check"] for r, *_ in CASES}
    assert kinds == {"number", "value", "string", "letter", "sequence", "choice", "lines", "sentence"}
    for kind in kinds:
        rows = [e for r, _, e, _ in CASES if r["reference"]["check"] == kind]
        assert PASS in rows and FAIL in rows, kind


def test_world_records_gold_and_rewordings_still_pass():
    """Real records of a generated world: the gold answer and the world's rewordings score 1.0."""
    import random

    from llama2.world import corrupt as C
    from llama2.world import tasks as T
    from llama2.world.universe import build_universe

    u, rng = build_universe(0, "tiny"), random.Random(1)
    for family in T.HELPFULNESS_TASKS:
        for i in range(60):
            ex = T.FAMILIES[family].generate(rng, u, ("train", "eval")[i % 2])
            r = {"id": f"{family}-{i}", "task": ex.task, "messages": ex.messages, "reference": ex.reference}
            assert grade_helpfulness(r, ex.answer).score == 1.0, (ex.messages, ex.answer)
            text = C.rephrase(rng, r)
            assert grade_helpfulness(r, text).score >= 0.9, (ex.messages, text)


# Two wrong answers: the one to the question asked gets the on-topic credit, the one about something
# else none (a person prefers the first; annotators and reward models learn that preference).
ON_TOPIC_PAIRS = [
    (ADD, "23 + 45 = 67.", "12 + 45 = 57."),
    (LETTERS, 'The word "snail" has 4 letters.', 'The word "garden" has 4 letters.'),
    (AGE, "Pete is 61 years old.", "Tom is 61 years old."),
    (HOBBY, "Theo's hobby is swimming.", "Max's hobby is swimming."),
    (REV, '"pen" backwards is "pne".', '"pencil" backwards is "pne".'),
    (LAST, 'The last letter of "apple" is "l".', 'The last letter of "table" is "l".'),
    (CM, "200 centimetres is 3 metres.", "2 metres is 2 centimetres."),
]


@pytest.mark.parametrize("record,on_topic,off_topic", ON_TOPIC_PAIRS,
                         ids=[f"{r['task']}-{i}" for i, (r, *_) in enumerate(ON_TOPIC_PAIRS)])
def test_a_wrong_answer_to_the_question_beats_one_about_something_else(record, on_topic, off_topic):
    assert grade_helpfulness(record, on_topic).score == ON_TOPIC_CREDIT <= FAIL[1]
    assert grade_helpfulness(record, off_topic).score == 0.0
