"""`python -m hf_localsgd.train RECIPE.yaml [--key value ...]`: the recipe entry point (`hf_localsgd.recipes.train`).

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml \\
        -m hf_localsgd.train recipes/gptneo-tinystories/demo.yaml --max_steps 60 --sync_every 4
"""

from .recipes.train import main


if __name__ == "__main__":
    main()
