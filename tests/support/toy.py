"""A tiny MLP and deterministic stand-ins for inner steps, for the engine's single-process tests."""

from __future__ import annotations

import torch


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def flat(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()]).double()


def local_steps(m: torch.nn.Module, n: int, generator: torch.Generator) -> None:
    """Stand-in for n inner optimizer steps: deterministic pseudo-random moves."""
    with torch.no_grad():
        for _ in range(n):
            for p in m.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=generator))
