"""Every recipe parses into the argument dataclasses and builds its model, so recipes, READMEs and code
cannot drift; the recipe parser rejects unknown keys and wrong types by name, and flags override keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hf_localsgd.recipes.models import build_model_config
from hf_localsgd.recipes.train import build_recipe_model, parse_args, resume_argument


ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*/*.yaml"))
# GPU recipes ask for bf16, which TrainingArguments refuses on a machine without a GPU unless use_cpu is set.
ON_THIS_MACHINE = ["--use_cpu", "true"]


def test_recipes_exist():
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES}
    assert {"gptneo-tinystories/ddp.yaml", "gptneo-tinystories/localsgd.yaml", "gptneo-tinystories/diloco.yaml",
            "gptneo-tinystories/palsgd.yaml", "gptneo-tinystories/demo.yaml"} <= names
    for size in ("150m", "400m", "1b"):
        assert {f"chinchilla-c4/{size}-nesterov.yaml", f"chinchilla-c4/{size}-schedule-free.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_recipe_parses_and_builds_its_model(recipe):
    model_args, data_args, script_args, training_args = parse_args([str(recipe), *ON_THIS_MACHINE])
    config = build_model_config(model_args.model_config)
    assert data_args.block_size <= config.max_position_embeddings
    assert training_args.output_dir.startswith("outputs/")
    if script_args.trainer == "localsgd":
        assert training_args.local_sgd_warmup_steps < (training_args.max_steps if training_args.max_steps > 0
                                                       else float("inf"))


@pytest.mark.parametrize("family", sorted({p.parent for p in RECIPES}), ids=lambda p: p.name)
def test_family_readme_names_every_recipe_and_only_existing_ones(family):
    readme = (family / "README.md").read_text()
    for recipe in family.glob("*.yaml"):
        assert f"recipes/{family.name}/{recipe.name}" in readme, f"{recipe.name} missing from {family.name}/README.md"
    for mentioned in re.findall(r"recipes/[\w.-]+/[\w.-]+\.yaml", readme):
        assert (ROOT / mentioned).is_file(), mentioned


def test_schedule_free_recipes_use_seed_000_settings():
    for recipe in (ROOT / "recipes" / "chinchilla-c4").glob("*-schedule-free.yaml"):
        args = parse_args([str(recipe), *ON_THIS_MACHINE])[3]
        assert (args.outer_optimizer, args.outer_lr, args.outer_momentum) == ("schedule_free", 2.0, 0.2)
        assert args.outer_lr_scheduler == "constant" and args.local_sgd_warmup_steps == 0


def write(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_command_line_overrides_recipe(tmp_path):
    recipe = write(tmp_path, "max_steps: 100\nsync_every: 16\nlearning_rate: 1.0e-3\noutput_dir: out\n")
    *_, args = parse_args([recipe, "--max_steps", "6", "--sync_every=3"])
    assert (args.max_steps, args.sync_every, args.learning_rate) == (6, 3, 1e-3)


def test_vocab_size_pads_the_embedding_beyond_the_tokenizer(tmp_path):
    """`vocab_size` gives the model more embedding rows than the tokenizer has tokens (GPT-Neo 8M's 50,257 with
    the built-in tokenizer, as bench/launch_wan.sh runs it); unset keeps the tokenizer's length; fewer is refused."""

    class Tokenizer:
        bos_token_id = eos_token_id = 0
        pad_token_id = None

        def __len__(self):
            return 643

    recipe = write(tmp_path, "output_dir: out\nmodel_config: gpt-neo-8m\n")
    model_args = parse_args([recipe, "--vocab_size", "50257"])[0]
    model = build_recipe_model(model_args, Tokenizer(), seed=0)
    assert model.config.vocab_size == 50257 and model.get_input_embeddings().weight.shape == (50257, 128)
    assert sum(p.numel() for p in model.parameters()) == 8_054_656  # bench/README.md's figure
    assert build_recipe_model(parse_args([recipe])[0], Tokenizer(), seed=0).config.vocab_size == 643
    with pytest.raises(ValueError, match="^vocab_size"):
        build_recipe_model(parse_args([recipe, "--vocab_size", "100"])[0], Tokenizer(), seed=0)
    with pytest.raises(SystemExit):
        parse_args([recipe, "--vocab_size", "0"])


def test_recipe_values_of_every_shape(tmp_path):
    recipe = write(tmp_path, "output_dir: out\nlearning_rate: 1e-3\nbf16: false\nreport_to: [none]\n"
                             "outer_lr: null\nlr_scheduler_kwargs: {num_cycles: 2}\nmax_eval_samples: 8\n")
    _, data_args, _, args = parse_args([recipe])
    assert args.learning_rate == 1e-3 and args.bf16 is False and args.outer_lr is None
    assert args.lr_scheduler_kwargs == {"num_cycles": 2} and data_args.max_eval_samples == 8


def test_unknown_key_is_an_error_naming_it(tmp_path, capsys):
    recipe = write(tmp_path, "output_dir: out\nlearnig_rate: 1.0e-3\n")
    with pytest.raises(SystemExit):
        parse_args([recipe])
    err = capsys.readouterr().err
    assert "unknown key 'learnig_rate'" in err and "did you mean 'learning_rate'" in err


