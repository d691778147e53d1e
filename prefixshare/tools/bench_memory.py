"""``prefixshare bench --memory``: peak memory of the log-prob stage, three ways side by side.

The stage: from the decoder's final hidden states to the per-response log-probs, forward and backward
(the gradient flows back into the hidden states; the LM head is frozen, as with LoRA or QLoRA, unless
``--train-head``). Everything before it (the decoder) is the same for the two shared formats and only
adds to the paired one, so it is left out. The formats, fed the same pairs:

    paired-native  the classic paired batch (2B rows); the LM head on every position, the full [2B, L, V]
                   logits and their float32 log-softmax, then the gather: what TRL's DPOTrainer computes
                   without a fused LM head
    shared [T,V]   the prefix-shared batch; the LM head on the T positions that predict response tokens,
                   their [T, V] logits kept, the float32 log-softmax chunked and recomputed in backward:
                   prefixshare's path before the log-prob engine (kept here, privately, to measure it)
    shared fused   the prefix-shared batch through the log-prob engine's chunk pass
                   (prefixshare.engine): at most one [chunk, V] block at a time

Each (format, vocabulary, tokens) cell runs in a fresh subprocess. CPU: the peak resident set size above
the RSS just before the stage (the kernel's high-water mark, reset first through /proc/self/clear_refs;
glibc is told to serve every block over 128 KiB with mmap, so freed blocks leave the RSS). CUDA:
``torch.cuda.max_memory_allocated`` above ``memory_allocated`` before the stage. Time: the stage's wall
clock, the best of ``--repeats`` runs after the measured one.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import torch

MEMORY_FORMATS = ("paired-native", "shared [T,V]", "shared fused")
VOCABULARIES = (32000, 128256, 262144)
TOKENS = (512, 2048)
HIDDEN = 256
# every pair: a prompt of 128 tokens and two responses of 128: T = 256 response tokens per pair
PROMPT, RESPONSE = 128, 128
_TV_CHUNK = 1024  # the [T, V] path's log-softmax chunk (its default)


@dataclass
class MemoryCell:
    format: str
    vocab: int
    tokens: int  # T, response tokens
    chunk: int  # the engine's rows per chunk
    peak_mb: float | None
    seconds: float | None
    hidden_mb: float  # the stage's input hidden states of this format
    skipped: str = ""


@dataclass
class MemoryResult:
    machine: str
    device: str
    torch: str
    dtype: str
    hidden: int
    train_head: bool
    date: str
    cells: list[MemoryCell] = field(default_factory=list)

    def cell(self, fmt: str, vocab: int, tokens: int) -> MemoryCell | None:
        return next((c for c in self.cells if (c.format, c.vocab, c.tokens) == (fmt, vocab, tokens)), None)


# ---------------------------------------------------------------------------------------------- one cell
def _examples(tokens: int, vocab: int, seed: int = 0) -> list[dict]:
    pairs = max(1, tokens // (2 * RESPONSE))
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [dict(prompt_input_ids=ids(PROMPT), chosen_input_ids=ids(RESPONSE), rejected_input_ids=ids(RESPONSE))
            for _ in range(pairs)]  # fmt: skip


def _status_bytes(key: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes: ``VmRSS`` (the resident set size now),
    ``VmHWM`` (its peak, the "high-water mark")."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # the file counts kB
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS ("high-water mark") to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _tv_token_logps(head, rows, targets):
    """prefixshare's path before the engine: ``[T, V]`` logits kept, the float32 log-softmax chunked."""
    from torch.utils.checkpoint import checkpoint

    from ..logps import token_logps

    logits = head(rows)  # [T, V] in the head's dtype, alive until the backward
    if logits.shape[0] <= _TV_CHUNK:
        return token_logps(logits, targets)
    parts = [
        checkpoint(token_logps, logits[i : i + _TV_CHUNK], targets[i : i + _TV_CHUNK], use_reentrant=False)
        for i in range(0, len(logits), _TV_CHUNK)
    ]
    return torch.cat(parts)


