"""Synthetic knowledge tasks: seeded fictional facts that a tiny model learns in seconds and forgets visibly.

This is the embedded default of the project (no downloads). There is one "old" domain, which the base model
is pre-trained on before any round, and one domain per round (default 4). A domain is a set of fictional
people; a fact is one of four attributes of one person, asked with a fixed template and answered with one
word:

    "Where was Kalo Rivan born?"  -> "Ostmere"      (place)
    "What does Kalo Rivan eat?"   -> "frostnut"     (food)
    "What is Kalo Rivan's pet?"   -> "moonhare"     (pet)
    "Which guild is Kalo Rivan in?" -> "Tanners"    (guild)

Why it is learnable quickly. Each example is short: names are 10 bytes ("Kalo Rivan"), questions 25-29
bytes, answers 5-9 bytes, so at most 38 bytes of text (34 on average) and at most 40 byte-level tokens with
BOS and EOS; about seven examples pack into a 256-token row. Each fact is a lookup from a name and one of
four templates to one of 16 answers per attribute, i.e. 4 bits; the default 64 facts per domain (16 people
x 4 attributes) are 256 bits, far below the capacity of a model of about 1M parameters. Measured with a
0.67M-parameter Llama (hidden 128, 4 layers, byte tokenizer, AdamW lr 3e-3, batch 8 x 256 packed tokens):
exact match 1.0 on a fresh domain after 150 steps (training loss 0.005 after 100 steps), about 0.3 s per
step on 2 CPU cores. With 128 facts per domain, 300 steps gave exact match 0.83.

Why forgetting shows. Every domain uses the same four templates, the same answer vocabularies and names
built from the same syllables; only the people differ. Learning a new domain with full fine-tuning rewrites
the same name -> attribute associations in the same weights, so the earlier domain's exact match drops
unless something (replay, LoRA, merging) protects it. Measured with the model above (150 steps on the old
domain from scratch, then 150 steps of full fine-tuning on round 1): old-domain exact match 1.0 -> 0.02,
round 1 0.0 -> 1.0. No question is shared between domains (names are unique across all domains), so joint
training on the union has no contradictory facts.

Splits. Knowledge is measured on the facts that were trained; `test_template` says how they are asked:
- `same` (the tiny default): `test` (and `eval`, identical) ask the same questions as `train`, so a score
  is "was the fact acquired / kept".
- `paraphrase`: the same facts with another wording ("Kalo Rivan was born where?"), a generalisation test
  that tiny models usually fail.
- `heldout` (for pretrained models): `train` asks every fact with each of three phrasings ("Where was Kalo
  Rivan born?", "In which town was Kalo Rivan born?", "What is the birthplace of Kalo Rivan?"), and `test`
  asks it with a fourth that training never used ("Name the town where Kalo Rivan was born."). A score is
  then "does the model know the fact", not "does it recall a training string". Measured with
  SmolLM2-135M-Instruct (chat template, constant lr, 20 steps of 8 x 128 packed tokens over 16 facts):
  held-out exact match 0.0 -> 0.88 with LoRA rank 8 at lr 2e-3 (||dW|| / ||W|| 1.1%) and 0.0 -> 1.0 with
  full fine-tuning at lr 1e-4 (0.3%).
Scored by `exact_match`; `max_new_tokens` is 16 (answers are at most 9 byte tokens plus EOS).

Determinism. Everything comes from `random.Random(seed)`; domains are drawn in order (old, round1, ...), so
for a given seed and `facts_per_domain`, domain k is the same whatever `num_rounds` is.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from jaxcollab.data.tasks import SPLITS, Example, Task

__all__ = [
    "ATTRIBUTES",
    "Fact",
    "SyntheticDomain",
    "synthetic_domains",
    "synthetic_tasks",
]

_ONSETS = ("k", "l", "m", "r", "z", "t", "v", "n", "s", "p", "d", "b", "f", "g")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("n", "r", "s", "x", "l")


@dataclass(frozen=True)
class Attribute:
    """One kind of fact: its question templates and its answer vocabulary.

    `template` is the question of the `same` and `paraphrase` modes; `heldout` mode trains on `template` and
    `train_variants` and tests on `heldout_template`.
    """

    key: str
    template: str
    paraphrase: str
    values: tuple[str, ...]
    train_variants: tuple[str, ...] = ()
    heldout_template: str = ""

    @property
    def train_templates(self) -> tuple[str, ...]:
        return (self.template, *self.train_variants)


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("place", "Where was {name} born?", "{name} was born where?",
              ("Vantor", "Quelbrin", "Ostmere", "Drakwell", "Pellow", "Zandor", "Mirabel", "Kestrin",
               "Tolvane", "Briskol", "Orlun", "Yarrow", "Felgate", "Umbrin", "Carrow", "Sildor"),
              train_variants=("In which town was {name} born?", "What is the birthplace of {name}?"),
              heldout_template="Name the town where {name} was born."),
    Attribute("food", "What does {name} eat?", "{name} eats what?",
              ("glimberry", "sporecake", "frostnut", "emberroot", "mossbread", "duskplum", "sunmelon",
               "brinekelp", "ashgrain", "dewpear", "coalbean", "mistfig", "thornrice", "glowleek", "saltapple",
               "reedcorn"),
              train_variants=("What is {name}'s favourite food?", "Which food does {name} like to eat?"),
              heldout_template="What food does {name} enjoy eating most?"),
    Attribute("pet", "What is {name}'s pet?", "{name} keeps which pet?",
              ("skitter", "moonhare", "fernfox", "cinderowl", "glassfrog", "dunemole", "stormtoad", "reefmouse",
               "ivyboar", "pebbledog", "wispbat", "mirefowl", "snowcrab", "hazelyak", "quillhog", "brambleox"),
              train_variants=("Which animal does {name} keep as a pet?", "What kind of pet does {name} have?"),
              heldout_template="{name} owns which pet?"),
    Attribute("guild", "Which guild is {name} in?", "{name} is in which guild?",
              ("Weavers", "Tinkers", "Masons", "Glaziers", "Brewers", "Carvers", "Smiths", "Dyers", "Coopers",
               "Fletchers", "Tanners", "Potters", "Scribes", "Millers", "Farriers", "Chandlers"),
              train_variants=("What guild does {name} belong to?", "{name} is a member of which guild?"),
              heldout_template="Name the guild that {name} joined."),
)
MAX_NEW_TOKENS = 16
TEST_TEMPLATES = ("same", "paraphrase", "heldout")


@dataclass(frozen=True)
class Fact:
    """`name`'s `attribute` is `value`."""

    name: str
    attribute: str
    value: str

    def question(self, paraphrase: bool = False) -> str:
        spec = _ATTRIBUTE_BY_KEY[self.attribute]
        return (spec.paraphrase if paraphrase else spec.template).format(name=self.name)

    def questions(self, split: str, test_template: str) -> list[str]:
        """How the fact is asked in `split` under `test_template` (see the module docstring)."""
        spec = _ATTRIBUTE_BY_KEY[self.attribute]
        if test_template == "heldout":
            templates = spec.train_templates if split == "train" else (spec.heldout_template,)
            return [t.format(name=self.name) for t in templates]
        return [self.question(paraphrase=split != "train" and test_template == "paraphrase")]


