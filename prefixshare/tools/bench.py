"""``prefixshare bench``: the formats side by side in one run, forward+backward samples/s and memory.

Formats, each fed the same examples every step:
    paired-native    the baseline as users run it today: 2B right-padded rows through the model's own
                     kernel with a padding mask (no layout), full [B, L, V] logits
    paired           the classic concatenated forward (2B rows, right padded) through the patched backend
    paired-packed    the paired sequences packed first-fit-decreasing, each isolated
    shared           prefix sharing, one unit per row
    shared-packed    prefix sharing, units packed first-fit-decreasing
All but paired-native run through the same patched model and backend, so their ratios isolate the format;
every ratio is taken over the best paired format. With ``reward_model=True`` (``prefixshare bench --reward-model``)
the model is a sequence-classification model (a score head, ``num_labels=1``, as trained by TRL's
``RewardTrainer``) and each step back-propagates the sum of every response's reward
(:func:`prefixshare.response_rewards`; paired-native: the model's own pooling at each row's last token). The ideal
speedup is the ratio of real (non-padding) tokens, paired over shared: ``2(p+c)/(p+2c)`` for one pair.

Dataset profiles: the six of the prefix sharing paper (median prompt+completion length and median
prompt/completion ratio of Capybara, HH-RLHF, MetaMath-DPO, TLDR, Tulu-Helpsteer, UltraFeedback; lengths
drawn log-normally around them), and real data when a tokenizer and data files are given.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from ._timing import RunInfo, progress_bar, run_fields, step_sizes, sync, time_steps, warm_up
from ..backends.varlen import has_cuda_varlen_kernel
from ..collators import PairedCollator, PrefixShareCollator
from ..layout import PAD_SEGMENT
from ..engine import response_logps
from ..logps import gather_response_logps
from ..patch import patch
from ..rewards import POSITIONS_KEY, response_rewards, reward_positions
from .stats import dataset_stats

# name -> (median prompt+completion tokens, median prompt/completion ratio), Table 1 of arXiv 2410.20305
PAPER_PROFILES = {
    "capybara": (1160, 1.59),
    "hh-rlhf": (186, 2.15),
    "metamath-dpo": (872, 3.91),
    "tldr": (416, 11.14),
    "tulu-helpsteer": (775, 6.34),
    "ultrafeedback": (409, 0.42),
}

FORMATS = ("paired-native", "paired", "paired-packed", "shared", "shared-packed")

# model shapes: tiny for CPU, Llama-3.2-1B and Llama-3-8B shapes for GPUs (random weights)
MODEL_SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=8192),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}


def lognormal_length(median: float, generator: torch.Generator) -> int:
    """A length drawn log-normally (sigma 0.4) around ``median``, at least one token."""
    return max(1, int(round(median * math.exp(0.4 * float(torch.randn((), generator=generator))))))


def random_ids(n: int, vocab_size: int, generator: torch.Generator) -> list[int]:
    """``n`` random token ids in ``[3, vocab_size)`` (above the pad, BOS and EOS ids of the benches' models)."""
    return torch.randint(3, vocab_size, (n,), generator=generator).tolist()


def synthetic_lengths(profile: str, n: int, seed: int = 0, scale: float = 1.0) -> list[tuple[int, int, int]]:
    """``n`` (prompt, chosen, rejected) lengths whose medians match ``profile`` (times ``scale``)."""
    overall, ratio = PAPER_PROFILES[profile]
    p_med = overall * scale * ratio / (1 + ratio)
    c_med = overall * scale / (1 + ratio)
    g = torch.Generator().manual_seed(seed)
    return [(lognormal_length(p_med, g), lognormal_length(c_med, g), lognormal_length(c_med, g)) for _ in range(n)]


def examples_from_file(path: str, tokenizer, n: int, vocab_size: int) -> list[dict]:
    """The first ``n`` examples of a preference file (any format of :func:`prefixshare.data.load_preferences`), tokenized.

    Token ids are folded into the model's vocabulary (``id % vocab_size``): the bench's models have random
    weights, so only the lengths matter, and a tokenizer's vocabulary may be larger than the tiny model's.
    """
    from ..data import load_preferences, tokenize_preferences

    examples = tokenize_preferences(tokenizer, load_preferences(path, limit=n))
    if len(examples) < n:
        raise ValueError(
            f"{path}: {len(examples)} examples, the bench needs {n} (examples per step x (steps + 1)); "
            "lower --examples-per-step or --steps"
        )
    keys = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
    return [{key: [t % vocab_size for t in e[key]] for key in keys} for e in examples]


def examples_from_lengths(lengths, vocab_size: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        dict(prompt_input_ids=random_ids(p, vocab_size, g), chosen_input_ids=random_ids(c, vocab_size, g),
             rejected_input_ids=random_ids(r, vocab_size, g))
        for p, c, r in lengths
    ]  # fmt: skip


@dataclass
class Measurement:
    profile: str
    backend: str
    format: str
    samples_per_s: float
    step_s: float
    peak_memory_mb: float | None
    tokens_real: int
    tokens_padded: int
    rows: int
    row_length: int
    # where the cell's time went: its first (untimed) step or steps (compiling and autotuning on CUDA), and, in
    # the cell that built its backend's model, building it and patching it (the self-check included)
    warm_up_s: float = 0.0
    build_s: float = 0.0
    patch_s: float = 0.0


@dataclass
class BenchResult(RunInfo):
    gradient_checkpointing: bool
    examples_per_step: int
    steps: int
    date: str
    measurements: list[Measurement] = field(default_factory=list)
    ideal: dict = field(default_factory=dict)
    # cells that ran out of device memory: {"profile", "backend", "format", "error"}
    out_of_memory: list[dict] = field(default_factory=list)
    # cells not run: {"profile", "backend", "format", "reason"} (predicted past the memory limit, or past the time
    # budget)
    skipped: list[dict] = field(default_factory=list)
    memory_limit_gb: float | None = None
    time_budget_s: float | None = None
    reward_model: bool = False  # a sequence-classification model trained on its rewards (no LM head)

    def ratios(self):
        """(profile, backend) -> {format: samples/s over the best paired format}."""
        table = {}
        for m in self.measurements:
            table.setdefault((m.profile, m.backend), {})[m.format] = m.samples_per_s
        out = {}
        for key, row in table.items():
            paired = [v for f, v in row.items() if f.startswith("paired")]
            out[key] = {f: v / max(paired) for f, v in row.items()} if paired else {}
        return out


def collators_for(budget: int):
    return {
        "paired-native": PairedCollator(0),
        "paired": PairedCollator(0),
        "paired-packed": PairedCollator(0, max_tokens_per_row=budget),
        "shared": PrefixShareCollator(0),
        "shared-packed": PrefixShareCollator(0, max_tokens_per_row=budget),
    }


def build_model(
    shape: str, backend: str, dtype: torch.dtype, device: str, lora: bool, gradient_checkpointing: bool = False,
    reward_model: bool = False, timings: dict | None = None,
):
    """The bench's model of ``shape``, built on ``device`` directly (no CPU initialization of a 1B or 8B model),
    patched. ``timings``: filled with ``build_s`` and ``patch_s`` (the self-check included)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    from .._compat import enable_gradient_checkpointing

    config = LlamaConfig(**MODEL_SHAPES[shape], max_position_embeddings=16384, pad_token_id=0, num_labels=1)
    torch.manual_seed(0)
    kernel = backend
    if backend in ("varlen", "flex_attention"):
        # the paired-native baseline runs the kernel the model is loaded with: FlashAttention-2 where installed
        kernel = "flash_attention_2" if device.startswith("cuda") and _has_flash_attn() else "sdpa"
    auto = AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM
    start = time.perf_counter()
    with torch.device(device):  # parameters allocated and initialized where they will run
        model = auto.from_config(config, attn_implementation=kernel, dtype=dtype)
    if gradient_checkpointing:  # what fits an 8B model's activations on one GPU; the layout survives recompute
        enable_gradient_checkpointing(model, use_reentrant=False)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    if hasattr(model, "config"):
        model.config.use_cache = False
    sync(device)
    built = time.perf_counter()
    patch(model, backend=backend)
    sync(device)
    if timings is not None:
        timings.update(build_s=built - start, patch_s=time.perf_counter() - built)
    return model


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def native_logps(model, batch) -> torch.Tensor:
    """``[n, K]`` log-probs the way the paired baseline runs today: padding mask, model's kernel, full logits."""
    attention_mask = (batch.layout.segment_ids != PAD_SEGMENT).long()
    logits = model(input_ids=batch["input_ids"], attention_mask=attention_mask, use_cache=False).logits
    return gather_response_logps(logits, batch).logps


def native_rewards(model, batch) -> torch.Tensor:
    """The paired baseline of a reward model: padding mask, the model's kernel and its own pooling."""
    attention_mask = (batch.layout.segment_ids != PAD_SEGMENT).long()
    return model(input_ids=batch["input_ids"], attention_mask=attention_mask, use_cache=False).logits


def time_format(
    model, collator, batches, device: str, native: bool = False, reward_model: bool = False
) -> tuple[float, float | None, dict]:
    """Seconds per step (forward + backward of a DPO-style sum of log-probs, or of the rewards of a reward model)
    and peak memory in MB.

    The first batch is a warm-up step and the rest are timed. On CUDA every batch is run once before the
    timing: kernels compile and autotune per shape there (FlexAttention: the first few shapes), and that
    must not be timed.
    """
    prepared = [collator(b) for b in batches]
    if reward_model:  # where each reward is read, found on the CPU beforehand as a collator does
        for batch in prepared:
            batch[POSITIONS_KEY] = reward_positions(batch.layout, batch["input_ids"], 0)
    prepared = [batch.to(device) for batch in prepared]
    timed = prepared[1:] or prepared

    def step(batch):
        if reward_model:
            values = native_rewards(model, batch) if native else response_rewards(model, batch)
        else:
            values = native_logps(model, batch) if native else response_logps(model, batch).logps
        values.sum().backward()

    start = time.perf_counter()
    warm_up(model, step, prepared, device)
    sync(device)
    warm = time.perf_counter() - start
    elapsed, peak = time_steps(model, step, timed, device)
    return elapsed, peak, step_sizes([[batch] for batch in timed]) | {"warm_up_s": warm}  # one batch a step


# ---------------------------------------------------------------------------------------------- what a cell needs
def predicted_peak_bytes(
    shape: str, batch, fmt: str, backend: str, dtype: torch.dtype, lora: bool = False, reward_model: bool = False
) -> int:
    """A conservative estimate of a cell's peak memory for one forward+backward of ``batch`` (``[B, L]``): weights,
    gradients and Adam-free state, the activations autograd keeps per layer, the attention scores a dense kernel
    keeps (eager: scores and float32 probabilities; sdpa: the dense mask), the masks, and the vocabulary logits
    (paired-native builds ``[B, L, V]`` logits, their float32 log-softmax and its gradient; the engine one chunk).

    Against the peak resident memory of a process running one cell (CPU, tiny shape, capybara at length scale 0.5:
    tests/test_cli.py::test_bench_memory_prediction_covers_a_cells_peak checks one such cell): 0.8x (shared-packed,
    sdpa, 1.6 GB) to 1.8x (paired-native and paired-packed, eager, 4.7 and 7.5 GB): what it is for is skipping the
    cells that would not fit instead of being killed by the kernel, never the other way round."""
    config = MODEL_SHAPES[shape]
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, vocab = config["num_attention_heads"], config["vocab_size"]
    size = torch.finfo(dtype).bits // 8
    B, L = batch["input_ids"].shape
    tokens = B * L
    parameters = layers * (4 * hidden * hidden + 3 * hidden * inter) + 2 * vocab * hidden
    weights = parameters * size * (1 if lora else 2)  # (full fine-tuning: a gradient per weight)
    activations = layers * tokens * (12 * hidden + 4 * inter) * size
    square = B * L * L
    if backend == "eager":
        attention = layers * square * heads * (2 * size + 4)
    else:
        attention = square * heads * 4 if fmt == "paired-native" and backend == "sdpa" else 0  # the math path's scores
    masks = square * (size + 1)
    if reward_model:
        logits = tokens * 4
    elif fmt == "paired-native":
        logits = tokens * vocab * (size + 8)
    else:
        logits = min(batch.layout.num_tokens, 1024) * vocab * 16
    return int(weights + activations + attention + masks + logits + 400 * 2**20)  # (the process itself)


def available_memory_bytes(device: str) -> int:
    """What a cell may use: on CUDA the device's total memory, elsewhere MemAvailable now (Linux), else the total."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_backends(device: str) -> list[str]:
    """Backends that train (forward and backward) at speed on ``device``.

    On CUDA: sdpa, FlexAttention, and varlen where a CUDA varlen kernel is installed. Elsewhere sdpa only: eager
    materializes every score (``--backends eager,sdpa`` still measures it), varlen runs its reference kernel (a
    loop over sequences, for exactness, not speed) and FlexAttention has no backward.
    """
    if device.startswith("cuda"):
        return ["sdpa", "flex_attention"] + (["varlen"] if has_cuda_varlen_kernel() else [])
    return ["sdpa"]


def run_bench(
    profiles: dict[str, list[dict]],
    *,
    backends: list[str],
    shape: str = "tiny",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    lora: bool = False,
    gradient_checkpointing: bool = False,
    examples_per_step: int = 8,
    steps: int = 3,
    budget: int | None = None,
    progress: bool = True,
    reward_model: bool = False,
    memory_limit_gb: float | None = None,
    time_budget_s: float | None = None,
    on_cell=None,
) -> BenchResult:
    """Measure every (profile, backend, format); ``profiles`` maps a name to its examples. ``reward_model``: a
    sequence-classification model trained on its rewards instead of a causal LM on its log-probs.

    ``memory_limit_gb``: skip a cell whose :func:`predicted_peak_bytes` exceeds it (None: 80% of
    :func:`available_memory_bytes` at the start), saying so in ``result.skipped``. ``time_budget_s``: run no cell
    once this many seconds have passed (the cells left are listed as skipped). ``on_cell(kind, record)``: called
    after each cell with ``"measurement"``, ``"out_of_memory"`` or ``"skipped"`` and its dict (the CLI appends it to
    a JSON-lines file, so that a run stopped at any point keeps what it finished)."""
    started = time.perf_counter()
    if memory_limit_gb is None:
        memory_limit_gb = round(0.8 * available_memory_bytes(device) / 2**30, 1)
    result = BenchResult(
        **run_fields(device, shape, dtype, lora), gradient_checkpointing=gradient_checkpointing,
        examples_per_step=examples_per_step, steps=steps, reward_model=reward_model,
        memory_limit_gb=memory_limit_gb, time_budget_s=time_budget_s,
    )

    def report(kind: str, record: dict) -> None:
        getattr(result, {"measurement": "measurements", "out_of_memory": "out_of_memory", "skipped": "skipped"}[kind]).append(
            Measurement(**record) if kind == "measurement" else record
        )
        if on_cell is not None:
            on_cell(kind, record)
    # per profile, once: the step batches, the packing budget, and the ideal speedup of exactly those examples
    plans = {}
    for profile, examples in profiles.items():
        used = examples[: examples_per_step * (steps + 1)]
        longest_pair = max(len(e["prompt_input_ids"]) + len(e["chosen_input_ids"]) + len(e["rejected_input_ids"])
                           for e in examples)
        # the paper's packing length: the batch's share of a fixed token budget, at least the longest unit
        row_budget = budget or max(longest_pair, examples_per_step * longest_pair // 4)
        batches = [used[i * examples_per_step : (i + 1) * examples_per_step] for i in range(steps + 1)]
        plans[profile] = (batches, collators_for(row_budget))
        result.ideal[profile] = dataset_stats(used).token_speedup

    cells = [(p, b, f) for b in backends for p in profiles for f in FORMATS]
    models = {}
    bar = progress_bar(cells, "bench", progress)
    for profile, backend, fmt in bar:
        bar.set_postfix_str(f"{profile} {backend} {fmt}")
        batches, collators = plans[profile]
        cell = dict(profile=profile, backend=backend, format=fmt)
        if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
            report("skipped", cell | dict(reason=f"time budget of {time_budget_s:.0f} s spent"))
            continue
        peak = max(predicted_peak_bytes(shape, collators[fmt](b), fmt, backend, dtype, lora, reward_model) for b in batches)
        if peak > memory_limit_gb * 2**30:
            report("skipped", cell | dict(
                reason=f"predicted peak {peak / 2**30:.1f} GB > limit {memory_limit_gb:g} GB (--memory-limit-gb; "
                "--length-scale or --examples-per-step lower it)"
            ))  # fmt: skip
            continue
        phases = {}
        if backend not in models:
            models.clear()  # one model in memory at a time
            models[backend] = build_model(
                shape, backend, dtype, device, lora, gradient_checkpointing, reward_model, timings=phases
            )
        try:
            step_s, peak, sizes = time_format(
                models[backend], collators[fmt], batches, device, native=fmt == "paired-native", reward_model=reward_model
            )
        except torch.cuda.OutOfMemoryError as error:  # one format too large for the device: report it, go on
            models[backend].zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            report("out_of_memory", cell | dict(error=str(error).split("\n")[0]))
            continue
        report("measurement", asdict(Measurement(
            profile, backend, fmt, examples_per_step / step_s, step_s, peak, **sizes, **phases
        )))  # fmt: skip
    return result


def format_table(result: BenchResult) -> str:
    ratios = result.ratios()
    lines = [
        f"prefixshare bench: {result.heading()}{' reward model' if result.reward_model else ''}"
        f"{' + LoRA' if result.lora else ''}"
        f"{', gradient checkpointing' if result.gradient_checkpointing else ''}, {result.dtype}, "
        f"{result.examples_per_step} examples/step, {result.date}",
        "",
        "| profile | backend | ideal | " + " | ".join(f"{f} samples/s (x)" for f in FORMATS) + " | shared-packed / ideal |",
        "|---|---|---|" + "---|" * len(FORMATS) + "---|",
    ]
    by_key = {}
    for m in result.measurements:
        by_key.setdefault((m.profile, m.backend), {})[m.format] = m
    failed = {(f["profile"], f["backend"], f["format"]) for f in result.out_of_memory}
    for f in result.out_of_memory + result.skipped:
        by_key.setdefault((f["profile"], f["backend"]), {})
    skipped = {(f["profile"], f["backend"], f["format"]) for f in result.skipped}

    def cell(profile, backend, fmt, row, r):
        if (profile, backend, fmt) in failed:
            return "out of memory"
        if (profile, backend, fmt) in skipped:
            return "not run"
        if fmt not in row:
            return "-"
        ratio = f" ({r[fmt]:.2f}x)" if fmt in r else ""  # no ratio where every paired format ran out of memory
        return f"{row[fmt].samples_per_s:.2f}{ratio}"

    for (profile, backend), row in by_key.items():
        r = ratios.get((profile, backend), {})
        cells = [cell(profile, backend, f, row, r) for f in FORMATS]
        ideal = result.ideal[profile]
        of_ideal = f"{r['shared-packed'] / ideal:.0%}" if "shared-packed" in r else "-"
        lines.append(f"| {profile} | {backend} | {ideal:.2f}x | " + " | ".join(cells) + f" | {of_ideal} |")
    if any(m.peak_memory_mb for m in result.measurements):
        lines += ["", "| profile | backend | " + " | ".join(f"{f} peak MB" for f in FORMATS) + " |",
                  "|---|---|" + "---|" * len(FORMATS)]
        for (profile, backend), row in by_key.items():
            lines.append(f"| {profile} | {backend} | " + " | ".join(
                "out of memory" if (profile, backend, f) in failed
                else f"{row[f].peak_memory_mb:.0f}" if f in row and row[f].peak_memory_mb else "-"
                for f in FORMATS) + " |")
    lines += ["", "(x) = samples/s over the best paired format of the same profile and backend; ideal = paired "
              "real tokens / shared real tokens."]
    if result.skipped:
        lines += ["", "Not run:"] + [f"- {c['profile']} {c['backend']} {c['format']}: {c['reason']}" for c in result.skipped]
    return "\n".join(lines)


def save(result: BenchResult, json_path: str | None = None, png_path: str | None = None) -> None:
    if json_path:
        with open(json_path, "w") as f:
            json.dump(asdict(result) | {"ratios": {f"{p}/{b}": r for (p, b), r in result.ratios().items()}}, f, indent=2)
    if png_path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ratios = result.ratios()
        keys = list(ratios)
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(keys)), 4))
        width = 0.8 / (len(FORMATS) + 1)
        for i, fmt in enumerate(FORMATS):
            ax.bar([k + i * width for k in range(len(keys))], [ratios[key].get(fmt, 0) for key in keys], width, label=fmt)
        ax.bar([k + len(FORMATS) * width for k in range(len(keys))], [result.ideal[p] for p, _ in keys], width,
               label="ideal", color="lightgray", edgecolor="black")
        ax.set_xticks([k + 0.4 for k in range(len(keys))], [f"{p}\n{b}" for p, b in keys], fontsize=8)
        ax.set_ylabel("samples/s over best paired")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"prefixshare bench: {result.machine} ({result.model_shape}, {result.dtype})", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(png_path, dpi=120)
        plt.close(fig)