@pytest.mark.parametrize("line, key", [("learning_rate: fast", "learning_rate"), ("sync_every: 2.5", "sync_every"),
                                       ("outer_optimizer: adam", "outer_optimizer")])
def test_wrong_type_is_an_error_naming_the_key(tmp_path, capsys, line, key):
    with pytest.raises(SystemExit):
        parse_args([write(tmp_path, f"output_dir: out\n{line}\n")])
    assert f"--{key}" in capsys.readouterr().err


def test_unknown_flag_is_an_error_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args([write(tmp_path, "output_dir: out\n"), "--sync_evry", "3"])
    assert "unrecognized arguments: --sync_evry 3" in capsys.readouterr().err


def test_invalid_combination_is_an_error_naming_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args([write(tmp_path, "output_dir: out\nmax_steps: 10\nlocal_sgd_warmup_steps: 32\n")])
    assert "error: local_sgd_warmup_steps" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["block_size", "max_steps", "pseudo_sync_prob"])
def test_null_is_an_error_naming_the_key_unless_the_default_is_none(tmp_path, capsys, key):
    with pytest.raises(SystemExit):
        parse_args([write(tmp_path, f"output_dir: out\n{key}: null\n")])
    assert f"{key} cannot be null" in capsys.readouterr().err


def test_resume_from_checkpoint_true_means_the_last_checkpoint():
    assert resume_argument("true") is True and resume_argument("True") is True
    assert resume_argument("false") is None and resume_argument(None) is None
    assert resume_argument("outputs/run/checkpoint-500") == "outputs/run/checkpoint-500"


def test_a_list_for_a_single_value_is_an_error_naming_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args([write(tmp_path, "output_dir: out\nsync_every: [4, 8]\n")])
    assert "sync_every takes one value, got a list" in capsys.readouterr().err
    _, _, _, args = parse_args([write(tmp_path, "output_dir: out\nlabel_names: [labels, more]\n")])  # a list field
    assert args.label_names == ["labels", "more"]


def test_help_shows_the_recipe_argument_and_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.startswith("usage: python -m hf_localsgd.train [RECIPE.yaml] [--KEY VALUE ...]")
    assert "RECIPE.yaml (optional, first)" in out and "recipes/gptneo-tinystories/demo.yaml" in out
    assert "--sync_every" in out


@pytest.mark.parametrize("argv, message", [(["--sync_evry", "3"], "(did you mean --sync_every?)"),
                                           (["{recipe}"], "unknown key 'learnig_rate' (did you mean 'learning_rate'?)")])
def test_a_bad_key_or_flag_prints_the_usage_line_and_the_error_only(tmp_path, capsys, argv, message):
    argv = [a.format(recipe=write(tmp_path, "output_dir: out\nlearnig_rate: 1.0e-3\n")) for a in argv]
    with pytest.raises(SystemExit):
        parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("usage: python -m hf_localsgd.train [RECIPE.yaml]")
    assert err[1].startswith("hf_localsgd.train: error: ") and err[1].endswith(message)


def test_a_checkpoint_that_cannot_be_resumed_stops_the_recipe_before_anything_is_built(tmp_path, monkeypatch):
    """Checked before the tokenizer, the data and the model (minutes at scale), with exit code 1."""
    import hf_localsgd.recipes.train as recipe

    monkeypatch.setattr(recipe, "load_tokenizer", lambda name: pytest.fail("the tokenizer was loaded"))
    missing = tmp_path / "checkpoint-40"
    with pytest.raises(SystemExit) as exit_:
        recipe.main(["--output_dir", str(tmp_path), "--use_cpu", "true", "--resume_from_checkpoint", str(missing)])
    assert str(exit_.value.code).startswith(f"error: resume_from_checkpoint: {missing} cannot be resumed from: the "
                                            "folder does not exist")


def test_non_finite_weights_at_the_end_are_not_saved_and_exit_non_zero(tmp_path, monkeypatch):
    """The exit code says whether output_dir holds a usable model: 0 only for a finite one."""
    import torch

    import hf_localsgd.recipes.train as recipe

    saved = []

    class Diverged:  # stands in for LocalSGDTrainer: training ends with a NaN in the global model
        def __init__(self, model, **kwargs):
            self.model = model

        def train(self, resume_from_checkpoint=None):
            with torch.no_grad():
                next(self.model.parameters())[0].fill_(float("nan"))

        def save_model(self):
            saved.append(True)

    monkeypatch.setattr(recipe, "LocalSGDTrainer", Diverged)
    class Tokenizer:  # what building the demo model reads of one
        bos_token_id = eos_token_id = pad_token_id = 0

        def __len__(self):
            return 64

    monkeypatch.setattr(recipe, "load_tokenizer", lambda name: Tokenizer())
    monkeypatch.setattr(recipe, "build_lm_datasets", lambda *args, **kwargs: (None, None))
    with pytest.raises(SystemExit) as exit_:
        recipe.main(["--output_dir", str(tmp_path), "--use_cpu", "true"])
    assert str(exit_.value.code).startswith("error: training ended with non-finite weights in 1 parameter tensors")
    assert saved == []