def _stage(fmt: str, head, hidden, batch, chunk: int):
    """Forward and backward of the log-prob stage of ``fmt`` on ``hidden`` ``[B, L, H]``."""
    from ..engine import LogitProcessing, fused_token_logps
    from ..logps import sum_per_response

    layout = batch.layout
    targets = batch["input_ids"].reshape(-1)[layout.target_index]
    if fmt == "paired-native":
        logits = head(hidden)  # [2B, L, V]
        log_p = torch.log_softmax(logits.float(), dim=-1)  # the full float32 log-softmax
        B, L, V = log_p.shape
        per_token = log_p.reshape(B * L, V)[layout.predictor_index].gather(-1, targets[:, None]).squeeze(-1)
        logps = sum_per_response(per_token, layout)
        del logits, log_p
    else:
        B, L, H = hidden.shape
        rows = hidden.reshape(B * L, H).index_select(0, layout.predictor_index)
        if fmt == "shared [T,V]":
            per_token = _tv_token_logps(head, rows, targets)
        else:
            per_token, _ = fused_token_logps(head, rows, targets, LogitProcessing(), chunk)
        logps = sum_per_response(per_token, layout)
    logps.sum().backward()


def run_cell(fmt: str, vocab: int, tokens: int, *, hidden_size: int = HIDDEN, device: str = "cpu",
             dtype: torch.dtype = torch.float32, train_head: bool = False, repeats: int = 1,
             chunk_size: int | None = None) -> MemoryCell:
    """One cell, in this process (the parent runs each in a fresh subprocess)."""
    from ..collators import PairedCollator, PrefixShareCollator
    from ..engine import default_chunk_size

    torch.manual_seed(0)
    examples = _examples(tokens, vocab)
    collator = PairedCollator(0) if fmt == "paired-native" else PrefixShareCollator(0)
    batch = collator(examples).to(device)
    head = torch.nn.Linear(hidden_size, vocab, bias=False, device=device, dtype=dtype).requires_grad_(train_head)
    B, L = batch.layout.shape
    hidden = torch.randn(B, L, hidden_size, device=device, dtype=dtype, requires_grad=True)
    chunk = chunk_size or default_chunk_size(vocab)

    # warm-up on a few rows (library initialization), then the measured run from a clean baseline
    small = PrefixShareCollator(0)(examples[:1]).to(device)
    _stage("shared fused", head, torch.randn(*small.layout.shape, hidden_size, device=device, dtype=dtype,
                                             requires_grad=True), small, chunk)  # fmt: skip
    head.zero_grad(set_to_none=True)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _status_bytes("VmRSS")
    start = time.perf_counter()
    _stage(fmt, head, hidden, batch, chunk)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda") else _status_bytes("VmHWM")) - base
    for _ in range(repeats - 1):  # timing only
        hidden.grad = None
        head.zero_grad(set_to_none=True)
        start = time.perf_counter()
        _stage(fmt, head, hidden, batch, chunk)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = min(seconds, time.perf_counter() - start)
    return MemoryCell(fmt, vocab, tokens, chunk, peak / 2**20, seconds, hidden.numel() * hidden.element_size() / 2**20)


