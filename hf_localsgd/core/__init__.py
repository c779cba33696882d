"""The algorithm, with torch alone: nothing here imports transformers, accelerate or datasets.

- `options`: `LocalSGDOptions`, every option's name, default, choices, help and validation
- `engine`: `RoundEngine`, the round: counts steps, ends rounds, calls the hooks and the sync unit
- `sync`: `OuterSync`, the sync unit: the global model, its outer optimizer, the outer step
- `flat`, `collectives`: the flat parameter layout and its buckets; the all-reduce of the outer gradient
- `outer`: the outer optimizers (`ScheduleFreeSGD` included) and outer-lr schedules
- `hooks`, `palsgd`, `adascale`: the variants of the round (PALSGD, AdaScale / LocalAdaScale) as hooks
- `build`: from options to the engine's parts (collective, sync unit, hooks)
- `schedules`: communication schedules, the H of each round
- `checkpoint`: per-rank state files, to resume exactly
- `metrics`: the names of the per-sync metrics
- `partition`: data partitions across workers (`by_label`)

The public names are exported by `hf_localsgd` itself; this package imports nothing on its own, so that
`metrics` and `options` stay importable without torch.
"""
