"""Text data for causal-LM training: load (Hub, local files or the built-in stories), tokenize, pack.

Every document is tokenized, followed by the end-of-sequence token, concatenated with its neighbours and cut
into `block_size` blocks, as in `transformers`' `run_clm.py`; `labels` are the inputs (the model shifts them).

    python -c "from hf_localsgd.recipes.data import *; tok = load_tokenizer('builtin:stories'); \
train, held_out = build_lm_datasets(DataArguments(block_size=64), tok); print(train, held_out)"
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from itertools import chain, islice

from datasets import Dataset, IterableDataset, load_dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .demo_data import BUILTIN_NAME, demo_datasets, train_demo_tokenizer
from .offline import explain_offline_failure, require_hub


# File extension -> the `datasets` builder that reads it.
FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                 ".csv": "csv"}


@dataclass
class DataArguments:
    """Where the training text comes from and how it is cut into blocks."""

    dataset_name: str = field(
        default=BUILTIN_NAME,
        metadata={"help": f"Hub dataset id (e.g. roneneldan/TinyStories), a local dataset directory, or "
                          f"'{BUILTIN_NAME}' for the generated offline corpus. Ignored when train_file is set."},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Dataset configuration, e.g. 'en' for allenai/c4."}
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": f"Local training file instead of dataset_name: one of {sorted(FILE_BUILDERS)}."},
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Local held-out file (same formats as train_file)."}
    )
    train_split: str = field(default="train", metadata={"help": "Split of dataset_name to train on."})
    validation_split: str = field(
        default="validation", metadata={"help": "Split of dataset_name to evaluate on."}
    )
    validation_split_percentage: int = field(
        default=5,
        metadata={"help": "Percentage of the training documents held out when there is no validation split or "
                          "file (not with streaming)."},
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the documents."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the dataset instead of downloading it (for C4); needs max_steps and "
                          "max_eval_samples."},
    )
    block_size: int = field(
        default=128,
        metadata={"help": "Tokens per training sequence; at most the model's max_position_embeddings."},
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Number of held-out blocks to evaluate on (all when unset; required with streaming)."},
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization (not with streaming)."}
    )
    shuffle_buffer_size: int = field(
        default=10_000, metadata={"help": "With streaming: documents in the shuffle buffer."}
    )

    def __post_init__(self):
        if self.streaming and self.max_eval_samples is None:
            raise ValueError("max_eval_samples: required with streaming, which has no fixed held-out set size")
        if self.block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {self.block_size}")
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and os.path.splitext(path)[1] not in FILE_BUILDERS:
                raise ValueError(f"{name}: {path!r} must end in one of {sorted(FILE_BUILDERS)}")


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """`builtin:stories` (trained on the spot, ~1 s), a local directory, or a Hub id (checked reachable first)."""
    if name == BUILTIN_NAME:
        return train_demo_tokenizer()
    require_hub(name, "model", "tokenizer")
    with explain_offline_failure(name, "tokenizer"):
        return AutoTokenizer.from_pretrained(name)


def load_text_datasets(args: DataArguments) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset]:
    """The raw (train, held-out) documents named by `args`."""
    if args.train_file is not None:
        train = _load_file(args.train_file, args.streaming)
        held_out = _load_file(args.validation_file, args.streaming) if args.validation_file else None
        source = "train_file / validation_file"
    elif args.dataset_name == BUILTIN_NAME:
        corpus = demo_datasets()
        train, held_out = corpus["train"], corpus["validation"]
        source = BUILTIN_NAME
    else:
        require_hub(args.dataset_name, "dataset", "dataset")
        with explain_offline_failure(args.dataset_name, "dataset"):
            raw = load_dataset(args.dataset_name, args.dataset_config_name, streaming=args.streaming)
        if args.train_split not in raw:
            raise ValueError(f"train_split: {args.dataset_name} has no {args.train_split!r} split ({sorted(raw)})")
        train, held_out = raw[args.train_split], raw.get(args.validation_split)
        source = args.dataset_name

    for name, split in (("training", train), ("held-out", held_out)):
        if split is not None and split.column_names is not None and args.text_column not in split.column_names:
            raise ValueError(f"text_column: the {name} data of {source} has no column {args.text_column!r} "
                             f"(columns: {split.column_names})")
    if held_out is not None:
        return train, held_out
    if args.streaming:
        raise ValueError(f"validation_split: {source} has no {args.validation_split!r} split, which streaming "
                         "needs; name another or pass validation_file")
    split = train.train_test_split(test_size=args.validation_split_percentage / 100, seed=0)
    return split["train"], split["test"]


def _load_file(path: str, streaming: bool) -> Dataset | IterableDataset:
    builder = FILE_BUILDERS[os.path.splitext(path)[1]]
    return load_dataset(builder, data_files=path, split="train", streaming=streaming)


def pack_into_blocks(
    dataset: Dataset | IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    text_column: str = "text",
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """Tokenize, append EOS to every document, concatenate and cut into `block_size` blocks.

    Each batch of 1000 documents drops its last partial block: a fraction of a block per 1000 documents,
    in exchange for a pure per-batch map that `datasets` can cache, parallelize and stream.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer_name: the tokenizer has no eos_token, which separates packed documents; "
                         "use one that has, or set its eos_token")

    def pack(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=True)["input_ids"]
        stream = list(chain.from_iterable(doc + [tokenizer.eos_token_id] for doc in ids))
        blocks = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    kwargs = {} if isinstance(dataset, IterableDataset) else {"num_proc": num_proc, "desc": "Packing"}
    return dataset.map(pack, batched=True, remove_columns=dataset.column_names, **kwargs)


def build_lm_datasets(
    args: DataArguments,
    tokenizer: PreTrainedTokenizerBase,
    main_process_first: Callable[..., AbstractContextManager] | None = None,
    seed: int = 42,
) -> tuple[Dataset | IterableDataset, Dataset]:
    """Packed (train, held-out) datasets ready for `Trainer` with `default_data_collator`.

    Args:
        main_process_first: a context manager factory, e.g. `TrainingArguments.main_process_first`, so that
            in a distributed run one process tokenizes and writes the `datasets` cache while the others wait
            and read it.
        seed: shuffle seed of the streaming buffer (a map-style dataset is shuffled by the Trainer's sampler).
    """
    train, held_out = load_text_datasets(args)
    packing = main_process_first(desc="tokenizing and packing") if main_process_first else nullcontext()
    with packing:
        train = pack_into_blocks(train, tokenizer, args.block_size, args.text_column, args.preprocessing_num_workers)
        held_out = pack_into_blocks(
            held_out, tokenizer, args.block_size, args.text_column, args.preprocessing_num_workers
        )
    if isinstance(train, IterableDataset):
        train = train.shuffle(seed=seed, buffer_size=args.shuffle_buffer_size)
    if isinstance(held_out, IterableDataset):
        # Materialized, so that every evaluation scores the same blocks and the Trainer can split them.
        held_out = Dataset.from_list(list(islice(held_out, args.max_eval_samples)))
    elif args.max_eval_samples is not None:
        held_out = held_out.select(range(min(args.max_eval_samples, len(held_out))))
    return train, held_out
