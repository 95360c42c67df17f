"""Ghost Attention instructions: parsing, checkers, compliance and the GAtt data layout (§3.3)."""
import random

import pytest

from llama2.world import gatt
from llama2.formats import check_record
from llama2.world.gatt import Constraint
from llama2.world.lexicon import EN_FR, FR_EN, is_french, to_french

# Plain answers of the kind the world's tasks give; none carries any constraint's marker.
ANSWERS = (
    "The answer is 42.", "Tom lives in Oakton.", "Paris has a big river.",
    "Put crackers on a tray and add chocolate.", "Use a tripod and a long exposure.",
    "red\nblue\ngreen", "Ann is 34 years old.", "You can take the train to the city.",
    "A cat has four legs and a long tail.", "I think it will rain today.",
)


def test_lexicon_sides_are_disjoint():
    # A word on both sides could not tell the checker which language it is in.
    assert not set(EN_FR) & set(FR_EN)
    assert len(FR_EN) == len(EN_FR)  # one French word per English word


def test_french_translation_reads_as_french():
    assert to_french("I can help you with the answer.") == "je peut aide vous avec le reponse."
    assert is_french(to_french("Tom lives in Oakton."))
    assert not is_french("Tom lives in Oakton.")
    assert is_french(to_french("42"))  # no lexicon word at all still reads as French


def test_short_forms_parse_to_the_same_constraints():
    rng = random.Random(0)
    for _ in range(300):
        text, constraints = gatt.random_instruction(rng, short=False)
        short = gatt.render(constraints, rng, short=True)
        assert gatt.parse(text) == gatt.parse(short) == constraints, (text, short)
    assert gatt.parse("Always act as Napoleon from now on.") == gatt.parse("Figure: Napoleon") == (
        Constraint("figure", "napoleon"),)
    assert gatt.parse("Language: capitals. Hobby: chess") == (
        Constraint("language", "capitals"), Constraint("hobby", "chess"))


def test_half_the_instructions_are_short():
    rng = random.Random(1)
    texts = [gatt.random_instruction(rng)[0] for _ in range(400)]
    short = sum(":" in t for t in texts)
    assert 150 < short < 250
    kinds = [len(gatt.parse(t)) for t in texts]
    assert set(kinds) == {1, 2, 3}  # single constraints and their combinations


def test_checkers_accept_compliant_and_reject_plain_answers():
    rng = random.Random(2)
    accepted = rejected = cases = 0
    for _ in range(400):
        instruction, constraints = gatt.random_instruction(rng)
        answer = rng.choice(ANSWERS)
        good = gatt.comply(instruction, answer, rng)
        cases += 1
        accepted += gatt.check(instruction, good)
        rejected += not gatt.check(instruction, answer)
    assert accepted == cases  # every compliant answer passes
    assert rejected == cases  # no plain answer passes


def test_each_constraint_rejects_answers_made_for_another():
    rng = random.Random(3)
    all_constraints = ([Constraint("language", v) for v in gatt.LANGUAGES]
                       + [Constraint("figure", v) for v in gatt.FIGURES]
                       + [Constraint("hobby", v) for v in gatt.HOBBIES])
    for c in all_constraints:
        for other in all_constraints:
            if other == c:
                continue
            for answer in ANSWERS:
                made_for_other = gatt.comply([other], answer, rng)
                assert gatt.check_constraint(c, made_for_other) is False, (c, other, made_for_other)


def test_capitals_and_pirate_checks():
    caps = [Constraint("language", "capitals")]
    assert gatt.check(caps, "THE ANSWER IS 42.")
    assert not gatt.check(caps, "The answer is 42.")
    assert not gatt.check(caps, "42")  # nothing to be in capitals: not shown
    assert gatt.check(caps, gatt.comply(caps, "42", random.Random(0)))
    pirate = [Constraint("language", "pirate")]
    assert gatt.check(pirate, "Arr, the answer be 42, matey.")
    assert not gatt.check(pirate, "Arr.")  # the cry alone is not pirate speak


def test_unknown_instruction_is_refused():
    with pytest.raises(gatt.InstructionError, match="no known constraint"):
        gatt.parse("Be nice.")


def test_gold_dialog_holds_on_every_turn():
    rng = random.Random(4)
    turns = [(f"Question {i}?", rng.choice(ANSWERS)) for i in range(20)]
    dialog = gatt.gold_dialog(rng, turns, "Figure: Cleopatra. Hobby: fishing", pid="g1")
    assert dialog["messages"][0] == {"role": "system", "content": "Figure: Cleopatra. Hobby: fishing"}
    assert len(dialog["messages"]) == 41
    assert all(gatt.turn_compliance("Act as Cleopatra. You enjoy fishing.", dialog["messages"]))
    check_record(dialog, "sft")


def test_sampling_messages_carry_the_instruction_every_turn():
    users = ["Hi?", "What is 2 + 2?", "And 3 + 3?"]
    msgs = gatt.sampling_messages("Always answer in French.", users, ["Bonjour."])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"] == "Always answer in French.\nHi?"
    assert msgs[2]["content"] == "Always answer in French.\nWhat is 2 + 2?"
    with pytest.raises(ValueError, match="nothing left to sample"):
        gatt.sampling_messages("x", users, ["a", "b", "c"])


def test_training_dialogs_keep_the_instruction_only_in_the_first_turn():
    users = ["Hi?", "What is 2 + 2?", "And 3 + 3?"]
    answers = ["Napoleon here. Hello.", "Napoleon here. 4.", "Napoleon here. 6."]
    out = gatt.training_dialogs("Figure: Napoleon", users, answers, pid="d")
    assert [len(d["messages"]) for d in out] == [3, 5, 7]
    last = out[-1]
    assert last["id"] == "d-t3" and last["meta"] == {"train_last_turn_only": True}
    assert last["messages"][0] == {"role": "system", "content": "Figure: Napoleon"}
    assert [m["content"] for m in last["messages"] if m["role"] == "user"] == users  # no instruction
    assert last["messages"][-1]["content"] == "Napoleon here. 6."
    assert len(gatt.training_dialogs("Figure: Napoleon", users, answers, every_turn=False)) == 1
    for d in out:
        check_record(d, "sft")  # the flag rides in "meta", which the SFT format admits
