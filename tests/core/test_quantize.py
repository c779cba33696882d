"""int8 outer gradients (``outer_comm_dtype="int8"``): blockwise absmax quantization against references written
here, error feedback, the bytes on the wire, and `Int8AllReduce` / `RoundEngine` on two real processes against
the pipeline simulated from every rank's input."""

from __future__ import annotations

import math

import pytest
import torch

from hf_localsgd import RoundEngine
from hf_localsgd.core.collectives import AllReduce
from hf_localsgd.core.metrics import ring_bytes
from hf_localsgd.core.options import LocalSGDOptions
from hf_localsgd.core.quantize import BLOCK_SIZE, Int8AllReduce, dequantize_blockwise, int8_bytes_sent, quantize_blockwise


def reference_quantize(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block by block: scale = absmax / 127, q = round(x / scale) (halves to even); a zero block: scale 0, q 0."""
    q, scales = [], []
    for start in range(0, len(x), block):
        part = x[start : start + block]
        scale = part.abs().max() / 127
        scales.append(scale)
        q.append((part / scale).round().to(torch.int8) if scale > 0 else torch.zeros(len(part), dtype=torch.int8))
    return torch.cat(q), torch.stack(scales)


def test_quantize_hand_values():
    """block 4: absmax 127 gives scale 1 (halves round to even); a zero block; a last block of two elements."""
    x = torch.tensor([127.0, -2.5, 3.5, -0.5, 0.0, 0.0, 0.0, 0.0, -0.25, 0.5])
    q, scales = quantize_blockwise(x, 4)
    assert q.dtype == torch.int8 and q.tolist() == [127, -2, 4, 0, 0, 0, 0, 0, -64, 127]
    assert scales.tolist() == [1.0, 0.0, torch.tensor(0.5 / 127).item()]
    assert dequantize_blockwise(q, scales, 4)[:8].tolist() == [127.0, -2.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("numel,block", [(1, 2048), (2047, 2048), (2048, 2048), (2049, 2048), (5000, 2048),
                                         (1000, 7)])
def test_quantize_matches_the_reference(numel, block):
    g = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=g) * torch.logspace(-4, 2, numel)  # scales that differ block to block
    if numel > 2 * block:
        x[block : 2 * block] = 0  # a zero block
    q, scales = quantize_blockwise(x, block)
    ref_q, ref_scales = reference_quantize(x, block)
    assert q.equal(ref_q) and scales.equal(ref_scales)
    assert len(scales) == math.ceil(numel / block)
    back = dequantize_blockwise(q, scales, block)
    assert back.equal(torch.cat([q[i * block : (i + 1) * block].float() * s for i, s in enumerate(scales)]))
    step = torch.repeat_interleave(scales, block)[:numel]
    assert ((back - x).abs() <= step / 2 * (1 + 1e-6)).all()  # at most half a step off
    # every block's ±absmax lands on ±127 exactly
    for i in range(len(scales)):
        part, part_q = x[i * block : (i + 1) * block], q[i * block : (i + 1) * block]
        if scales[i] > 0:
            assert part_q[part.abs().argmax()].abs().item() == 127


def test_non_finite_values_stay_non_finite():
    """A NaN or inf outer gradient must not come back finite (the engine's checks catch it later)."""
    for bad in (float("nan"), float("inf")):
        x = torch.ones(10)
        x[3] = bad
        back = dequantize_blockwise(*quantize_blockwise(x, 4), 4)
        assert not back[:4].isfinite().any() and back[4:].equal(torch.ones(6))


def test_error_feedback_delays_what_quantization_drops():
    """With e_t = v_t - Q(v_t), v_t = g_t + e_{t-1}, what was sent plus the last residual is what was given:
    nothing is lost (to float rounding), while plain quantization loses about a round's error every round."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4096, generator=g) for _ in range(20)]
    residual, sent, dropped_sent = torch.zeros(4096), torch.zeros(4096), torch.zeros(4096)
    for grad in grads:
        v = grad + residual
        q = dequantize_blockwise(*quantize_blockwise(v))
        residual = v - q
        sent += q
        dropped_sent += dequantize_blockwise(*quantize_blockwise(grad))
    total = sum(grads)
    assert (sent + residual - total).abs().max() < 1e-4
    assert (dropped_sent - total).abs().max() > 10 * (sent - total).abs().max() / 5


def test_bytes_on_the_wire():
    """0.25 + 1/2048 of a float32 ring all-reduce for a buffer of whole chunks; a GPT-Neo-8M-sized buffer
    (8,054,656 elements) stays within [0.25, 0.27] for 2 to 64 ranks; padding is counted."""
    for k in (2, 4, 8):
        whole = k * BLOCK_SIZE * 100
        assert int8_bytes_sent(whole, k) / ring_bytes(4 * whole, k) == pytest.approx(0.25 + 1 / 2048, abs=1e-12)
    for k in (2, 8, 64):
        ratio = int8_bytes_sent(8_054_656, k) / ring_bytes(4 * 8_054_656, k)
        assert 0.25 < ratio <= 0.27
    assert int8_bytes_sent(10, 2) == 2 * (1 / 2) * (4096 + 4 * 2)  # 10 elements travel as 2 chunks of one block
    assert int8_bytes_sent(10, 1) == 0.0


def test_one_process_sums_nothing():
    reducer = Int8AllReduce()
    buf, residual = torch.ones(5), torch.full((5,), 0.5)
    assert reducer.world_size == 1 and reducer.exact is False
    assert reducer.sum_(buf) is buf and reducer.start(buf).wait() is buf
    assert reducer.sum_(buf, residual=residual) is buf  # nothing is quantized: the residual is handed over whole
    assert buf.tolist() == [1.5] * 5 and residual.tolist() == [0.0] * 5
    assert reducer.bytes_sent(10**6, 3) == 0.0
    with pytest.raises(ValueError, match="^residual: "):
        reducer.sum_(buf, exact=True, residual=residual)
    with pytest.raises(ValueError, match="^residual: must be float32"):
        reducer.sum_(buf, residual=torch.zeros(4))
    with pytest.raises(ValueError, match="^outer_comm_dtype: .*Int8AllReduce"):
        AllReduce(None, "int8")


def test_error_feedback_option():
    assert LocalSGDOptions(outer_comm_dtype="int8", outer_error_feedback=True).outer_error_feedback
    assert LocalSGDOptions(outer_comm_dtype="bfloat16", outer_error_feedback=True).outer_error_feedback
    with pytest.raises(ValueError, match="^outer_error_feedback: needs a lossy outer_comm_dtype"):
        LocalSGDOptions(outer_error_feedback=True)
    with pytest.raises(ValueError, match="^outer_error_feedback: must be True or False"):
        LocalSGDOptions(outer_comm_dtype="int8", outer_error_feedback="yes")
    assert isinstance(RoundEngine(torch.nn.Linear(2, 2), outer_comm_dtype="int8").reducer, Int8AllReduce)
    engine = RoundEngine(torch.nn.Linear(2, 2), outer_comm_dtype="int8", outer_error_feedback=True)
    assert engine.outer.residual.tolist() == [0.0] * 6 and "error_feedback_residual" in engine.state_dict()


def test_int8_all_reduce_on_two_processes(core_runs):
    """Bit for bit the pipeline simulated from both ranks' inputs: all-to-all of quantized chunks, float32 sums,
    quantized again, all-gathered; the same on both ranks; `start().wait()` is `sum_()`; the residuals are what
    each rank's first quantization lost (int8), or its bfloat16 rounding (AllReduce)."""
    r0, r1 = (r["reducer"] for r in core_runs["int8"])
    for r in (r0, r1):
        assert r["sum_matches"] and r["residual_matches"] and r["start_matches_sum"] and r["exact_matches"], r
        assert r["bf16_residual_matches"] and r["bf16_sum_matches"], r
        assert r["dtype"] == "torch.float32" and r["new_tensor"]
        assert 0 < r["worst_error"] < 0.05  # int8 does round (the inputs are ~N(0, 2))
    assert r0["sum_digest"] == r1["sum_digest"]


def test_round_engine_with_int8_outer_gradients(core_runs):
    """Three Nesterov syncs follow the reference fed the simulated int8 sum per bucket (and not the float32 sum),
    the replicas agree, and bytes_sent is the bytes of both buckets, each padded to 2 chunks of a block, plus
    the float32 all-reduce of the drift statistic."""
    r0, r1 = (r["engine"] for r in core_runs["int8"])
    assert r0["bucket_numels"] == [2048, 296]
    for r in (r0, r1):
        assert r["x_error"] < 1e-5 < 1e-3 < r["x_error_vs_float32_sum"], r
        assert r["bytes_sent"] == [2 * (2 - 1) / 2 * 2 * (4096 + 4 * 2) + ring_bytes(4, 2)] * 3
    assert r0["global_digest"] == r1["global_digest"] and r0["model_digest"] == r1["model_digest"]


def test_error_feedback_in_the_engine(core_runs):
    """With outer_error_feedback, each rank adds its residual to its next outer gradient: three syncs follow the
    reference that does the same, and each rank's residual is the reference's."""
    for r in (r["error_feedback"] for r in core_runs["int8"]):
        assert r["x_error"] < 1e-5 and r["residual_error"] < 1e-6, r
