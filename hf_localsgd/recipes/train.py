"""Train a causal LM from scratch from a recipe: model, data and `LocalSGDConfig` in one YAML file.

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml \\
        -m hf_localsgd.train recipes/gptneo-tinystories/demo.yaml --max_steps 60 --sync_every 4

(also `python -m hf_localsgd.train RECIPE.yaml` for one process, and `hf-localsgd train RECIPE.yaml`).

A recipe is a flat mapping of the fields of `ModelArguments`, `DataArguments`, `ScriptArguments` and
`LocalSGDConfig` (so every `TrainingArguments` field too). Its keys are handed to `HfArgumentParser` as
flags, ahead of the command line's, so flags given on the command line override the recipe and both go
through the same parsing: an unknown key or a value of the wrong type stops the run with an error naming
the key, before anything is loaded. `python -m hf_localsgd.train --help` lists every key.

The run trains, saves the model and tokenizer to `output_dir`, evaluates held-out loss and perplexity,
and writes them to `eval_results.json` and the model card. It exits non-zero on every failure: a bad key or
value (2, before anything is loaded), a checkpoint that cannot be resumed from (1, checked before the model
is built), an error in training (1), and weights that ended non-finite (1, and the model is not saved); 0
only when the saved model is the finite global model.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass, field

import torch
import yaml
from transformers import HfArgumentParser, Trainer, default_data_collator, set_seed

from ..core.checkpoint import CheckpointError
from ..integrations.checkpoint_dirs import resolve_resume
from ..integrations.config import LocalSGDConfig
from ..integrations.trainer import LocalSGDTrainer
from .data import DataArguments, build_lm_datasets, load_tokenizer
from .demo_data import BUILTIN_NAME
from .models import MODEL_CONFIGS, build_model, build_model_config
from .offline import HubUnavailableError
from .perplexity import perplexity, token_nll


@dataclass
class ModelArguments:
    """Which model to initialize from scratch, and its tokenizer."""

    model_config: str = field(
        default="demo",
        metadata={"help": "Named architecture from hf_localsgd.recipes.models (fresh initialization, nothing downloaded); "
                          "its vocabulary is resized to the tokenizer's (or to vocab_size).",
                  "choices": sorted(MODEL_CONFIGS)},
    )
    tokenizer_name: str = field(
        default=BUILTIN_NAME,
        metadata={"help": f"Hub id or local directory of the tokenizer, or '{BUILTIN_NAME}' for the byte-level "
                          "BPE trained on the built-in corpus."},
    )
    vocab_size: int | None = field(
        default=None,
        metadata={"help": "Embedding rows of the model: unset takes the tokenizer's length; a larger number pads "
                          "the embedding with rows no token uses, e.g. 50257 gives gpt-neo-8m its full size and "
                          "sync volume with the small built-in tokenizer (bench/launch_wan.sh). Not below the "
                          "tokenizer's length."},
    )

    def __post_init__(self):
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size: must be >= 1, got {self.vocab_size}")


@dataclass
class ScriptArguments:
    """What runs the training loop."""

    trainer: str = field(
        default="localsgd",
        metadata={"help": "'localsgd': LocalSGDTrainer (Local SGD / DiLoCo / schedule-free, per the LocalSGDConfig "
                          "fields). 'ddp': plain transformers.Trainer, gradients all-reduced every step: the "
                          "baseline; the local-SGD fields are then ignored.",
                  "choices": ["localsgd", "ddp"]},
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, ScriptArguments, LocalSGDConfig)
# A usage line of its own: argparse's would list every one of the ~140 flags, above every error message.
USAGE = "python -m hf_localsgd.train [RECIPE.yaml] [--KEY VALUE ...]      (or: hf-localsgd train ...)"
DESCRIPTION = """Train a causal language model from scratch from a recipe.

