"""The world's "French": a small word-for-word lexicon, so that a language is checkable.

Used by Ghost Attention's "Always answer in French" constraint (Llama 2 §3.3) and by the
non-English attack vector of adversarial prompts (§4.2.1). A word-by-word substitution is not real
French, but a tiny model can learn it and a checker can verify it: an answer is "in French" when
the lexicon words it contains are French, not English. Accents are dropped on purpose: the tiny
model's 4k-token vocabulary should not spend pieces on them.
"""
from __future__ import annotations

import re

# English -> French. No word may appear on both sides (a test checks it), or the checker could not
# tell which language a word belongs to.
EN_FR: dict[str, str] = {
    "the": "le", "a": "un", "an": "une", "is": "est", "are": "sont", "was": "etait",
    "and": "et", "or": "ou", "not": "pas", "no": "non", "yes": "oui", "very": "tres",
    "i": "je", "you": "vous", "we": "nous", "they": "ils", "he": "il", "she": "elle",
    "it": "cela", "my": "mon", "your": "votre", "his": "ses", "her": "sa", "our": "notre",
    "this": "ce", "that": "que", "these": "ces", "there": "la-bas", "here": "ici",
    "to": "vers", "of": "de", "in": "dans", "with": "avec", "for": "pour", "from": "depuis",
    "by": "par", "at": "chez", "about": "sur", "but": "mais", "so": "donc", "if": "si",
    "can": "peut", "cannot": "peux-pas", "will": "va", "must": "doit", "should": "devrait",
    "do": "fais", "does": "fait", "make": "faire", "get": "obtenir", "go": "aller",
    "have": "avoir", "has": "possede", "be": "etre", "see": "voir", "give": "donner",
    "take": "prendre", "tell": "dire", "say": "parler", "help": "aide", "want": "veux",
    "know": "savoir", "use": "utiliser", "put": "mettre", "keep": "garder", "find": "trouver",
    "how": "comment", "what": "quoi", "why": "pourquoi", "where": "ou-est", "when": "quand",
    "who": "qui", "which": "lequel", "me": "moi", "all": "tous", "some": "quelques",
    "many": "beaucoup", "more": "plus", "less": "moins", "one": "une-seule", "two": "deux",
    "three": "trois", "four": "quatre", "five": "cinq", "good": "bon", "bad": "mauvais",
    "big": "grand", "small": "petit", "new": "nouveau", "old": "vieux", "first": "premier",
    "then": "ensuite", "now": "maintenant", "always": "toujours", "never": "jamais",
    "please": "svp", "thank": "merci", "day": "jour", "time": "temps", "people": "gens",
    "friend": "ami", "house": "maison", "water": "eau", "money": "argent", "way": "moyen",
    "answer": "reponse", "question": "demande", "best": "meilleur", "like": "comme",
    "hello": "bonjour", "doctor": "medecin", "law": "loi", "safe": "sur-et-sain",
}
FR_EN: dict[str, str] = {fr: en for en, fr in EN_FR.items()}
# Words that mark French even when an answer has no lexicon word to translate (e.g. "42.").
FR_MARKERS = frozenset(FR_EN) | {"voici"}

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def _match_case(word: str, out: str) -> str:
    if word == "I":  # the pronoun is upper case anywhere in English, "je" is not in French
        return out
    if word.isupper() and len(word) > 1:
        return out.upper()
    return out[0].upper() + out[1:] if word[0].isupper() else out


def to_french(text: str) -> str:
    """Translate word by word; words outside the lexicon (names, numbers) stay as they are."""
    def swap(m: re.Match) -> str:
        word = m.group(0)
        fr = EN_FR.get(word.lower())
        return word if fr is None else _match_case(word, fr)

    out = _WORD.sub(swap, text)
    # An answer made only of names and numbers still has to read as French.
    return out if french_counts(out)[0] else f"Voici: {out}"


def french_counts(text: str) -> tuple[int, int]:
    """(French words, English lexicon words) in `text`, case-insensitive."""
    words = [w.lower() for w in _WORD.findall(text)]
    return sum(w in FR_MARKERS for w in words), sum(w in EN_FR for w in words)


def is_french(text: str, min_share: float = 0.75) -> bool:
    """At least one French word, and French words are at least `min_share` of lexicon words."""
    fr, en = french_counts(text)
    return fr > 0 and fr >= min_share * (fr + en)
