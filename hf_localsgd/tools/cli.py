"""The `hf-localsgd` console script: one entry point, one module per subcommand.

    hf-localsgd train recipes/gptneo-tinystories/demo.yaml --max_steps 60
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml -m hf_localsgd train RECIPE.yaml
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml -m hf_localsgd advise RECIPE.yaml
    hf-localsgd plot outputs/diloco --compare outputs/ddp

Everything after the subcommand goes to that module's own `main(argv)` untouched (its parser owns `--help`),
and the module is imported only when its subcommand runs, so `hf-localsgd --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys


# subcommand: (module with `main(argv)`, one-line help)
COMMANDS = {
    "train": ("hf_localsgd.recipes.train", "train a model from a recipe YAML (flags override its keys)"),
    "advise": ("hf_localsgd.tools.advise", "under accelerate launch: time a step and an all-reduce, predict the best H"),
    "plot": ("hf_localsgd.tools.plot", "PNG figures of runs' logs: loss vs steps and bytes, cosine similarity, drift"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-localsgd", description="Low-communication training for transformers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        _parser().parse_args(argv)  # prints the help, or the error for an unknown command, and exits
    module, _ = COMMANDS[argv[0]]
    importlib.import_module(module).main(argv[1:])


if __name__ == "__main__":
    main()
