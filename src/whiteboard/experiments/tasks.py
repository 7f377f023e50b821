"""Long-range tasks where the distance between the clue and the answer is a knob.

* **stories** - the seed's own test: "NAME lives in COUNTRY ." then filler sentences,
  then "PRONOUN speaks LANGUAGE ." The fillers say nothing about the country, so the
  language can only come from remembering the clue.
* **adding** - Hochreiter & Schmidhuber (1997): a sequence of values with two marked
  positions; the answer is the sum of the two marked values.
* **copy** - remember a short string of symbols across a blank delay, then recall it.

Every generator is deterministic under a seed (``torch.Generator`` or ``random.Random``).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

import torch
from torch import Tensor

# --------------------------------------------------------------------------- stories

FEMALE_NAMES = """
Alice Amelia Anna Ava Bella Beth Carla Chloe Clara Daisy Diana Eleanor Elena Ella Emily Emma
Erin Eva Fiona Flora Grace Hannah Harriet Helen Holly Ida Iris Isabel Ivy Jane Jasmine Julia
June Kate Laura Leah Lily Lucy Luna Lydia Mabel Maria Martha Maya Megan Mia Molly Nadia Naomi
Nina Nora Olivia Paula Pearl Penny Rachel Rebecca Rita Rosa Rose Ruby Ruth Sara Sophie Stella
Susan Tara Tessa Vera Viola Wendy Yara Zoe Abigail Adele Agnes Alma Amber Anita Bianca Carmen
Celia Cora Dora Edith Elsa Esther Faith Gemma Gina Greta Hazel Heidi Irene Jade Joan Judith
Karen Kira Lara Lena Linda Lisa Lola Mara Marina Marta Mina Monica Nell Olga Petra Phoebe
Priya Quinn Rhea Sabrina Selma Sienna Tina Uma Valerie Wanda Xenia Yvonne Zara Beatrice
Camille Delia Eliza Freya Gloria Imogen Joy Kelly Louise Miriam Noelle Opal Rosalind Thea
""".split()

MALE_NAMES = """
Aaron Adam Alan Albert Alex Andrew Arthur Ben Brian Bruno Caleb Carl Charles Chris Colin Daniel
David Dennis Edward Elias Eric Ethan Felix Frank Fred George Gavin Harry Henry Hugo Ian Isaac
Jack Jacob James Jason Joel John Jonah Joseph Julian Kevin Leo Leon Liam Louis Lucas Luke Marco
Mark Martin Max Michael Miles Nathan Neil Nick Noah Oliver Oscar Owen Patrick Paul Peter
Philip Ralph Ray Robert Roger Ryan Sam Scott Sean Simon Stefan Steven Theo Thomas Tim Tom
Victor Vincent Walter Will Xavier Yusuf Zach Abel Anton Boris Cedric Dmitri Emil Ferdinand
Gordon Hector Igor Ivan Jasper Kurt Lars Magnus Milo Nils Otto Pablo Rafael Rudy Silas Tobias
Ulrich Viktor Wesley Yann Zane Ansel Bernard Clement Dorian Elliot Gideon Horace Ivo Jude
Lionel Matteo Nestor Orson Quentin Rupert Sebastian Tristan Vernon Wilbur
""".split()

COUNTRY_LANGUAGE = {
    "France": "French", "Germany": "German", "Spain": "Spanish", "Italy": "Italian",
    "Portugal": "Portuguese", "Russia": "Russian", "China": "Chinese", "Japan": "Japanese",
    "Greece": "Greek", "Turkey": "Turkish", "Poland": "Polish", "Sweden": "Swedish",
    "Norway": "Norwegian", "Denmark": "Danish", "Finland": "Finnish", "Netherlands": "Dutch",
    "Hungary": "Hungarian", "Korea": "Korean", "Vietnam": "Vietnamese", "Thailand": "Thai",
    "Israel": "Hebrew", "Iran": "Persian", "Ukraine": "Ukrainian", "Czechia": "Czech",
    "Romania": "Romanian", "Iceland": "Icelandic", "Indonesia": "Indonesian", "Brazil": "Portuguese",
    "Mexico": "Spanish", "Austria": "German",
}

_OCCUPATIONS = ("an artist", "a teacher", "a doctor", "a nurse", "an engineer", "a baker", "a pilot",
                "a farmer", "a lawyer", "a writer", "a painter", "a musician", "a chef", "a dentist",
                "an architect", "a plumber", "a librarian", "a scientist", "a carpenter", "a gardener",
                "a student", "a journalist", "a designer", "a programmer", "a singer", "a tailor")
_HOBBIES = ("cook", "paint", "swim", "read", "dance", "sing", "run", "hike", "draw", "knit", "bake",
            "fish", "ski", "write", "garden", "cycle", "climb", "sail", "skate", "juggle")
_FOODS = ("apples", "pasta", "soup", "bread", "cheese", "rice", "salad", "cake", "pizza", "noodles",
          "fish", "chocolate", "pancakes", "beans", "oranges", "carrots", "cookies", "eggs")
_PLACES = ("park", "library", "market", "museum", "beach", "cinema", "garden", "station", "bakery",
           "theatre", "zoo", "river", "harbour", "forest", "school", "gym")
_WEATHER = ("sunny", "cold", "warm", "rainy", "windy", "cloudy", "foggy", "hot", "mild", "grey")
_RELATIVES = ("brother", "sister", "cousin", "uncle", "aunt", "friend", "neighbour", "mother", "father")
_PETS = ("cats", "dogs", "birds", "rabbits", "fish", "hamsters", "turtles")
_NUMBERS = ("two", "three", "four", "five", "six")
_COLORS = ("red", "blue", "green", "black", "white", "yellow", "silver")
_VEHICLES = ("car", "bike", "boat", "scooter", "van")
_DRINKS = ("tea", "coffee", "milk", "juice", "water", "cocoa")
_HOURS = ("six", "seven", "eight", "nine", "ten")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_WHEN = ("", "on weekends", "in the evening", "every day", "with friends", "after work")
_TASTES = ("", "fresh", "warm", "sweet", "spicy", "cold")
_SPAN = ("today", "this week", "in the morning", "again")


# Filler sentences, one chosen uniformly per filler slot. {He}/{he} and {His}/{his} are the
# story's pronouns; every other {slot} is a word drawn from its list, left to right.
_FILLER_TEMPLATES = (
    "{He} is {occupation} .",
    "{He} likes to {hobby} {when} .",
    "{He} enjoys {taste} {food} .",
    "The weather is {weather} {span} .",
    "{His} {relative} is {occupation} .",
    "{He} often goes to the {place} .",
    "{He} has {number} {pet} .",
    "{He} owns a {color} {vehicle} .",
    "{He} drinks {taste} {drink} {when} .",
    "{He} wakes up at {hour} .",
    "On {day} {he} visits the {place} with {his} {relative} .",
    "{He} met {name} at the {place} .",
)
_FILLER_WORDS = {
    "occupation": _OCCUPATIONS, "hobby": _HOBBIES, "when": _WHEN, "taste": _TASTES, "food": _FOODS,
    "weather": _WEATHER, "span": _SPAN, "relative": _RELATIVES, "place": _PLACES, "number": _NUMBERS,
    "pet": _PETS, "color": _COLORS, "vehicle": _VEHICLES, "drink": _DRINKS, "hour": _HOURS, "day": _DAYS,
    "name": FEMALE_NAMES + MALE_NAMES,
}
_SLOT = re.compile(r"\{(\w+)\}")


def _filler(rng: random.Random, pronoun: str, possessive: str) -> list[str]:
    """One filler sentence; none of them carries a hint about the country or language."""
    pronouns = {"He": pronoun, "he": pronoun.lower(), "His": possessive, "his": possessive.lower()}
    template = _FILLER_TEMPLATES[rng.randrange(len(_FILLER_TEMPLATES))]
    words = _SLOT.sub(lambda m: pronouns.get(m.group(1)) or rng.choice(_FILLER_WORDS[m.group(1)]), template)
    return words.split()


@dataclass(frozen=True)
class Story:
    tokens: tuple[str, ...]  # the whole story, ending "LANGUAGE ."
    clue_index: int  # position of COUNTRY
    answer_index: int  # position of LANGUAGE

    @property
    def distance(self) -> int:
        """Tokens from the clue to the answer (the seed's example has 13)."""
        return self.answer_index - self.clue_index

    @property
    def answer(self) -> str:
        return self.tokens[self.answer_index]

    @property
    def prompt(self) -> tuple[str, ...]:
        """Everything up to and including 'speaks'."""
        return self.tokens[: self.answer_index]

    def text(self) -> str:
        return " ".join(self.tokens)


#: Shares of (name, country) pairs held out of training: test pairs appear only in test
#: stories, validation pairs only in validation stories (which choose hyperparameters, such as
#: each model's learning rate; test stories never do).
HELD_OUT = {"test": 0.2, "valid": 0.1}
SPLITS = ("train", "valid", "test")


def split_of(name: str, country: str) -> str:
    """The split a (name, country) pair belongs to, fixed by its hash."""
    share = hashlib.sha256(f"{name}|{country}".encode()).digest()[0] / 256
    if share < HELD_OUT["test"]:
        return "test"
    return "valid" if share < HELD_OUT["test"] + HELD_OUT["valid"] else "train"


def make_story(rng: random.Random, distance: int, split: str = "train") -> Story:
    """One story whose clue-answer distance is ``distance`` tokens or just above it
    (sentences are indivisible), with a (name, country) pair of ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    while True:
        female = rng.random() < 0.5
        name = rng.choice(FEMALE_NAMES if female else MALE_NAMES)
        country = rng.choice(list(COUNTRY_LANGUAGE))
        if split_of(name, country) == split:
            break
    pronoun, possessive = ("She", "Her") if female else ("He", "His")
    tokens = [name, "lives", "in", country, "."]
    clue = 3
    # 'PRONOUN speaks' adds 2 more tokens before the answer.
    while len(tokens) + 2 - clue < distance:
        tokens.extend(_filler(rng, pronoun, possessive))
    tokens.extend([pronoun, "speaks"])
    answer = len(tokens)
    tokens.extend([COUNTRY_LANGUAGE[country], "."])
    return Story(tuple(tokens), clue, answer)


def make_stories(count: int, min_distance: int, max_distance: int, seed: int, split: str = "train") -> list[Story]:
    """``count`` stories with distances drawn uniformly from [min_distance, max_distance]."""
    rng = random.Random(f"{seed}-{split}")
    return [make_story(rng, rng.randint(min_distance, max_distance), split) for _ in range(count)]


SEED_PROMPT = "Alice lives in France . She is an artist . She likes to cook . She speaks"
#: The seed's sentence as a person types it; the stories' vocabulary splits its punctuation
#: off, so it reads as SEED_PROMPT.
SEED_PROMPT_TYPED = "Alice lives in France. She is an artist. She likes to cook. She speaks"
SEED_ANSWER = "French"


def seed_story_tokens() -> list[str]:
    """The seed's own sentence, tokenized as the stories are."""
    return SEED_PROMPT.split()


def long_seed_prompt(min_filler_tokens: int = 100, seed: int = 7) -> str:
    """The seed's clue, then at least ``min_filler_tokens`` tokens of filler, then 'She speaks'."""
    rng = random.Random(seed)
    tokens = "Alice lives in France . She is an artist . She likes to cook .".split()
    while len(tokens) - 5 < min_filler_tokens:
        tokens.extend(_filler(rng, "She", "Her"))
    return " ".join(tokens + ["She", "speaks"])


def filler_sentences(count: int, pronoun: str = "She", possessive: str = "Her", seed: int = 7) -> list[list[str]]:
    """``count`` filler sentences (token lists) from a fixed seed: the first n are the same
    whatever ``count`` is, so a story with n fillers is a prefix of one with n + 1."""
    rng = random.Random(seed)
    return [_filler(rng, pronoun, possessive) for _ in range(count)]


def story_vocabulary_tokens() -> list[str]:
    """Every token a story can contain, in a fixed order (no <unk> needed)."""
    words: list[str] = []
    words += ["lives", "in", ".", "speaks", "She", "He", "Her", "His", "she", "he", "her", "his"]
    words += list(COUNTRY_LANGUAGE) + sorted(set(COUNTRY_LANGUAGE.values()))
    words += FEMALE_NAMES + MALE_NAMES
    fixed = ("is likes to enjoys The weather today often goes the has owns a an drinks every morning "
             "wakes up at On visits with met").split()
    words += fixed
    for group in (_OCCUPATIONS, _HOBBIES, _FOODS, _PLACES, _WEATHER, _RELATIVES, _PETS, _NUMBERS, _COLORS,
                  _VEHICLES, _DRINKS, _HOURS, _DAYS, _WHEN, _TASTES, _SPAN):
        for phrase in group:
            words += phrase.split()
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)


