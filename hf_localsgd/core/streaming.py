"""Streaming DiLoCo: the model in P fragments, each synchronized at its own step, its all-reduce overlapping τ
inner steps ("Streaming DiLoCo with overlapping communication", Douillard et al. 2025, arXiv:2501.18512;
docs/methods.md, "Streaming fragments").

Fragment p holds the transformer blocks p, p + P, p + 2P, ... (strided, as in the paper) of the model's
longest `nn.ModuleList`, and a 1/P share of the other parameters (embeddings, final norm: one contiguous run
each), so that fragments are about equal and the bytes of one sync drop by P. Each fragment is a sync unit of
its own (`OuterSync`: its global part, outer optimizer and lr schedule). A round of H steps has P windows of
H/P steps; in window p:

    step (p+1)·H/P - τ:   Δ_{k,p} = x_p - x_{k,p} is sent (the all-reduce runs while the inner steps go on)
    step (p+1)·H/P:       the sum has arrived: x_p <- OuterOpt_p(x_p, Δ_p);  x_{k,p} <- α x_{k,p} + (1 - α) x_p

so every fragment synchronizes once per round and the last one at the round's end. With α = 0 the replicas'
fragment is the new global one; with α > 0 each keeps α of the τ steps it moved on since sending. A partial
round (the end of training) synchronizes the fragments it has not reached, blocking; the model then holds the
global model. A fragment whose sum is not finite is skipped, and every replica restarts from the whole global
model; each fragment counts its own skips in a row against ``max_skipped_syncs``.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .flat import FlatParams, local_values
from .shard import IslandShard
from .sync import InFlight, Outcome, OuterSync


def fragment_spans(model: nn.Module | None, flat: FlatParams, count: int) -> list[list[tuple[int, int]]]:
    """The spans of ``flat``'s vector of each of ``count`` fragments: the blocks of the model's longest
    `nn.ModuleList` strided over them, and the other parameters cut into ``count`` equal runs."""
    positions, offset = {}, 0
    for p in flat.params:
        n = local_values(p).numel()
        positions[id(p)] = (offset, offset + n)
        offset += n
    lists = [m for m in (model.modules() if isinstance(model, nn.Module) else ()) if isinstance(m, nn.ModuleList)]
    blocks = max(lists, key=len) if lists else []
    owner = {}  # parameter -> fragment, for the blocks' parameters
    if len(blocks) >= count:
        for i, block in enumerate(blocks):
            for p in block.parameters():
                owner.setdefault(id(p), i % count)
    spans = [[] for _ in range(count)]
    rest = []
    for p in flat.params:
        (rest if id(p) not in owner else spans[owner[id(p)]]).append(positions[id(p)])
    # The rest as one layout, cut into equal runs of its positions: a 1/count share each.
    others = flat.with_spans(rest) if rest else None
    for i in range(count):
        if others is not None:
            spans[i] += others.subspans(i * others.chunk(count), (i + 1) * others.chunk(count))
    return [_merged(sorted(s)) for s in spans]


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for a, b in spans:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class StreamingSync:
    """P fragment syncs (``fragments``, each an `OuterSync` over its part), sent ``delay`` (τ) steps before their
    outer step, merged by ``alpha`` (α). Offers the sync unit's interface to the engine."""

    carries_payloads = False  # the fragments' sums carry no tail

    def __init__(self, fragments: list[OuterSync], delay: int, alpha: float):
        self.fragments, self.delay, self.alpha = fragments, delay, alpha
        self.in_flight: dict[int, tuple[InFlight, bool]] = {}  # fragment -> (its sums, measured)
        self.done: set[int] = set()  # fragments synchronized in the round in progress
        self._round = Outcome()

    # ------------------------------------------------------------------ the schedule
    @torch.no_grad()
    def at_step(self, inner_step: int, sync_every: int, measure: bool) -> None:
        window = sync_every // len(self.fragments)
        for p, fragment in enumerate(self.fragments):
            if inner_step == (p + 1) * window - self.delay:
                inflight = fragment.send(None, measure)
                self._round.bytes_sent += inflight.bytes_sent
                self.in_flight[p] = (inflight, measure)
            if inner_step == (p + 1) * window:
                self._apply(p, mix=True, measure=measure)

    def _apply(self, p: int, mix: bool, measure: bool = False) -> None:
        fragment = self.fragments[p]
        if p not in self.in_flight:  # (not sent yet: a partial round; or its send step was skipped by a resume)
            self.in_flight[p] = (fragment.send(None, measure), measure)
            self._round.bytes_sent += self.in_flight[p][0].bytes_sent
        inflight, measured = self.in_flight.pop(p)
        started = time.perf_counter()
        fragment.receive(inflight)
        waited = time.perf_counter() - started
        outcome = fragment.apply(inflight, measured, has_tail=False)
        outcome.wait_seconds = waited
        if outcome.skipped:
            # Every replica restarts from the whole global model, as after a skipped blocking sync: a diverged
            # replica is not finite in this fragment only, and its other fragments would spread it back through
            # the gradients of the next steps. (At most one fragment's sum is in flight: τ < H/P.)
            for f in self.fragments:
                f.write_model()
        elif outcome.applied and mix:
            fragment.shard.pull_toward(fragment.global_params, 1.0 - self.alpha)  # α local + (1 - α) global
        else:
            fragment.write_model()
        self.done.add(p)
        self._round.merge(outcome)

    @torch.no_grad()
    def __call__(self, tail: torch.Tensor | None = None, measure: bool = False) -> Outcome:
        """The round ends: fragments it has not synchronized yet (a partial round) synchronize now, blocking."""
        for p in range(len(self.fragments)):
            if p not in self.done:
                self._apply(p, mix=False, measure=measure)
        outcome, self._round, self.done = self._round, Outcome(), set()
        return outcome

    def drop_in_flight(self) -> None:
        for p, (inflight, _) in list(self.in_flight.items()):
            self.fragments[p].receive(inflight)
            del self.in_flight[p]

    def flush(self) -> Outcome | None:
        for p in list(self.in_flight):
            self._apply(p, mix=False)
        outcome, self._round = self._round, Outcome()
        return outcome

    # ------------------------------------------------------------------ the global model, fragment by fragment
    @property
    def lr(self) -> float:
        return self.fragments[0].lr

    @property
    def state_device(self) -> torch.device:
        return self.fragments[0].state_device

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The first fragment's outer optimizer (each fragment has its own: ``fragments[p].optimizer``)."""
        return self.fragments[0].optimizer

    @property
    def global_params(self) -> torch.Tensor:
        """The global model in the model's flat order (a new tensor). Inside DDP islands a rank keeps a span of
        each fragment, not one span of the model: `RoundEngine.global_model_params()` puts the model together."""
        if any(isinstance(f.shard, IslandShard) for f in self.fragments):
            raise ValueError("global_params: inside DDP islands each rank keeps a span of every fragment; "
                             "RoundEngine.global_model_params() gathers the global model (every rank calls it)")
        return self._in_model_order([f.global_params for f in self.fragments])

    @property
    def skipped(self) -> int:
        return sum(f.skipped for f in self.fragments)

    @property
    def skipped_in_a_row(self) -> int:
        # Each fragment counts its own: max_skipped_syncs stops training when one fragment reaches it.
        return max(f.skipped_in_a_row for f in self.fragments)

    @property
    def eval_differs(self) -> bool:
        # Always: between a fragment's outer step and the round's end, that fragment trains on (whatever α).
        return True

    def broadcast(self) -> None:
        for f in self.fragments:
            f.broadcast()

    def reset_from_model(self) -> None:
        for f in self.fragments:
            f.reset_from_model()

    def write_eval(self) -> None:
        for f in self.fragments:
            f.write_eval()

    def gather_eval(self) -> torch.Tensor:
        return self._in_model_order([f.gather_eval() for f in self.fragments])

    def _in_model_order(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The fragments' whole parts (each in its layout's order) put back in the model's flat order."""
        whole = torch.empty(self.fragments[0].shard.full.total_numel, dtype=torch.float32, device=parts[0].device)
        for f, part in zip(self.fragments, parts):
            position = 0
            for a, b in f.shard.full.spans:
                whole[a:b].copy_(part[position : position + b - a])
                position += b - a
        return whole

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        in_flight = {p: (f.receive(i).delta, m) for p, (i, m) in self.in_flight.items()
                     for f in [self.fragments[p]]}  # waited for: applied at the same step after a resume
        r = self._round  # what the round in progress did so far: its metrics at the round's end
        return {"fragments": [f.state_dict() for f in self.fragments], "fragments_in_flight": in_flight,
                "fragments_done": sorted(self.done), "round_bytes_sent": r.bytes_sent,
                "round_outcome": {"applied": r.applied, "skipped": r.skipped, "norms": r.norms,
                                  "wait_seconds": r.wait_seconds}}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("fragments", ())) != len(self.fragments):
            raise ValueError(f"num_fragments: the checkpoint has {len(state.get('fragments', ()))} fragments, this "
                             f"run {len(self.fragments)}: resume with the same num_fragments")
        for f, s in zip(self.fragments, state["fragments"]):
            f.load_state_dict(s)
        self.in_flight = {p: (InFlight(d.to(self.fragments[p].state_device), self.fragments[p].flat.numel,
                                       received=True), m) for p, (d, m) in state["fragments_in_flight"].items()}
        self.done = set(state["fragments_done"])
        outcome = dict(state.get("round_outcome", {}))
        if outcome.get("norms") is not None:  # (loaded on the CPU; summed with the next fragments' on the device)
            outcome["norms"] = outcome["norms"].to(self.fragments[0].flat.device)
        self._round = Outcome(bytes_sent=state["round_bytes_sent"], **outcome)
