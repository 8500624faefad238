"""Writes a FLAN-format JSONL file of eight small English tasks (real words, generated sentences):
the data of the README's `sparse-engine pretrain` walk-through, and of its test.

    python examples/real_text_tasks.py --rows-per-task 1250 --out runs/real_text.jsonl

Each task has `--rows-per-task` rows. Its test split holds `--test-per-task` distinct questions
(at most a quarter of those the task can ask) and no train row asks one of them. Rows are drawn
with a fixed seed, so the file is the same on every run.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

# noun: plural (irregular ones included on purpose)
NOUNS = {
    "apple": "apples", "baby": "babies", "bicycle": "bicycles", "box": "boxes", "bridge": "bridges",
    "bus": "buses", "child": "children", "church": "churches", "city": "cities", "dish": "dishes",
    "doctor": "doctors", "fish": "fish", "foot": "feet", "garden": "gardens", "glass": "glasses",
    "goose": "geese", "horse": "horses", "knife": "knives", "lady": "ladies", "leaf": "leaves",
    "letter": "letters", "man": "men", "mouse": "mice", "party": "parties", "person": "people",
    "potato": "potatoes", "river": "rivers", "sheep": "sheep", "shelf": "shelves", "story": "stories",
    "teacher": "teachers", "tooth": "teeth", "tomato": "tomatoes", "wife": "wives", "window": "windows",
    "wolf": "wolves", "woman": "women", "village": "villages", "key": "keys", "boy": "boys",
}
# verb: (third person, past)
VERBS = {
    "bring": ("brings", "brought"), "buy": ("buys", "bought"), "carry": ("carries", "carried"),
    "catch": ("catches", "caught"), "clean": ("cleans", "cleaned"), "cook": ("cooks", "cooked"),
    "draw": ("draws", "drew"), "drive": ("drives", "drove"), "find": ("finds", "found"),
    "fix": ("fixes", "fixed"), "hide": ("hides", "hid"), "keep": ("keeps", "kept"),
    "leave": ("leaves", "left"), "lose": ("loses", "lost"), "open": ("opens", "opened"),
    "paint": ("paints", "painted"), "read": ("reads", "read"), "sell": ("sells", "sold"),
    "send": ("sends", "sent"), "take": ("takes", "took"), "throw": ("throws", "threw"),
    "visit": ("visits", "visited"), "wash": ("washes", "washed"), "watch": ("watches", "watched"),
    "write": ("writes", "wrote"), "see": ("sees", "saw"), "break": ("breaks", "broke"),
    "choose": ("chooses", "chose"), "forget": ("forgets", "forgot"), "study": ("studies", "studied"),
}
ADJECTIVES = {  # adjective: (comparative, opposite)
    "big": ("bigger", "small"), "cold": ("colder", "hot"), "dark": ("darker", "light"),
    "early": ("earlier", "late"), "easy": ("easier", "hard"), "fast": ("faster", "slow"),
    "full": ("fuller", "empty"), "happy": ("happier", "sad"), "heavy": ("heavier", "light"),
    "high": ("higher", "low"), "long": ("longer", "short"), "loud": ("louder", "quiet"),
    "new": ("newer", "old"), "rich": ("richer", "poor"), "safe": ("safer", "dangerous"),
    "strong": ("stronger", "weak"), "thick": ("thicker", "thin"), "wet": ("wetter", "dry"),
    "young": ("younger", "old"), "good": ("better", "bad"), "clean": ("cleaner", "dirty"),
    "cheap": ("cheaper", "expensive"), "soft": ("softer", "hard"), "wide": ("wider", "narrow"),
}
COUNTRIES = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa",
    "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Greece": "Athens", "Ireland": "Dublin",
    "Austria": "Vienna", "Chile": "Santiago", "Cuba": "Havana", "Turkey": "Ankara", "Thailand": "Bangkok",
}
NAMES = ("Anna", "Peter", "Maria", "Tom", "Lucy", "David", "Sara", "James", "Emma", "Omar", "Nina", "Paul")
COLOURS = ("red", "green", "blue", "yellow", "black", "white", "brown", "orange")
PLACES = ("the market", "the school", "the station", "the river", "the library", "the park", "the kitchen",
          "the office", "the garden", "the village")
GOOD = ("the food was delicious", "the staff were friendly", "the room was clean and quiet",
        "the music was wonderful", "the price was fair", "we would happily come back",
        "the service was quick", "the view was beautiful")
BAD = ("the food was cold", "the waiter was rude", "the room was dirty and noisy", "the music was awful",
       "the price was far too high", "we will never come back", "the service was slow", "the view was ugly")
ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


def _plural(rng):
    noun = rng.choice(list(NOUNS))
    return f"What is the plural of the noun '{noun}'?", NOUNS[noun]


def _past_sentence(rng):
    name, verb, noun, place = rng.choice(NAMES), rng.choice(list(VERBS)), rng.choice(list(NOUNS)), rng.choice(PLACES)
    now, past = VERBS[verb]
    return (f"Rewrite the sentence in the past tense: {name} {now} the {noun} at {place}.",
            f"{name} {past} the {noun} at {place}.")


def _number_words(rng):
    n = rng.randrange(1000)
    return f"Write the number {n} in words.", number_words(n)


def _opposite(rng):
    adj = rng.choice(list(ADJECTIVES))
    return f"Give the opposite of the adjective '{adj}'.", ADJECTIVES[adj][1]


def _capital(rng):
    country = rng.choice(list(COUNTRIES))
    return f"Which city is the capital of {country}?", COUNTRIES[country]


def _who_bought(rng):
    a, b = rng.sample(NAMES, 2)
    (na, nb), (ca, cb) = rng.sample(list(NOUNS), 2), rng.sample(COLOURS, 2)
    ask = rng.choice((a, b))
    colour, noun = (ca, na) if ask == a else (cb, nb)
    return (f"{a} bought a {ca} {na} and {b} bought a {cb} {nb}. What did {ask} buy?", f"a {colour} {noun}")


def _sentiment(rng):
    positive = rng.random() < 0.5
    parts = rng.sample(GOOD if positive else BAD, 2)
    return (f"Review: {parts[0].capitalize()} and {parts[1]}. Is this review positive or negative?",
            "positive" if positive else "negative")


def _comparative(rng):
    adj = rng.choice(list(ADJECTIVES))
    return f"What is the comparative form of '{adj}'?", ADJECTIVES[adj][0]


TASKS = {"plural": _plural, "past_sentence": _past_sentence, "number_words": _number_words, "opposite": _opposite,
         "capital": _capital, "who_bought": _who_bought, "sentiment": _sentiment, "comparative": _comparative}


def real_text_tasks(rows_per_task: int = 1250, test_per_task: int = 50, seed: int = 0):
    """``{task: TaskData}``: distinct test questions first, then train rows that ask none of them."""
    from sparse_engine.data import Example, TaskData

    if not 0 < test_per_task < rows_per_task:
        raise ValueError(f"test_per_task must be in (0, rows_per_task={rows_per_task}), got {test_per_task}")
    out = {}
    for name, make in TASKS.items():
        rng = random.Random(f"{seed}:{name}")
        questions = {}
        for _ in range(4000):  # what the task can ask (all of it for the small ones)
            source, target = make(rng)
            questions.setdefault(source, target)
        test_sources = rng.sample(sorted(questions), min(test_per_task, len(questions) // 4))
        test = [Example(s, questions[s], name) for s in test_sources]
        held = set(test_sources)
        train = []
        while len(train) < rows_per_task - len(test):
            source, target = make(rng)
            if source not in held:
                train.append(Example(source, target, name))
        out[name] = TaskData(name, train=train, test=test)
    return out


def main(argv=None) -> None:
    from sparse_engine.data import write_flan_jsonl

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-task", type=int, default=1250)
    parser.add_argument("--test-per-task", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/real_text.jsonl")
    args = parser.parse_args(argv)
    path = write_flan_jsonl(real_text_tasks(args.rows_per_task, args.test_per_task, args.seed), Path(args.out))
    print(f"{len(TASKS)} tasks x {args.rows_per_task} rows: {path}")


if __name__ == "__main__":
    main()
