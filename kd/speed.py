"""A model's size and speed: its parameter count, batch-1 latency and throughput.

What `kd eval` reports as a model's cost, for every task: `count_params`, `latency_ms` (the
median wall time of one forward pass of one sample) and `throughputs` (samples/s of several
models timed in turns on the same batch, so a clock or load change hits them alike), run under
`torch_threads` so the numbers do not depend on the machine's default thread count.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

LATENCY_WARMUP = 5  # untimed batch-1 passes before timing
THROUGHPUT_WARMUP = 1  # untimed full-batch passes per model before timing


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch threads, then restore the previous number."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def latency_ms(model: nn.Module, x: torch.Tensor, runs: int, warmup: int = LATENCY_WARMUP) -> float:
    # x: (1, *input_shape) -> median wall time of one forward pass, in milliseconds
    model.eval()
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def throughputs(models: list[nn.Module], x: torch.Tensor | list[torch.Tensor], runs: int,
                warmup: int = THROUGHPUT_WARMUP) -> list[float]:
    # x: (B, *input_shape), or one such batch per model (the same samples in each model's own
    # form) -> samples/s of each model, from the median time of `runs` passes.
    # The models take turns within each run, so a clock or load change hits them alike.
    inputs = x if isinstance(x, (list, tuple)) else [x] * len(models)
    for model in models:
        model.eval()
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for model, batch in zip(models, inputs):
            for _ in range(warmup):
                model(batch)
        for _ in range(runs):
            for model, batch, timed in zip(models, inputs, times):
                start = time.perf_counter()
                model(batch)
                timed.append(time.perf_counter() - start)
    return [len(batch) / statistics.median(timed) for batch, timed in zip(inputs, times)]