RECIPE.yaml (optional, first) is a mapping of `key: value` lines; its keys are the options below. Flags given
after it override its keys. An unknown key or a wrong type stops the run with an error naming the key."""
EXAMPLE = """example, 2 CPU processes, offline, about a minute:
  accelerate launch --config_file accelerate_configs/cpu_2proc.yaml \\
      -m hf_localsgd.train recipes/gptneo-tinystories/demo.yaml --max_steps 40 --sync_every 4"""


def recipe_flags(parser: HfArgumentParser, path: str) -> list[str]:
    """The recipe at `path` as command-line flags for `parser`. `null` is taken for fields whose default is
    None and a list of several values for fields that take several; both are refused, naming the key, elsewhere.

    Converting to flags (rather than building the dataclasses from the dict) is what makes a recipe's
    `learning_rate: fast` fail the way `--learning_rate fast` does: argparse checks each value's type.
    """
    try:
        with open(path, encoding="utf-8") as f:
            recipe = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as err:
        parser.error(f"cannot read recipe {path}: {err}")
    if not isinstance(recipe, dict):
        parser.error(f"{path}: a recipe is a mapping of `key: value` lines, got {type(recipe).__name__}")
    fields = {f.name: f for dtype in parser.dataclass_types for f in dataclasses.fields(dtype) if f.init}
    flags = []
    for key, value in recipe.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            parser.error(f"{path}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        if value is None:
            if fields[key].default is not None:  # (MISSING, or a value: None would only fail later, far from here)
                parser.error(f"{path}: {key} cannot be null; remove the line to keep its default")
            parser.set_defaults(**{key: None})
        elif isinstance(value, list):
            # argparse would only name the extra values. (HfArgumentParser narrows some union types to one.)
            if len(value) != 1 and parser._option_string_actions[f"--{key}"].nargs not in ("+", "*"):
                parser.error(f"{path}: {key} takes one value, got a list: {value}")
            flags += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            flags.append(f"--{key}={json.dumps(value)}")
        else:
            flags.append(f"--{key}={value}")
    return flags


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, ScriptArguments, LocalSGDConfig]:
    """`[RECIPE.yaml] [--key value ...]` -> the four argument dataclasses (command line over recipe)."""
    parser = HfArgumentParser(
        ARGUMENT_CLASSES, prog="hf_localsgd.train", usage=USAGE, description=DESCRIPTION, epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = recipe_flags(parser, argv[0]) + argv[1:]
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as err:  # a dataclass's own validation; its message starts with the key
        parser.error(str(err))
    if unknown:
        flags = [f"--{f.name}" for dtype in parser.dataclass_types for f in dataclasses.fields(dtype) if f.init]
        close = difflib.get_close_matches(unknown[0].split("=")[0], flags, n=1) if unknown[0].startswith("--") else []
        parser.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {close[0]}?)" if close else ""))
    return tuple(parsed)


def resume_argument(value: str | None) -> str | bool | None:
    """`resume_from_checkpoint` (a string in TrainingArguments) for `Trainer.train`: `true` resumes from the last
    checkpoint in output_dir, `false` starts anew, anything else is a checkpoint's path."""
    if value is None:
        return None
    return {"true": True, "false": None}.get(value.strip().lower(), value)


def build_recipe_model(model_args: ModelArguments, tokenizer, seed: int):
    """The recipe's model, freshly initialized with the tokenizer's vocabulary (or ``vocab_size`` rows, the extra
    ones unused) and special tokens. Every process draws the same initial weights: local-SGD replicas must start
    from one global model."""
    if model_args.vocab_size is not None and model_args.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size: {model_args.vocab_size} is below the tokenizer's {len(tokenizer)} tokens")
    config = build_model_config(
        model_args.model_config,
        vocab_size=model_args.vocab_size or len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    set_seed(seed)
    return build_model(config)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse, build tokenizer / data / model, train, save, evaluate. Returns the final eval metrics."""
    model_args, data_args, script_args, training_args = parse_args(argv)
    max_positions = build_model_config(model_args.model_config).max_position_embeddings
    if data_args.block_size > max_positions:  # checked before minutes of tokenization, not after
        sys.exit(f"error: block_size ({data_args.block_size}) exceeds {model_args.model_config}'s "
                 f"max_position_embeddings ({max_positions})")
    resume = resume_argument(training_args.resume_from_checkpoint)
    if resume is not None and script_args.trainer == "localsgd":
        # The checkpoint is checked now (on every rank, which agree), not after tokenizing and building the model.
        _ = training_args.device  # joins the process group, as Trainer would
        try:
            resume = resolve_resume(resume, training_args.output_dir, training_args)
        except CheckpointError as err:
            sys.exit(f"error: {err}")
    try:
        tokenizer = load_tokenizer(model_args.tokenizer_name)
        train_dataset, eval_dataset = build_lm_datasets(
            data_args, tokenizer, training_args.main_process_first, seed=training_args.seed
        )
    except HubUnavailableError as err:
        sys.exit(f"error: {err}")  # the message is the whole story; a traceback would bury it

    model = build_recipe_model(model_args, tokenizer, training_args.seed)

    trainer_class = Trainer if script_args.trainer == "ddp" else LocalSGDTrainer
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        preprocess_logits_for_metrics=token_nll,
        compute_metrics=perplexity,
    )
    train_result = trainer.train(resume_from_checkpoint=resume)
    non_finite = [name for name, p in trainer.model.named_parameters() if not torch.isfinite(p).all()]
    if non_finite:  # the exit code says whether output_dir holds a usable model
        sys.exit(f"error: training ended with non-finite weights in {len(non_finite)} parameter tensors (the first: "
                 f"{non_finite[0]}); the model was not saved. Lower learning_rate or outer_lr, or set max_grad_norm, "
                 "and resume from a checkpoint before it diverged")
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()

    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)

    card = {"tasks": "text-generation", "model_name": model_args.model_config}
    if data_args.train_file is None:
        card["dataset"] = data_args.dataset_name
    # A model built from a config has an empty `_name_or_path`, which the card would print as the base
    # model of a fine-tune ("a fine-tuned version of []"); a directory is never taken as a base model, and
    # output_dir is where this model now lives, so the card says "trained from scratch".
    trainer.model.config._name_or_path = training_args.output_dir
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
    trainer.end()
    return metrics


if __name__ == "__main__":
    main()
