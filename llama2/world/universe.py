"""The built-in universe: a small, consistent world of people, places, animals and things.

Everything the world generates (corpus, tasks, prompts, graders' references) is derived from one
`Universe`, built deterministically from a seed. The vocabulary is deliberately small and made of
short common words, so that a ~3M-parameter model pretrained for a few CPU minutes can learn it.

People and places are partitioned into train / test / eval: the eval split's entities never occur
in training dialogs or prompts (their facts are still in the pretraining corpus, so evaluation
measures whether the model carries pretraining knowledge into chat). Animals, things and words are
shared; their task instances are split by `Universe.split_of(key)`, a hash of the instance key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass, field

SPLITS = ("train", "test", "eval")
SIZES = ("tiny", "small", "medium")

# Entity counts per size. People dominate the fact load: 8 facts each, stated many times in the
# corpus; `tiny` keeps ~800 person facts so a 3M model can memorise most of them in ~1,500 steps.
SIZE_COUNTS: dict[str, dict[str, int]] = {
    "tiny": {"people": 100, "places": 30},
    "small": {"people": 300, "places": 60},
    "medium": {"people": 1000, "places": 150},
}
# Share of people/places (and of hashed task instances) per split: train / test / eval.
SPLIT_SHARES = (0.70, 0.10, 0.20)

# Names are short and unambiguous (no "Rose", "Joy", "Jack": they are also ordinary words here).
FEMALE_NAMES = """Ann Amy Ava Bea Cara Dora Eva Ella Emma Fay Gina Hana Ida Jane Jill Kate Lea Lucy
Mia Mary Nell Nina Nora Olga Pam Pia Rita Rosa Ruth Sara Tess Tina Una Vera Wendy Zoe Alma Bess
Cleo Edna Greta Hilda Kara Lena Maud Mona Nadia Polly Rhea Sofia Tara Uma Yara Zara Elsa Gwen Anya
Beth Clara Erin Freya Inga Judy Kira Lola Mira Petra Rina Selma Thea Ulla Vida Wanda""".split()
MALE_NAMES = """Tom Bob Sam Ben Dan Max Leo Tim Jim Joe Ned Ted Ken Ron Roy Ray Hal Ian Jon Kai Lou
Otto Paul Pete Sid Stan Vic Walt Zack Abe Alf Carl Dave Eli Finn Gus Hugo Igor Karl Luke Milo Noah
Omar Oscar Pablo Raul Seth Theo Ugo Vito Wade Yuri Zeke Adam Boris Cyril Dirk Emil Felix Glen Hans
Ivan Jasper Kurt Lars Nils Olaf Rolf Sven Tobias Viktor""".split()
NEUTRAL_NAMES = """Alex Jo Kim Lee Pat Rae Jules Remy Sasha Noel Eden Jody Kris Dana Quinn Ari Devon
Jamie Shay Robin""".split()
SURNAMES = """Stone Hill Brook Wood Field Moss Reed Ford Marsh Dale Shaw Hale Wells Price Cole Park
Rowe Page Hart Blake Dunn Frost Grant Hayes Kent Lowe Mills Nash Pike Quill Ross Snow Tate Vance
Webb Yates Ames Burns Croft Eaton Gale Holt Irwin Joyce Keane Lyle Moore Noble Olsen Penn Rhodes
Sharp Todd Upton Voss Ward York""".split()

PLACE_PREFIXES = """Oak Ash Elm Pine Birch Mill Stone Fair Long High Brook Clay Fern Glen Kings Lark
Marsh Moor Sand Thorn Wind Bright Cold Deep Dun Hay Lime Rye Wheat Willow""".split()
PLACE_SUFFIXES = "ton ford field wick by ham stead mouth well bury dale wood port gate bridge".split()
PLACE_KINDS = ("town", "village", "city")
# (phrase used in sentences, the core word a grader looks for)
PLACE_NEAR = (("the sea", "sea"), ("a river", "river"), ("the hills", "hills"), ("a forest", "forest"),
              ("a lake", "lake"), ("the mountains", "mountains"), ("a marsh", "marsh"))
REGIONS = ("north", "south", "east", "west")
FAMOUS_FOR = """cheese apples honey bread pies plums bells boats kites clocks hats drums lamps rugs
baskets candles""".split()

JOBS = """baker farmer teacher doctor nurse pilot cook driver painter singer writer builder fisher
tailor dentist vet judge miner sailor clerk guard gardener plumber barber potter actor artist
engineer banker dancer florist grocer librarian mechanic poet waiter""".split()
# hobby -> the verb a person may use instead ("Tom likes to swim" answers "swimming" correctly)
HOBBIES = {
    "swimming": "swim", "fishing": "fish", "painting": "paint", "dancing": "dance", "singing": "sing",
    "reading": "read", "running": "run", "hiking": "hike", "knitting": "knit", "gardening": "garden",
    "cooking": "cook", "skating": "skate", "drawing": "draw", "climbing": "climb", "rowing": "row",
    "baking": "bake", "sewing": "sew", "cycling": "cycle", "sailing": "sail", "juggling": "juggle",
    "camping": "camp", "surfing": "surf", "skiing": "ski", "bowling": "bowl", "whistling": "whistle",
}
COLOURS = "red blue green yellow black white pink purple orange brown grey gold".split()
FOODS = """bread soup rice cheese apples pears cake pasta eggs plums beans honey pie jam nuts grapes
figs peas corn toast melon cherries pancakes noodles""".split()


@dataclass(frozen=True)
class Animal:
    name: str
    legs: int
    sound: str | None  # what it "says"; None where no simple sound word exists
    habitat: str  # phrase: "on farms"
    habitat_core: str  # the word a grader looks for: "farms"
    food: str


# Fixed, real-world-ish facts: the same in every seed (the world's "common knowledge").
ANIMALS = tuple(Animal(*row) for row in (
    ("cat", 4, "meow", "in houses", "houses", "fish"),
    ("dog", 4, "woof", "in houses", "houses", "bones"),
    ("cow", 4, "moo", "on farms", "farms", "grass"),
    ("horse", 4, "neigh", "on farms", "farms", "hay"),
    ("sheep", 4, "baa", "in fields", "fields", "grass"),
    ("pig", 4, "oink", "on farms", "farms", "corn"),
    ("goat", 4, "maa", "on hills", "hills", "leaves"),
    ("duck", 2, "quack", "on ponds", "ponds", "weeds"),
    ("hen", 2, "cluck", "on farms", "farms", "seeds"),
    ("owl", 2, "hoot", "in the forest", "forest", "mice"),
    ("crow", 2, "caw", "in fields", "fields", "worms"),
    ("frog", 4, "ribbit", "in ponds", "ponds", "flies"),
    ("bee", 6, "buzz", "in hives", "hives", "nectar"),
    ("ant", 6, None, "in nests", "nests", "crumbs"),
    ("spider", 8, None, "in webs", "webs", "flies"),
    ("snake", 0, "hiss", "in the grass", "grass", "mice"),
    ("fish", 0, None, "in rivers", "rivers", "worms"),
    ("mouse", 4, "squeak", "in fields", "fields", "seeds"),
    ("rabbit", 4, None, "in burrows", "burrows", "carrots"),
    ("lion", 4, "roar", "on the plains", "plains", "meat"),
    ("wolf", 4, "howl", "in the forest", "forest", "meat"),
    ("bear", 4, "growl", "in the woods", "woods", "berries"),
    ("fox", 4, "yip", "in dens", "dens", "rabbits"),
    ("crab", 10, None, "on the beach", "beach", "weed"),
    ("snail", 0, None, "in gardens", "gardens", "leaves"),
    ("parrot", 2, "squawk", "in the jungle", "jungle", "fruit"),
    ("turtle", 4, None, "in ponds", "ponds", "plants"),
    ("donkey", 4, "bray", "on farms", "farms", "hay"),
    ("camel", 4, None, "in the desert", "desert", "dates"),
    ("hamster", 4, "squeak", "in cages", "cages", "seeds"),
))
PET_ANIMALS = ("cat", "dog", "rabbit", "fish", "hamster", "parrot", "turtle", "mouse", "duck", "goat",
               "horse", "snake", "frog", "hen")


@dataclass(frozen=True)
class Thing:
    name: str
    use: str  # phrase: "drinking"
    use_words: tuple[str, ...]  # words that show the use was understood ("drinking", "drink")
    material: str


THINGS = tuple(Thing(*row) for row in (
    ("cup", "drinking", ("drinking", "drink"), "clay"),
    ("mug", "drinking", ("drinking", "drink"), "clay"),
    ("spoon", "eating soup", ("eating", "eat", "soup"), "metal"),
    ("fork", "eating", ("eating", "eat"), "metal"),
    ("pen", "writing", ("writing", "write"), "plastic"),
    ("key", "opening doors", ("opening", "open", "doors", "unlock"), "metal"),
    ("clock", "telling the time", ("telling", "time"), "wood"),
    ("lamp", "giving light", ("giving", "light"), "glass"),
    ("bike", "riding", ("riding", "ride"), "metal"),
    ("kite", "flying", ("flying", "fly"), "paper"),
    ("chair", "sitting", ("sitting", "sit"), "wood"),
    ("bed", "sleeping", ("sleeping", "sleep"), "wood"),
    ("broom", "sweeping", ("sweeping", "sweep"), "straw"),
    ("drum", "making music", ("making", "music"), "wood"),
    ("bag", "carrying things", ("carrying", "carry"), "cloth"),
    ("hat", "covering your head", ("covering", "head"), "straw"),
    ("coat", "keeping warm", ("keeping", "warm"), "wool"),
    ("boat", "crossing water", ("crossing", "water"), "wood"),
    ("bell", "ringing", ("ringing", "ring"), "metal"),
    ("ball", "playing games", ("playing", "play", "games"), "rubber"),
    ("book", "reading", ("reading", "read"), "paper"),
    ("box", "storing things", ("storing", "store"), "card"),
    ("candle", "giving light", ("giving", "light"), "wax"),
    ("umbrella", "keeping dry", ("keeping", "dry", "rain"), "cloth"),
))
OWNED_THINGS = ("bike", "kite", "hat", "coat", "bag", "ball", "boat", "cup", "lamp", "drum", "umbrella",
                "mug", "book", "box", "clock", "bell")
MATERIALS = sorted({t.material for t in THINGS})

# Unit conversions: (big unit singular, big plural, small unit plural, factor). Every factor is
# an integer so that both directions have exact integer answers.
UNITS = (
    ("metre", "metres", "centimetres", 100),
    ("kilometre", "kilometres", "metres", 1000),
    ("kilogram", "kilograms", "grams", 1000),
    ("litre", "litres", "millilitres", 1000),
    ("hour", "hours", "minutes", 60),
    ("minute", "minutes", "seconds", 60),
    ("day", "days", "hours", 24),
    ("week", "weeks", "days", 7),
    ("year", "years", "months", 12),
    ("dozen", "dozen", "eggs", 12),
)

# Extra ordinary words for string and counting tasks (with the entity words above).
EXTRA_WORDS = """apple garden river window table water summer winter happy yellow pencil orange
market bridge forest letter silver number candle basket dinner button rabbit pocket ladder
jacket monkey island tomato planet rocket carpet velvet meadow""".split()


@dataclass(frozen=True)
class Person:
    name: str
    pronoun: str  # "she" | "he" | "they"
    age: int
    home: str  # a Place name
    job: str
    pet: str  # an Animal name
    hobby: str
    colour: str  # favourite colour
    food: str  # favourite food
    thing: str  # an owned Thing ...
    thing_colour: str  # ... and its colour
    split: str


@dataclass(frozen=True)
class Place:
    name: str
    kind: str
    near: str  # phrase: "the sea"
    near_core: str  # "sea"
    region: str
    famous: str  # "cheese": "famous for its cheese"
    split: str


PRONOUNS = {  # subject, object, possessive
    "she": ("she", "her", "her"),
    "he": ("he", "him", "his"),
    "they": ("they", "them", "their"),
}


def article(word: str) -> str:
    """'a' or 'an' for a noun phrase (by its first letter; good enough for this vocabulary)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def with_article(word: str) -> str:
    return f"{article(word)} {word}"


