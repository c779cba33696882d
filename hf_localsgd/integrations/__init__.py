"""The glue to `transformers` and Accelerate: the options as `TrainingArguments` fields, the callback that runs
the round engine inside any `Trainer`, `LocalSGDTrainer`, and the model card's section.

- `config`: `LocalSGDArguments` (mixin) and `LocalSGDConfig` (with `TrainingArguments`)
- `callback`: `LocalSGDCallback`, Trainer's events handed to `RoundEngine`
- `trainer`: `LocalSGDTrainerMixin` and `LocalSGDTrainer`
- `parallel`: the data-parallel wrapper inside a replica and its gradient all-reduce switch
- `console`, `card`: the progress bar and end summary; the model card's section
"""
