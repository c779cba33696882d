"""A CPU run launched without use_cpu (ACCELERATE_USE_CPU=false, use_cpu=False): torch.distributed joins both
processes while Accelerate sees one. LocalSGDTrainer (option `trainer`) and a plain Accelerate loop building a
RoundEngine (option `loop`) must both stop at the start with the way out; each rank records the error."""

from __future__ import annotations

from common import common_args, dataset, main, tiny_model


def run(out_dir: str, path: str) -> dict:
    try:
        if path == "trainer":
            from hf_localsgd import LocalSGDConfig, LocalSGDTrainer

            args = LocalSGDConfig(**{**common_args(out_dir, max_steps=4), "use_cpu": False}, sync_every=2)
            LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=dataset()).train()
        else:
            from accelerate import Accelerator

            from hf_localsgd import RoundEngine

            accelerator = Accelerator()
            RoundEngine(accelerator.prepare(tiny_model()), sync_every=2)
    except RuntimeError as error:
        return {"error": str(error)}
    return {"error": None}


if __name__ == "__main__":
    main(run)
