"""A seeded synthetic crowd of mixed quality, and the target it is judged against.

The target ("expert") answers everyday questions in a recognisable voice: a cheerful
pirate who still answers the question. Contributors come in four kinds:

* ``expert-like``: the target's voice and on-topic content (what the tournament should find);
* ``noisy``: the right voice, but often about the wrong topic;
* ``off-style``: on-topic, in a flat encyclopaedic voice;
* ``spammer``: junk and advertising.

Everything is generated from templates with a ``random.Random(seed)``: the same seed gives
the same crowd, byte for byte. No example appears twice in a crowd (the coordinator would
reject the second as a copy).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from crowdsft.validation import example_fingerprint

TOPICS = [
    "the ocean",
    "a cat",
    "coffee",
    "a bicycle",
    "the moon",
    "a library",
    "rain",
    "a garden",
    "bread",
    "a map",
    "the wind",
    "a lighthouse",
    "music",
    "snow",
    "a clock",
    "an island",
    "tea",
    "a candle",
    "the stars",
    "a bridge",
]
QUESTIONS = [
    "Tell me about {t}.",
    "What do you think of {t}?",
    "Describe {t} in a sentence.",
    "Why do people like {t}?",
]
PIRATE = [
    "Arr, {t} be a fine treasure, matey! I'd sail the seven seas for {t}.",
    "Yo ho! {T} be worth more than gold to an old sea dog like me, arr!",
    "Shiver me timbers, {t} be a wonder! Every pirate needs {t}, matey.",
    "Avast! {T} be a grand thing, and any buccaneer worth his salt knows it, arr.",
]
FLAT = [
    "{T} is a common subject. It has been described in many reference works.",
    "{T} can be characterised by several properties that are well documented.",
    "Many people are familiar with {t}. It is discussed in various contexts.",
]
SPAM = [
    "BUY NOW",
    "click here",
    "$$$ free money $$$",
    "limited offer",
    "www.spam.example",
    "100% guaranteed",
    "subscribe!!!",
    "crypto giveaway",
]
KINDS = ("expert-like", "noisy", "off-style", "spammer")


@dataclass(frozen=True)
class Contributor:
    name: str
    kind: str
    examples: list[dict[str, str]]


def _fill(template: str, topic: str) -> str:
    return template.format(t=topic, T=topic[0].upper() + topic[1:])


def target_set(n_prompts: int = 6, seed: int = 0) -> list[dict[str, str]]:
    """Evaluation prompts with expert responses (topics the crowd also writes about)."""
    rng = random.Random(f"target-{seed}")
    topics = rng.sample(TOPICS, n_prompts)
    return [
        {"prompt": _fill(rng.choice(QUESTIONS), t), "response": _fill(rng.choice(PIRATE), t)}
        for t in topics
    ]


def make_crowd(
    seed: int = 0,
    counts: dict[str, int] | None = None,
    examples_each: int = 8,
) -> list[Contributor]:
    """The synthetic crowd, in a seeded random order."""
    counts = counts or {"expert-like": 3, "noisy": 3, "off-style": 3, "spammer": 3}
    rng = random.Random(f"crowd-{seed}")
    crowd = []
    seen: set[bytes] = set()  # contributors are distinct people: no example appears twice
    for kind in KINDS:
        for i in range(counts.get(kind, 0)):
            examples = []
            for t in rng.sample(TOPICS, examples_each):
                for _ in range(100):
                    q = _fill(rng.choice(QUESTIONS), t)
                    if kind == "expert-like":
                        a = _fill(rng.choice(PIRATE), t)
                    elif kind == "noisy":
                        other = rng.choice(TOPICS) if rng.random() < 0.6 else t
                        a = _fill(rng.choice(PIRATE), other)
                    elif kind == "off-style":
                        a = _fill(rng.choice(FLAT), t)
                    else:
                        a = " ".join(rng.choice(SPAM) for _ in range(rng.randint(4, 9)))
                    fp = example_fingerprint(q, a)
                    if fp not in seen:
                        break
                seen.add(fp)
                examples.append({"prompt": q, "response": a})
            crowd.append(Contributor(f"{kind}-{i + 1}", kind, examples))
    rng.shuffle(crowd)
    return crowd
