"""What the throughput benches (``bench`` and ``bench --groups``) share: the first fields of a result, the progress
bar, the warm-up, the timed loop and the sizes of what was timed. Written once so that both measure the same way."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from .machine import describe_machine


@dataclass
class RunInfo:
    """Where and on what a throughput result was measured: the fields every result (and its JSON) starts with."""

    machine: str
    device: str
    torch: str
    transformers: str
    model_shape: str
    dtype: str
    lora: bool

    def heading(self) -> str:
        """The part of a table's heading that names the machine, the versions and the model."""
        return (
            f"{self.machine}, {self.device}, torch {self.torch}, transformers {self.transformers}, "
            f"model {self.model_shape}"
        )


def run_fields(device: str, shape: str, dtype: torch.dtype, lora: bool) -> dict:
    """Keyword arguments of a result: its :class:`RunInfo` fields, described from this process, and ``date``
    (the UTC day)."""
    import transformers

    return dict(
        machine=describe_machine(device), device=device, torch=torch.__version__, transformers=transformers.__version__,
        model_shape=shape, dtype=str(dtype).replace("torch.", ""), lora=lora,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    )  # fmt: skip


def progress_bar(cells: list, desc: str, enabled: bool = True):
    """A tqdm bar over ``cells`` on stderr; ``set_postfix_str`` names the cell. (tqdm is always there: transformers
    requires it.)"""
    from tqdm.auto import tqdm

    return tqdm(cells, desc=desc, disable=not enabled)


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a timer must not stop before it ends)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def warm_up(model, step, batches: list, device: str) -> None:
    """``step`` on the first batch, on CUDA on every batch (kernels compile and autotune per shape there, and that
    must not be timed), then drop the gradients it left."""
    for batch in batches if device.startswith("cuda") else batches[:1]:
        step(batch)
    model.zero_grad(set_to_none=True)


def time_steps(model, step, batches: list, device: str, measure_peak: bool = True) -> tuple[float, float | None]:
    """``(seconds per step, peak MB)``: ``step`` over ``batches``, one step each, timed between two syncs.

    The peak is CUDA's allocated memory during the loop (``measure_peak=False`` or off CUDA: None); the gradients
    are dropped afterwards.
    """
    cuda = device.startswith("cuda")
    sync(device)
    if cuda and measure_peak:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    sync(device)
    seconds = (time.perf_counter() - start) / len(batches)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda and measure_peak else None
    model.zero_grad(set_to_none=True)
    return seconds, peak_mb


def step_sizes(steps: list[list]) -> dict:
    """Per step, on average: real and padded tokens; rows and row length of the first batch of the first step.

    ``steps``: for each step, the batches (:class:`~prefixshare.collators.PrefixShareBatch`) its forwards take.
    """
    batches = [batch for step in steps for batch in step]
    return {
        "tokens_real": sum(b.layout.num_tokens for b in batches) // len(steps),
        "tokens_padded": sum(b["input_ids"].numel() for b in batches) // len(steps),
        "rows": batches[0].layout.shape[0],
        "row_length": batches[0].layout.shape[1],
    }
