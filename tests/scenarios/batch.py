"""Several scenarios in one launch, each its own module of this folder, run one after the other by the same
processes (one process start and one round of imports instead of one per scenario):

    python tests/scenarios/batch.py OUT_DIR rounds ddp_equivalence resume:schedule_free,0.1

Each `NAME[:OPTION,...]` runs `NAME.run(OUT_DIR/NAME[-OPTION...], *OPTIONS)` and writes that folder's
`result_rank{R}.json`, as the scenario's own script would. (`tests/conftest.py: run_scenarios`.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import torch.distributed as dist


def folder(spec: str) -> str:
    """The output folder of one `NAME[:OPTION,...]`."""
    return spec.replace(":", "-").replace(",", "-")


def load(name: str):
    """The module ``name`` of this folder, by its file (not by sys.path, where an example may share its name)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"scenario_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    out_dir, *specs = sys.argv[1:]
    dist.init_process_group("gloo")
    for spec in specs:
        name, _, options = spec.partition(":")
        run = load(name).run
        directory = os.path.join(out_dir, folder(spec))
        os.makedirs(directory, exist_ok=True)
        result = run(directory, *(options.split(",") if options else ()))
        result["world_size"] = dist.get_world_size()
        with open(os.path.join(directory, f"result_rank{dist.get_rank()}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