_ATTRIBUTE_BY_KEY = {a.key: a for a in ATTRIBUTES}


@dataclass(frozen=True)
class SyntheticDomain:
    """A named set of facts with train / eval / test examples."""

    name: str
    facts: tuple[Fact, ...]
    test_template: str = "same"

    def examples(self, split: str) -> list[Example]:
        if split not in SPLITS:
            raise ValueError(f"domain {self.name}: unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return [{"prompt": question, "answer": fact.value}
                for fact in self.facts for question in fact.questions(split, self.test_template)]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS)


def _draw_name(rng: random.Random) -> str:
    first = _syllable(rng) + _syllable(rng)
    last = _syllable(rng) + _syllable(rng) + rng.choice(_CODAS)
    return f"{first.capitalize()} {last.capitalize()}"


def synthetic_domains(num_rounds: int = 4, seed: int = 0, facts_per_domain: int = 64,
                      test_template: str = "same") -> list[SyntheticDomain]:
    """`[old, round1, ..., round{num_rounds}]`, each with `facts_per_domain` facts about its own people."""
    if num_rounds < 0:
        raise ValueError(f"num_rounds must be >= 0, got {num_rounds}")
    if not 1 <= facts_per_domain <= 4096:
        raise ValueError(f"facts_per_domain must be in 1..4096, got {facts_per_domain}")
    if test_template not in TEST_TEMPLATES:
        raise ValueError(f"unknown test_template {test_template!r}; valid: {', '.join(TEST_TEMPLATES)}")
    rng = random.Random(seed)
    used_names: set[str] = set()
    people_per_domain = -(-facts_per_domain // len(ATTRIBUTES))
    domains = []
    for index in range(num_rounds + 1):
        names = []
        while len(names) < people_per_domain:
            name = _draw_name(rng)
            if name not in used_names:
                used_names.add(name)
                names.append(name)
        facts = [Fact(name, spec.key, rng.choice(spec.values)) for name in names for spec in ATTRIBUTES]
        rng.shuffle(facts)
        domain_name = "synthetic/old" if index == 0 else f"synthetic/round{index}"
        domains.append(SyntheticDomain(domain_name, tuple(facts[:facts_per_domain]), test_template))
    return domains


def synthetic_tasks(num_rounds: int = 4, seed: int = 0, facts_per_domain: int = 64,
                    test_template: str = "same") -> list[Task]:
    """The synthetic domains as registry tasks (metric `exact_match`), in order old, round1, ...."""
    tasks = []
    for domain in synthetic_domains(num_rounds, seed, facts_per_domain, test_template):
        tasks.append(Task(
            name=domain.name,
            metric="exact_match",
            max_new_tokens=MAX_NEW_TOKENS,
            read=domain.examples,
            description=f"{len(domain.facts)} fictional facts (seed {seed}, test template {test_template!r})",
        ))
    return tasks