# ---------------------------------------------------------------------------------------------- the grid
def predicted_peak_bytes(fmt: str, vocab: int, tokens: int, dtype_bytes: int = 4, chunk_size: int | None = None) -> int:
    """A rough upper estimate of a cell's peak, to skip cells that cannot fit (``--memory-limit-gb``)."""
    from ..engine import default_chunk_size

    pairs = max(1, tokens // (2 * RESPONSE))
    if fmt == "paired-native":  # logits, their float32 log-softmax and its gradient
        return 3 * 2 * pairs * (PROMPT + RESPONSE) * vocab * max(dtype_bytes, 4)
    if fmt == "shared [T,V]":  # [T, V] logits, a float32 chunk, their gradient (measured: about 3.4x [T, V])
        return 7 * tokens * vocab * max(dtype_bytes, 4) // 2
    return 3 * (chunk_size or default_chunk_size(vocab)) * vocab * 4


def run_memory_bench(
    vocabs=VOCABULARIES,
    tokens=TOKENS,
    *,
    hidden_size: int = HIDDEN,
    device: str = "cpu",
    dtype: str = "float32",
    train_head: bool = False,
    memory_limit_gb: float = 8.0,
    repeats: int = 2,
    threads: int | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
) -> MemoryResult:
    """Every (format, vocabulary, tokens) cell in its own subprocess; cells predicted above the limit are skipped."""
    from .machine import describe_machine

    result = MemoryResult(
        machine=describe_machine(device), device=device, torch=torch.__version__, dtype=dtype, hidden=hidden_size,
        train_head=train_head, date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    )  # fmt: skip
    env = {
        **os.environ,
        # every block over 128 KiB from mmap, returned to the system when freed: the RSS follows live memory
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "MALLOC_TRIM_THRESHOLD_": "131072",
    }
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    for vocab in vocabs:
        for n in tokens:
            for fmt in MEMORY_FORMATS:
                predicted = predicted_peak_bytes(fmt, vocab, n, torch.finfo(getattr(torch, dtype)).bits // 8, chunk_size)
                if predicted > memory_limit_gb * 2**30:
                    skipped = f"skipped: needs about {predicted / 2**30:.1f} GB (limit {memory_limit_gb:g} GB)"
                    result.cells.append(MemoryCell(fmt, vocab, n, 0, None, None, 0.0, skipped))
                    if progress:
                        print(f"memory bench: {fmt}, V={vocab}, T={n}: {skipped}", file=sys.stderr, flush=True)
                    continue
                spec = dict(fmt=fmt, vocab=vocab, tokens=n, hidden_size=hidden_size, device=device, dtype=dtype,
                            train_head=train_head, repeats=repeats, chunk_size=chunk_size)  # fmt: skip
                if progress:
                    print(f"memory bench: {fmt}, V={vocab}, T={n} ...", file=sys.stderr, flush=True)
                out = subprocess.run(
                    [sys.executable, "-m", "prefixshare.tools.bench_memory", json.dumps(spec)],
                    capture_output=True, text=True, env=env,
                )  # fmt: skip
                if out.returncode != 0:
                    raise RuntimeError(f"memory bench cell {spec} failed:\n{out.stderr[-3000:]}")
                result.cells.append(MemoryCell(**json.loads(out.stdout.strip().splitlines()[-1])))
    return result


def format_memory_table(result: MemoryResult) -> str:
    head = "frozen" if not result.train_head else "trainable"
    lines = [
        f"prefixshare bench --memory: {result.machine}, {result.device}, torch {result.torch}, {result.dtype}, "
        f"hidden {result.hidden}, LM head {head}, {result.date}",
        "",
        "| vocab | tokens T | paired-native MB | shared [T,V] MB | shared fused MB (chunk) | fused / ([chunk, V] fp32 + "
        "hidden) | [T,V] / fused | time fused / [T,V] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(c.vocab, c.tokens) for c in result.cells})
    for vocab, n in keys:
        native, tv, fused = (result.cell(f, vocab, n) for f in MEMORY_FORMATS)

        def mb(c):
            if c is None:
                return "-"
            return c.skipped.split(":")[0] + " [s]" if c.skipped else f"{c.peak_mb:.0f}"

        bound = ratio = speed = "-"
        if fused and fused.peak_mb is not None:
            block = min(fused.chunk, n) * vocab * 4 / 2**20  # the largest block of the run
            bound = f"{fused.peak_mb / (block + fused.hidden_mb):.2f}x"
            if tv and tv.peak_mb is not None:
                ratio = f"{tv.peak_mb / max(fused.peak_mb, 1e-9):.1f}x"
                speed = f"{fused.seconds / tv.seconds:.2f}"
        fused_cell = f"{mb(fused)} ({fused.chunk})" if fused and fused.peak_mb is not None else mb(fused)
        lines.append(f"| {vocab} | {n} | {mb(native)} | {mb(tv)} | {fused_cell} | {bound} | {ratio} | {speed} |")
    lines += [
        "",
        "Peak memory of one forward+backward of the log-prob stage above the memory before it (CPU: peak RSS, "
        "each cell in its own process; CUDA: max_memory_allocated). [s] = not run: the cell's predicted peak "
        "exceeds --memory-limit-gb. fused / (...): the engine's peak over one [min(chunk, T), V] float32 block "
        "plus the hidden states it is given. time: the stage's best wall clock of the run's repeats.",
    ]
    return "\n".join(lines)


def save_memory(result: MemoryResult, json_path: str) -> None:
    with open(json_path, "w") as f:
        json.dump(asdict(result), f, indent=2)


if __name__ == "__main__":  # one cell: python -m prefixshare.tools.bench_memory '{"fmt": ..., ...}'
    spec = json.loads(sys.argv[1])
    spec["dtype"] = getattr(torch, spec.pop("dtype"))
    cell = run_cell(spec.pop("fmt"), spec.pop("vocab"), spec.pop("tokens"), **spec)
    print(json.dumps(asdict(cell)))
