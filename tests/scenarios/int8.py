"""int8 outer gradients on real processes: `Int8AllReduce` against its pipeline simulated here, block by block, from
every rank's gathered input (sums, error-feedback residuals, `start`), and `RoundEngine(outer_comm_dtype="int8")`
against a Nesterov reference fed that simulated sum bucket by bucket."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from common import digest, main

from hf_localsgd import RoundEngine
from hf_localsgd.core.collectives import AllReduce
from hf_localsgd.core.quantize import Int8AllReduce


BLOCK = 2048


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale absmax / 127 per block, values round(x / scale) (halves to even); a zero block: scale 0."""
    q, scales = torch.zeros(len(x), dtype=torch.int8), []
    for start in range(0, len(x), BLOCK):
        part = x[start : start + BLOCK]
        scale = part.abs().max() / 127
        scales.append(scale)
        if scale > 0:
            q[start : start + BLOCK] = (part / scale).round().clamp(-127, 127).to(torch.int8)
    return q, torch.stack(scales)


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.cat([q[i * BLOCK : (i + 1) * BLOCK].float() * s for i, s in enumerate(scales)])


def reference_sum(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The sum of the K ranks' ``inputs`` as the int8 pipeline computes it, and each rank's residual: each input
    padded to K chunks of whole blocks and quantized; chunk j of every rank dequantized and summed in float32 in
    rank order, quantized again; the K quantized chunks dequantized."""
    k, n = len(inputs), len(inputs[0])
    chunk = math.ceil(n / (k * BLOCK)) * BLOCK
    quantized = [quantize(torch.nn.functional.pad(v, (0, k * chunk - n))) for v in inputs]
    residuals = [v - dequantize(q, s)[:n] for v, (q, s) in zip(inputs, quantized)]
    per_chunk = chunk // BLOCK
    pieces = []
    for j in range(k):
        total = sum(dequantize(q[j * chunk : (j + 1) * chunk], s[j * per_chunk : (j + 1) * per_chunk])
                    for q, s in quantized)
        pieces.append(dequantize(*quantize(total)))
    return torch.cat(pieces)[:n], residuals


def gathered(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def reducer_case(rank: int) -> dict:
    n = 5000  # 2 chunks of 2 blocks each (8192 elements padded), the last block partly padding
    g = torch.Generator().manual_seed(10 + rank)
    x1, x2 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    x1[2048:4096] *= 1e-3  # a block of small values keeps its own scale
    x1[4096:] = 0  # a block of zeros on every rank, and the padding
    residual0 = 0.01 * torch.randn(n, generator=g)
    reducer = Int8AllReduce(None)
    residual = residual0.clone()
    sum1 = reducer.sum_(x1.clone(), residual=residual)
    residual1 = residual.clone()
    sum2 = reducer.start(x2.clone(), residual=residual).wait()  # the residual kept from one sync to the next
    ref1, ref_residuals1 = reference_sum([a + b for a, b in zip(gathered(x1), gathered(residual0))])
    ref2, ref_residuals2 = reference_sum([a + b for a, b in zip(gathered(x2), ref_residuals1)])
    plain, pending = reducer.sum_(x2.clone()), reducer.start(x2.clone()).wait()
    exact = reducer.sum_(x2.clone(), exact=True)
    # bfloat16 error feedback: the residual is what rounding buf + residual to bfloat16 lost
    bf16, bf16_residual = AllReduce(None, "bfloat16"), residual0.clone()
    bf16_sum = bf16.sum_(x1.clone(), residual=bf16_residual)
    wires = [v.to(torch.bfloat16) for v in (a + b for a, b in zip(gathered(x1), gathered(residual0)))]
    return {
        "sum_matches": sum1.equal(ref1) and sum2.equal(ref2),
        "residual_matches": residual1.equal(ref_residuals1[rank]) and residual.equal(ref_residuals2[rank]),
        "start_matches_sum": pending.equal(plain) and plain.equal(reference_sum(gathered(x2))[0]),
        "exact_matches": exact.equal(sum(gathered(x2))),
        "sum_digest": digest(sum2), "dtype": str(sum1.dtype), "new_tensor": sum1.data_ptr() != x1.data_ptr(),
        "worst_error": (sum1 - sum(a + b for a, b in zip(gathered(x1), gathered(residual0)))).abs().max().item(),
        "bf16_residual_matches": bf16_residual.equal((x1 + residual0) - wires[rank].float()),
        "bf16_sum_matches": bf16_sum.float().equal((wires[0].float() + wires[1].float()).to(torch.bfloat16).float()),
    }


def engine_case(rank: int, error_feedback: bool = False) -> dict:
    """Nesterov, H = 1, three syncs of rank-specific moves; the model (2,344 parameters) in two buckets,
    [2048] and [296], each summed (and padded) on its own. With ``error_feedback``, each rank's residual is added
    to its next outer gradient, and the engine's residual is checked against the reference's."""
    k = dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    engine = RoundEngine(model, sync_every=1, outer_optimizer="nesterov", outer_comm_dtype="int8",
                         bucket_size_mb=0.002, track_metrics=True, outer_error_feedback=error_feedback)
    residuals = [torch.zeros(engine.flat.numel) for _ in range(k)]  # every rank's, in the reference
    spans = [(b.start, b.end) for b in engine.flat.buckets]
    params = list(model.parameters())
    x = engine.global_params.double().clone()
    reference = torch.optim.SGD([x], lr=0.7, momentum=0.9, nesterov=True)
    x_fp32 = x.clone()  # the same steps fed the float32 sum: what the test would see without quantization
    reference_fp32 = torch.optim.SGD([x_fp32], lr=0.7, momentum=0.9, nesterov=True)
    generator = torch.Generator().manual_seed(100 + rank)
    worst, worst_fp32, sent = 0.0, 0.0, []
    for _ in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(0.01 * torch.randn(p.shape, generator=generator))
        before = engine.global_params.clone()  # float32, as the sync forms Δ_k = x_r - x_k
        deltas = [before - local for local in gathered(torch.cat([p.detach().reshape(-1) for p in params]))]
        if error_feedback:
            deltas = [d + r for d, r in zip(deltas, residuals)]
        pieces = [reference_sum([d[a:b] for d in deltas]) for a, b in spans]
        int8_sum = torch.cat([total for total, _ in pieces])
        residuals = [torch.cat([lost[j] for _, lost in pieces]) for j in range(k)]
        engine.step()
        x.grad, x_fp32.grad = int8_sum.double() / k, sum(deltas).double() / k
        reference.step()
        reference_fp32.step()
        scale = (int8_sum / k).abs().max().item()
        worst = max(worst, (engine.global_params.double() - x.detach()).abs().max().item() / scale)
        worst_fp32 = max(worst_fp32, (engine.global_params.double() - x_fp32.detach()).abs().max().item() / scale)
        sent.append(engine.last_metrics["bytes_sent"])
    residual_error = (engine.outer.residual - residuals[rank]).abs().max().item() if error_feedback else None
    return {"x_error": worst, "x_error_vs_float32_sum": worst_fp32, "bytes_sent": sent, "residual_error": residual_error,
            "bucket_numels": [b - a for a, b in spans], "global_digest": digest(engine.global_params),
            "model_digest": digest(torch.cat([p.detach().reshape(-1) for p in params]))}


def run(out_dir: str) -> dict:
    rank = dist.get_rank()
    return {"reducer": reducer_case(rank), "engine": engine_case(rank),
            "error_feedback": engine_case(rank, error_feedback=True)}


if __name__ == "__main__":
    main(run)