def _stable_unit(text: str) -> float:
    """A uniform number in [0, 1) from a string, identical across runs and platforms."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _partition(items: list, rng: random.Random) -> list[str]:
    """Assign a split to each item in proportion to SPLIT_SHARES (at least one each)."""
    n = len(items)
    n_test = max(1, round(n * SPLIT_SHARES[1]))
    n_eval = max(1, round(n * SPLIT_SHARES[2]))
    labels = ["train"] * (n - n_test - n_eval) + ["test"] * n_test + ["eval"] * n_eval
    rng.shuffle(labels)
    return labels


@dataclass
class Universe:
    seed: int
    size: str
    people: list[Person]
    places: list[Place]
    animals: tuple[Animal, ...] = ANIMALS
    things: tuple[Thing, ...] = THINGS
    words: list[str] = field(default_factory=list)
    _by_name: dict = field(default_factory=dict, repr=False, compare=False)
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # derived data (facts.py)

    def __post_init__(self):
        self._by_name = {p.name: p for p in self.people}
        self._by_name.update({p.name: p for p in self.places})
        self._by_name.update({a.name: a for a in self.animals})
        self._by_name.update({t.name: t for t in self.things})

    def get(self, name: str):
        return self._by_name[name]

    def people_in(self, split: str) -> list[Person]:
        return [p for p in self.people if p.split == split]

    def places_in(self, split: str) -> list[Place]:
        return [p for p in self.places if p.split == split]

    def residents(self, place: str) -> list[Person]:
        return [p for p in self.people if p.home == place]

    def split_of(self, key: str) -> str:
        """The split of a task instance (e.g. "add:23:45"): a seeded hash, so it never changes."""
        u = _stable_unit(f"{self.seed}:{key}")
        if u < SPLIT_SHARES[0]:
            return "train"
        return "test" if u < SPLIT_SHARES[0] + SPLIT_SHARES[1] else "eval"

    def counts(self) -> dict[str, int]:
        out = {"people": len(self.people), "places": len(self.places), "animals": len(self.animals),
               "things": len(self.things), "words": len(self.words)}
        for split in SPLITS:
            out[f"people_{split}"] = len(self.people_in(split))
            out[f"places_{split}"] = len(self.places_in(split))
        return out

    def to_dict(self) -> dict:
        """JSON-ready description (written to world.json); `Universe.from_dict` reads it back."""
        return {"seed": self.seed, "size": self.size,
                "people": [dataclasses.asdict(p) for p in self.people],
                "places": [dataclasses.asdict(p) for p in self.places],
                "words": list(self.words)}

    @classmethod
    def from_dict(cls, d: dict) -> Universe:
        return cls(seed=d["seed"], size=d["size"], people=[Person(**p) for p in d["people"]],
                   places=[Place(**p) for p in d["places"]], words=list(d["words"]))


def _person_names(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """n distinct (name, pronoun): single first names while they last, else "First Last"."""
    pool = [(x, "she") for x in FEMALE_NAMES] + [(x, "he") for x in MALE_NAMES]
    pool += [(x, "they") for x in NEUTRAL_NAMES]
    if n <= len(pool):
        return rng.sample(pool, n)
    full = [(f"{first} {last}", pro) for first, pro in pool for last in SURNAMES]
    if n > len(full):
        raise ValueError(f"at most {len(full)} people can be named, asked for {n}")
    return rng.sample(full, n)


def _place_names(n: int, rng: random.Random) -> list[str]:
    pool = [p + s for p in PLACE_PREFIXES for s in PLACE_SUFFIXES]
    if n > len(pool):
        raise ValueError(f"at most {len(pool)} places can be named, asked for {n}")
    return rng.sample(pool, n)


def build_universe(seed: int, size: str = "tiny") -> Universe:
    """The universe for `seed` at `size` (tiny | small | medium); the same seed gives the same world."""
    if size not in SIZE_COUNTS:
        raise ValueError(f"unknown world size {size!r} (choose from {', '.join(SIZES)})")
    counts = SIZE_COUNTS[size]
    rng = random.Random(f"universe:{seed}:{size}")

    place_names = _place_names(counts["places"], rng)
    place_splits = _partition(place_names, rng)
    places = []
    for name, split in zip(place_names, place_splits):
        near, core = rng.choice(PLACE_NEAR)
        places.append(Place(name=name, kind=rng.choice(PLACE_KINDS), near=near, near_core=core,
                            region=rng.choice(REGIONS), famous=rng.choice(FAMOUS_FOR), split=split))

    names = _person_names(counts["people"], rng)
    person_splits = _partition(names, rng)
    people = []
    for (name, pronoun), split in zip(names, person_splits):
        # People live in places of their own split, so a held-out place's name never reaches
        # training dialogs through a training person's home.
        home = rng.choice([p for p in places if p.split == split]).name
        people.append(Person(
            name=name, pronoun=pronoun, age=rng.randint(18, 80), home=home, job=rng.choice(JOBS),
            pet=rng.choice(PET_ANIMALS), hobby=rng.choice(sorted(HOBBIES)), colour=rng.choice(COLOURS),
            food=rng.choice(FOODS), thing=rng.choice(OWNED_THINGS), thing_colour=rng.choice(COLOURS),
            split=split))

    words = sorted({a.name for a in ANIMALS} | {t.name for t in THINGS} | set(FOODS) | set(COLOURS)
                   | set(JOBS) | set(EXTRA_WORDS))
    return Universe(seed=seed, size=size, people=people, places=places, words=words)
