"""The built-in offline corpus: generated short stories and a byte-level BPE tokenizer trained on them.

Machines without Hub access (CI, a fresh laptop, an air-gapped cluster) still need *some* text to run the
`demo` recipe end to end. Rather than ship a data file, the stories are generated from a few word lists and
sentence templates with a fixed seed: the same code gives the same corpus on every machine, and every
process of a distributed run builds it independently without coordination.

The stories are TinyStories-like (named characters, a small plot, a closing line) and repeat their
characters' names and objects, so a small model's loss falls quickly and visibly, which is the point of a
demo. They are not a benchmark.

    python -c "from hf_localsgd.recipes.demo_data import generate_stories; print(generate_stories(2)[0])"
"""

from __future__ import annotations

import random

from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


BUILTIN_NAME = "builtin:stories"
"""The name that selects this corpus (as `dataset_name`) or its tokenizer (as `tokenizer_name`)."""

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_VOCAB_SIZE = 1024
# Different seeds for the two splits, so the held-out stories are not copies of training stories.
TRAIN_SEED, VALIDATION_SEED = 0, 1
NUM_TRAIN_STORIES, NUM_VALIDATION_STORIES = 4000, 400

_GIRLS = ["Lily", "Mia", "Sue", "Anna", "Lucy", "Emma", "Zoe", "Ella", "Rosa", "Kim"]
_BOYS = ["Tom", "Ben", "Max", "Sam", "Jack", "Tim", "Leo", "Finn", "Joe", "Dan"]
_ANIMALS = ["cat", "dog", "bird", "frog", "bunny", "duck", "fox", "bear", "mouse", "pony", "owl", "fish"]
_ADJECTIVES = ["little", "big", "happy", "shy", "brave", "silly", "kind", "tiny", "fluffy", "curious"]
_COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "brown"]
_OBJECTS = ["ball", "kite", "hat", "box", "cake", "book", "drum", "boat", "flower", "shell", "key", "cup"]
_PLACES = ["park", "garden", "forest", "beach", "yard", "farm", "pond", "hill", "river", "meadow"]
_ACTIVITIES = ["play", "run", "jump", "sing", "dance", "swim", "read", "draw", "hide", "climb"]
_HIDING_PLACES = ["under a tree", "behind a rock", "in the tall grass", "near the water", "under a bench"]
_FEELINGS = ["happy", "proud", "glad", "excited", "thankful"]


def _story(rng: random.Random) -> str:
    """One story: an opening, a found-lost-found plot with a friend, and a moral or closing line."""
    is_girl = rng.random() < 0.5
    hero = rng.choice(_GIRLS if is_girl else _BOYS)
    they, their = ("she", "her") if is_girl else ("he", "his")
    friend = rng.choice([n for n in _GIRLS + _BOYS if n != hero])
    animal, adjective = rng.choice(_ANIMALS), rng.choice(_ADJECTIVES)
    color, thing, place = rng.choice(_COLORS), rng.choice(_OBJECTS), rng.choice(_PLACES)
    activity, hiding, feeling = rng.choice(_ACTIVITIES), rng.choice(_HIDING_PLACES), rng.choice(_FEELINGS)

    opening = rng.choice([
        f"Once upon a time, there was a {adjective} {animal} named {hero}.",
        f"Once upon a time, a {adjective} {'girl' if is_girl else 'boy'} named {hero} lived near the {place}.",
        f"One day, {hero} the {animal} went to the {place}.",
    ])
    sentences = [
        opening,
        f"{hero} liked to {activity} with {their} {color} {thing}.",
        f"One day, {hero} could not find the {color} {thing}.",
        f"{they.capitalize()} looked everywhere in the {place}, but the {thing} was gone.",
        f"{hero} felt sad and began to cry.",
        f"Then {hero} met {friend}. {friend} said, \"Why are you sad, {hero}?\"",
        f"\"I lost my {color} {thing},\" said {hero}.",
        f"\"I will help you,\" said {friend}. They looked {hiding}.",
        f"There was the {color} {thing}! {hero} was so {feeling}.",
    ]
    if rng.random() < 0.5:
        sentences.append(f"{hero} and {friend} played with the {thing} in the {place} all day.")
    sentences.append(rng.choice([
        "From that day on, they were best friends.",
        f"{hero} learned that friends always help each other.",
        "The end.",
    ]))
    return " ".join(sentences)


def generate_stories(num_stories: int, seed: int = TRAIN_SEED) -> list[str]:
    """`num_stories` stories, identical for the same `(num_stories, seed)` on every machine and Python version."""
    rng = random.Random(seed)
    return [_story(rng) for _ in range(num_stories)]


def demo_datasets(num_train: int = NUM_TRAIN_STORIES, num_validation: int = NUM_VALIDATION_STORIES) -> DatasetDict:
    """The corpus as a `DatasetDict` with a `text` column and `train` / `validation` splits (about 2 MB)."""
    return DatasetDict(
        train=Dataset.from_dict({"text": generate_stories(num_train, TRAIN_SEED)}),
        validation=Dataset.from_dict({"text": generate_stories(num_validation, VALIDATION_SEED)}),
    )


def train_demo_tokenizer(num_stories: int = 2000, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style, so any text still encodes) trained on the demo stories.

    Takes about a second. The BPE trainer breaks ties between equally frequent pairs deterministically, so
    every process of a run trains the same tokenizer; `tests/test_data.py` checks it.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(generate_stories(num_stories, TRAIN_SEED), trainer=trainer)
    # Like GPT-2/GPT-Neo: one special token serves as document separator and padding.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