# --------------------------------------------------------------------------- adding


def adding_batch(batch: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(T, B, 2) inputs [value, marker] and (B,) targets, the sum of the two marked values.

    One marker falls in the first half of the sequence and one in the second, so the
    first must be held for about T/2 steps or more. Predicting the mean (1.0) gives
    RMSE about 0.41; Hochreiter & Schmidhuber count an answer right within 0.04.
    """
    values = torch.rand(length, batch, generator=generator)
    markers = torch.zeros(length, batch)
    half = length // 2
    first = torch.randint(0, half, (batch,), generator=generator)
    second = torch.randint(half, length, (batch,), generator=generator)
    columns = torch.arange(batch)
    markers[first, columns] = 1.0
    markers[second, columns] = 1.0
    targets = values[first, columns] + values[second, columns]
    return torch.stack((values, markers), dim=-1), targets


# --------------------------------------------------------------------------- copy

COPY_SYMBOLS = 8  # symbols 1..8; 0 is blank, 9 the "recall now" marker
COPY_BLANK = 0
COPY_MARKER = 9
COPY_VOCAB = 10


def copy_batch(batch: int, delay: int, generator: torch.Generator, length: int = 10) -> tuple[Tensor, Tensor]:
    """(T, B) inputs and targets for the copy task, T = 2·length + delay.

    input:  s_1 … s_L, blank × (delay - 1), marker, blank × L
    target: blank × (L + delay), s_1 … s_L
    Guessing gives 1/8 per symbol.
    """
    symbols = torch.randint(1, COPY_SYMBOLS + 1, (length, batch), generator=generator)
    blank = lambda n: torch.full((n, batch), COPY_BLANK, dtype=torch.long)  # noqa: E731
    marker = torch.full((1, batch), COPY_MARKER, dtype=torch.long)
    inputs = torch.cat((symbols, blank(delay - 1), marker, blank(length)))
    targets = torch.cat((blank(length + delay), symbols))
    return inputs, targets
