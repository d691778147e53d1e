"""Generate ``toy_preferences.jsonl``, the small preference dataset shipped with prefixshare.

Run from the repository root to regenerate the shipped file (the output is deterministic for a seed)::

    python -m prefixshare.data.generate            # writes prefixshare/data/toy_preferences.jsonl

Every example is ``{"prompt", "chosen", "rejected", "task"}`` (strings). Six small tasks, each with a
chosen answer that is correct and a rejected answer that makes the same *systematic* mistake every time,
so that a tiny model trained with DPO from scratch can learn to prefer the chosen side within a few dozen
steps on a CPU:

=========  ====================================================  ===============================
task       prompt (abridged)                                     rejected answer
=========  ====================================================  ===============================
upper      rewrite the text in capital letters                   the text unchanged
reverse    write the word backwards                              the word unchanged
sort       sort the letters alphabetically                       sorted in reverse
sequence   next two terms of an arithmetic sequence              the last term repeated
add        add two 2-digit numbers (always with a carry)         the sum without the carry
larger     which of two numbers is larger                        the smaller one
=========  ====================================================  ===============================

Prompts (60-100 characters) are several times longer than the answers (2-16 characters), as in real
preference data, which is where prefix sharing saves compute. The text is plain ASCII, for the
character-level tokenizer of :func:`prefixshare.data.toy_tokenizer`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_PATH = Path(__file__).with_name("toy_preferences.jsonl")
DEFAULT_SIZE = 2000
DEFAULT_SEED = 0

WORDS = (
    "apple river planet garden window yellow silver morning winter summer forest castle pencil "
    "button candle rabbit dragon orange purple market rocket bridge island turtle spider basket "
    "little simple gentle honest bright quiet cloudy stormy sunny frozen golden wooden paper "
    "stone cloud ocean mountain valley desert meadow harbor tunnel ladder mirror pillow blanket "
    "kitten puppy monkey tiger zebra parrot falcon salmon lemon cherry banana carrot tomato "
    "potato pepper ginger butter cookie muffin pizza noodle coffee teacup kettle spoon fork "
    "table chair sofa lamp clock phone camera guitar piano violin drum flute music story poem "
    "letter number circle square corner center silent rapid clever happy sleepy hungry brave"
).split()

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _upper(rng: random.Random) -> dict:
    text = " ".join(rng.sample(WORDS, rng.randint(1, 2)))
    return dict(
        prompt=f"Rewrite the text in capital letters, nothing else.\ntext: {text}\ncapitals:",
        chosen=f" {text.upper()}",
        rejected=f" {text}",
    )


def _reverse(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    while word == word[::-1]:
        word = rng.choice(WORDS)
    return dict(
        prompt=f"Write the word backwards, one letter after another.\nword: {word}\nbackwards:",
        chosen=f" {word[::-1]}",
        rejected=f" {word}",
    )


def _sort(rng: random.Random) -> dict:
    letters = rng.sample(LETTERS, rng.randint(3, 6))
    return dict(
        prompt=f"Sort these letters in alphabetical order.\nletters: {' '.join(letters)}\nsorted:",
        chosen=" " + " ".join(sorted(letters)),
        rejected=" " + " ".join(sorted(letters, reverse=True)),
    )


def _sequence(rng: random.Random) -> dict:
    start, step = rng.randint(1, 30), rng.randint(2, 9)
    terms = [start + i * step for i in range(rng.randint(3, 5))]
    following = [terms[-1] + step, terms[-1] + 2 * step]
    return dict(
        prompt=f"Continue the arithmetic sequence with its next two terms.\n{', '.join(map(str, terms))},",
        chosen=f" {following[0]}, {following[1]}",
        rejected=f" {terms[-1]}, {terms[-1]}",
    )


def _add(rng: random.Random) -> dict:
    while True:
        a, b = rng.randint(10, 89), rng.randint(10, 89)
        if a % 10 + b % 10 >= 10 and a + b < 100:
            break
    return dict(
        prompt=f"Add the two numbers and answer with their sum only.\n{a} + {b} =",
        chosen=f" {a + b}",
        rejected=f" {a + b - 10}",  # the carry forgotten
    )


def _larger(rng: random.Random) -> dict:
    a, b = rng.sample(range(100, 1000), 2)
    return dict(
        prompt=f"Which of the two numbers is larger? Answer with that number.\n{a} or {b}?",
        chosen=f" {max(a, b)}",
        rejected=f" {min(a, b)}",
    )


TASKS = {
    "upper": _upper,
    "reverse": _reverse,
    "sort": _sort,
    "sequence": _sequence,
    "add": _add,
    "larger": _larger,
}


def generate(n: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED) -> list[dict]:
    """``n`` examples, the tasks in turn (shuffled), deterministic for ``seed``."""
    rng = random.Random(seed)
    names = list(TASKS)
    examples = []
    for i in range(n):
        name = names[i % len(names)]
        examples.append({**TASKS[name](rng), "task": name})
    rng.shuffle(examples)
    return examples


def write_jsonl(examples: list[dict], path: Path) -> None:
    with open(path, "w", encoding="ascii", newline="\n") as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=DEFAULT_SIZE, help="number of examples")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args(argv)
    examples = generate(args.n, args.seed)
    write_jsonl(examples, args.out)
    print(f"wrote {len(examples)} examples to {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
