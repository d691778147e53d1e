"""``prefixshare bench --self-check``: what the self-check that ``patch`` runs costs, per model shape and backend.

For each cell: the wall time of ``patch(model, verify=True)`` minus that of ``patch(model, verify=False)`` (the
self-check alone, median of ``repeats``), the model forwards it ran and the backward calls of its LM head (two backward passes: the packed batch, one call; the runs alone, one per sequence), and, for FlexAttention,
the graphs dynamo compiled for it (its probe has sequences of its own lengths, which training shapes may not need).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..patch import patch, unpatch
from ..testing.tiny import tiny_model
from .bench import MODEL_SHAPES


@dataclass
class SelfCheckCost:
    shape: str
    backend: str
    dtype: str
    parameters: int
    seconds: float
    forwards: int
    backwards: int
    compiled_graphs: int | None


def _build(shape: str, backend: str, dtype: torch.dtype, device: str):
    kernel = "eager" if backend == "eager" else "sdpa"
    if shape == "test":  # the tiny Llama of the test suite
        return tiny_model("llama", kernel, dtype=dtype).to(device)
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**MODEL_SHAPES[shape], pad_token_id=0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=kernel, dtype=dtype).to(device).eval()


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure(shapes, backends, *, dtype=torch.float32, device="cpu", repeats=3) -> list[SelfCheckCost]:
    results = []
    for shape in shapes:
        for backend in backends:
            model = _build(shape, backend, dtype, device)
            calls = {"forward": 0, "backward": 0}
            handles = [
                model.register_forward_pre_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1)),
                # (on the LM head: its output is a tensor, the model's a ModelOutput that backward hooks skip)
                model.get_output_embeddings().register_full_backward_pre_hook(
                    lambda *_: calls.__setitem__("backward", calls["backward"] + 1)
                ),
            ]
            timings, graphs = [], None
            for i in range(repeats + 1):  # the first round warms up (and compiles: counted, not timed)
                unpatch(model)
                start = time.perf_counter()
                patch(model, backend=backend, verify=False)
                plain = time.perf_counter() - start
                unpatch(model)
                before, calls["forward"], calls["backward"] = _graphs(), 0, 0
                start = time.perf_counter()
                patch(model, backend=backend, verify=True)
                checked = time.perf_counter() - start
                if i == 0:
                    graphs = _graphs() - before if backend == "flex_attention" else None
                    counted = dict(calls)
                else:
                    timings.append(checked - plain)
            for handle in handles:
                handle.remove()
            results.append(SelfCheckCost(
                shape, backend, str(dtype).removeprefix("torch."), sum(p.numel() for p in model.parameters()),
                statistics.median(timings), counted["forward"], counted["backward"], graphs,
            ))  # fmt: skip
    return results


def format_table(results: list[SelfCheckCost], device: str) -> str:
    from .machine import describe_machine

    lines = [
        f"Self-check cost ({describe_machine(device)}): patch(verify=True) minus patch(verify=False), median",
        "",
        "| model | parameters | backend | dtype | self-check | model forwards | LM-head backward calls | graphs compiled |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        graphs = "-" if r.compiled_graphs is None else str(r.compiled_graphs)
        lines.append(
            f"| {r.shape} | {r.parameters / 1e6:.2f}M | {r.backend} | {r.dtype} | {r.seconds * 1e3:.0f} ms | "
            f"{r.forwards} | {r.backwards} | {graphs} |"
        )
    return "\n".join(lines)


def save(results: list[SelfCheckCost], path: str) -> None:
    import json

    with open(path, "w") as f:
        json.dump([asdict(r) for r in results], f, indent=1)
