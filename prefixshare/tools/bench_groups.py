"""``prefixshare bench --groups``: online RL (GRPO, RLOO) rows vs prefix-shared groups, side by side.

Every step holds a few prompts with G sampled completions each, as a GRPO/RLOO trainer's batch does. Formats,
each fed the same prompts and completions:

    rows            TRL's layout: one row per completion, the prompt left-padded to the batch's longest prompt and
                    the completion right-padded to the longest completion, the prompt in every row
    shared          prefix sharing: one unit ``[prompt | completion 1 | ... | completion G]`` per row
    shared-packed   the units packed first-fit-decreasing into rows of a token budget

All three run through the same patched model and backend, and the same call (:func:`prefixshare.completion_logps`,
the per-token log-probs in TRL's ``[rows, C]`` layout), so their ratios isolate the format. Two modes:
``train`` is the policy's forward+backward (of the sum of the log-probs), ``logprob`` the no-grad forward of
the old policy and the reference. The ideal speedup is the ratio of real (non-padding) tokens, rows over shared:
``G (p + c) / (p + G c)`` for one group.

Profiles (median prompt and completion tokens; lengths drawn log-normally around them, every completion of a
group with its own length): math reasoning (p 200, c 1000), long-context QA and agent turns (p 4000, c 300),
multi-turn chat (p 1000, c 200).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from ._timing import RunInfo, progress_bar, run_fields, step_sizes, time_steps, warm_up
from .bench import MODEL_SHAPES, build_model, lognormal_length, random_ids
from ..collators import PrefixShareBatch
from ..groups import CompletionGroups, completion_logps, group_completions
from ..layout import LAYOUT_KEY, Placement, PrefixShareLayout, UnitSpec

# name -> (median prompt tokens, median completion tokens)
GROUP_PROFILES = {
    "math-reasoning": (200, 1000),
    "long-context-qa": (4000, 300),
    "multi-turn-chat": (1000, 200),
}
PROMPT_HEAVY = ("long-context-qa", "multi-turn-chat")
GROUP_SIZES = (4, 8, 16)
GROUP_FORMATS = ("rows", "shared", "shared-packed")
MODES = ("train", "logprob")


def group_lengths(profile: str, prompts: int, G: int, *, seed: int = 0, scale: float = 1.0):
    """``prompts`` groups ``(prompt length, [G completion lengths])`` around the profile's medians (times ``scale``)."""
    p_med, c_med = (x * scale for x in GROUP_PROFILES[profile])
    g = torch.Generator().manual_seed(seed)
    return [(lognormal_length(p_med, g), [lognormal_length(c_med, g) for _ in range(G)]) for _ in range(prompts)]


def group_ids(lengths, vocab_size: int, seed: int = 0):
    """Random token ids for ``(prompt, [completions])`` lengths: ``(prompts [n], completions [n * G])`` lists."""
    g = torch.Generator().manual_seed(seed)
    prompts = [random_ids(p, vocab_size, g) for p, _ in lengths]
    completions = [random_ids(c, vocab_size, g) for _, cs in lengths for c in cs]
    return prompts, completions


def rows_groups(prompts, completions, G: int, pad_token_id: int = 0) -> CompletionGroups:
    """TRL's row layout as a :class:`CompletionGroups`: row r holds prompt ``r // G`` left-padded to the longest
    prompt, then completion r right-padded to the longest completion (what GRPO/RLOO trainers forward)."""
    N = len(completions)
    P = max(len(p) for p in prompts)
    C = max(len(c) for c in completions)
    placements, ids = [], torch.full((N, P + C), pad_token_id, dtype=torch.long)
    for r, completion in enumerate(completions):
        prompt = prompts[r // G]
        unit = UnitSpec(example=r, prompt_length=len(prompt), response_slots=(0,), response_lengths=(len(completion),))
        placements.append(Placement(r, P - len(prompt), unit))
        ids[r, P - len(prompt) : P + len(completion)] = torch.tensor(prompt + completion)
    layout = PrefixShareLayout.from_placements(
        placements, num_rows=N, row_length=P + C, num_examples=N, num_responses=1, max_token_id=int(ids.max())
    )
    batch = PrefixShareBatch(input_ids=ids, position_ids=layout.position_ids, use_cache=False, **{LAYOUT_KEY: layout})
    lengths = torch.tensor([len(c) for c in completions])
    return CompletionGroups((batch,), (torch.arange(N).unsqueeze(1),), N, C, lengths, len(prompts))


@dataclass
class GroupMeasurement:
    profile: str
    group_size: int
    backend: str
    mode: str
    format: str
    completions_per_s: float
    step_s: float
    peak_memory_mb: float | None
    tokens_real: int
    tokens_padded: int
    rows: int
    row_length: int


@dataclass
class GroupBenchResult(RunInfo):
    prompts_per_step: int
    steps: int
    rounds: int
    length_scale: float
    threads: int
    date: str
    measurements: list[GroupMeasurement] = field(default_factory=list)
    ideal: dict = field(default_factory=dict)  # "profile/G" -> rows real tokens / shared real tokens
    lengths: dict = field(default_factory=dict)  # "profile/G" -> (median prompt, median completion) used
    out_of_memory: list[dict] = field(default_factory=list)

    def ratios(self):
        """(profile, G, backend, mode) -> {format: completions/s over rows}."""
        table = {}
        for m in self.measurements:
            table.setdefault((m.profile, m.group_size, m.backend, m.mode), {})[m.format] = m.completions_per_s
        return {key: {f: v / row["rows"] for f, v in row.items()} if "rows" in row else {} for key, row in table.items()}


def time_formats(model, formats: dict[str, list[CompletionGroups]], device: str, mode: str, rounds: int = 3):
    """Per format: ``(seconds per step, peak MB or None, sizes)``, or the out-of-memory error's first line.

    A step is :func:`prefixshare.completion_logps` on one step's groups: ``train`` runs forward + backward of the
    sum of the log-probs, ``logprob`` the forward under ``torch.no_grad``. The first step of every format is a
    warm-up (on CUDA every step runs once first: kernels compile per shape). The formats are then timed in
    turn, ``rounds`` times, and each keeps its fastest round: on a shared machine another process slows some
    rounds down, never speeds one up. Peak memory (CUDA) is that of the first round.
    """
    prepared = {fmt: [g.to(device) for g in groups] for fmt, groups in formats.items()}
    timed = {fmt: gs[1:] or gs for fmt, gs in prepared.items()}

    def step(groups):
        if mode == "train":
            completion_logps(model, groups).logps.sum().backward()
        else:
            with torch.no_grad():
                completion_logps(model, groups)

    times: dict[str, list[float]] = {fmt: [] for fmt in formats}
    peaks: dict[str, float | None] = {}
    failed: dict[str, str] = {}
    for round_number in range(rounds + 1):  # round 0: the warm-up
        for fmt in formats:
            if fmt in failed:
                continue
            try:
                if round_number == 0:
                    warm_up(model, step, prepared[fmt], device)
                    continue
                seconds, peak = time_steps(model, step, timed[fmt], device, measure_peak=round_number == 1)
                times[fmt].append(seconds)
                if round_number == 1:
                    peaks[fmt] = peak
            except torch.cuda.OutOfMemoryError as error:  # one format too large for the device: report it, go on
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                failed[fmt] = str(error).split("\n")[0]
    out = {}
    for fmt, groups in timed.items():
        if fmt in failed:
            out[fmt] = failed[fmt]
            continue
        out[fmt] = (min(times[fmt]), peaks[fmt], step_sizes([g.batches for g in groups]))  # a step: one CompletionGroups
    return out


def run_group_bench(
    profiles=tuple(GROUP_PROFILES),
    group_sizes=GROUP_SIZES,
    *,
    backends=("sdpa",),
    modes=MODES,
    shape: str = "tiny",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    lora: bool = False,
    prompts_per_step: int = 2,
    steps: int = 2,
    rounds: int = 3,
    length_scale: float = 1.0,
    budget: int | None = None,
    progress: bool = True,
) -> GroupBenchResult:
    """Measure every (profile, G, backend, mode, format): ``steps`` timed steps (after a warm-up step) of
    ``prompts_per_step`` groups, the fastest of ``rounds`` (see :func:`time_formats`)."""
    import statistics

    result = GroupBenchResult(
        **run_fields(device, shape, dtype, lora), prompts_per_step=prompts_per_step, steps=steps, rounds=rounds,
        length_scale=length_scale, threads=torch.get_num_threads(),
    )  # fmt: skip
    vocab = MODEL_SHAPES[shape]["vocab_size"]
    plans = {}
    for i, profile in enumerate(profiles):
        for G in group_sizes:
            seed = 1000 * i + G
            steps_data, step_lengths = [], []
            for s in range(steps + 1):
                lengths = group_lengths(profile, prompts_per_step, G, seed=seed + 100 * s, scale=length_scale)
                step_lengths.append(lengths)
                prompts, completions = group_ids(lengths, vocab, seed=seed + 100 * s)
                steps_data.append((prompts, completions))
            all_lengths = [group for lengths in step_lengths for group in lengths]
            timed_lengths = [group for lengths in (step_lengths[1:] or step_lengths) for group in lengths]
            longest = max(p + sum(cs) for p, cs in all_lengths)
            row_budget = budget or 2 * longest  # the packed format: about two groups per row
            formats = {
                "rows": [rows_groups(p, c, G) for p, c in steps_data],
                "shared": [group_completions(p, c, num_generations=G) for p, c in steps_data],
                "shared-packed": [group_completions(p, c, num_generations=G, max_tokens_per_row=row_budget)
                                  for p, c in steps_data],
            }  # fmt: skip
            plans[(profile, G)] = formats
            key = f"{profile}/G{G}"
            # of the timed steps: exactly the tokens the measurements hold
            result.ideal[key] = (
                sum(G * p + sum(cs) for p, cs in timed_lengths) / sum(p + sum(cs) for p, cs in timed_lengths)
            )
            result.lengths[key] = (
                statistics.median(p for p, _ in timed_lengths),
                statistics.median(c for _, cs in timed_lengths for c in cs),
            )

    cells = [(b, m, p, G) for b in backends for (p, G) in plans for m in modes]
    models = {}
    bar = progress_bar(cells, "bench --groups", progress)
    for backend, mode, profile, G in bar:
        bar.set_postfix_str(f"{profile} G={G} {backend} {mode}")
        if backend not in models:
            models.clear()  # one model in memory at a time
            models[backend] = build_model(shape, backend, dtype, device, lora)
        timings = time_formats(models[backend], plans[(profile, G)], device, mode, rounds)
        for fmt in GROUP_FORMATS:
            if isinstance(timings[fmt], str):
                result.out_of_memory.append(
                    dict(profile=profile, group_size=G, backend=backend, mode=mode, format=fmt, error=timings[fmt])
                )
                continue
            step_s, peak, sizes = timings[fmt]
            result.measurements.append(
                GroupMeasurement(profile, G, backend, mode, fmt, prompts_per_step * G / step_s, step_s, peak, **sizes)
            )
    return result


def format_group_table(result: GroupBenchResult) -> str:
    ratios = result.ratios()
    lines = [
        f"prefixshare bench --groups: {result.heading()}{' + LoRA' if result.lora else ''}, {result.dtype}, "
        f"{result.prompts_per_step} prompts/step, lengths x{result.length_scale:g}, {result.threads} thread(s), "
        f"fastest of {result.rounds} rounds, {result.date}",
        "",
        "| profile | median p / c | G | backend | mode | ideal | "
        + " | ".join(f"{f} completions/s (x)" for f in GROUP_FORMATS)
        + " | best shared / ideal |",
        "|---|---|---|---|---|---|" + "---|" * len(GROUP_FORMATS) + "---|",
    ]
    by_key = {}
    for m in result.measurements:
        by_key.setdefault((m.profile, m.group_size, m.backend, m.mode), {})[m.format] = m
    failed = {(f["profile"], f["group_size"], f["backend"], f["mode"], f["format"]) for f in result.out_of_memory}
    for f in result.out_of_memory:
        by_key.setdefault((f["profile"], f["group_size"], f["backend"], f["mode"]), {})
    for key, row in by_key.items():
        profile, G, backend, mode = key
        r = ratios.get(key, {})
        ideal = result.ideal[f"{profile}/G{G}"]
        p, c = result.lengths[f"{profile}/G{G}"]

        def cell(fmt):
            if key + (fmt,) in failed:
                return "out of memory"
            if fmt not in row:
                return "-"
            return f"{row[fmt].completions_per_s:.2f}" + (f" ({r[fmt]:.2f}x)" if fmt in r else "")

        shared = [r[f] for f in ("shared", "shared-packed") if f in r]
        of_ideal = f"{max(shared) / ideal:.0%}" if shared else "-"
        lines.append(
            f"| {profile} | {p:g} / {c:g} | {G} | {backend} | {mode} | {ideal:.2f}x | "
            + " | ".join(cell(f) for f in GROUP_FORMATS) + f" | {of_ideal} |"
        )
    if any(m.peak_memory_mb for m in result.measurements):
        lines += ["", "| profile | G | backend | mode | " + " | ".join(f"{f} peak MB" for f in GROUP_FORMATS) + " |",
                  "|---|---|---|---|" + "---|" * len(GROUP_FORMATS)]  # fmt: skip
        for key, row in by_key.items():
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(
                "out of memory" if key + (f,) in failed
                else f"{row[f].peak_memory_mb:.0f}" if f in row and row[f].peak_memory_mb else "-"
                for f in GROUP_FORMATS) + " |")  # fmt: skip
    lines += ["", "(x) = completions/s over the rows format of the same profile, G, backend and mode; ideal = rows real "
              "tokens / shared real tokens, G(p + c) / (p + Gc) for one group; train = forward + backward of the policy, "
              "logprob = the no-grad forward (old policy, reference)."]  # fmt: skip
    return "\n".join(lines)


def save_group(result: GroupBenchResult, json_path: str) -> None:
    ratios = {f"{p}/G{G}/{b}/{m}": r for (p, G, b, m), r in result.ratios().items()}
    with open(json_path, "w") as f:
        json.dump(asdict(result) | {"ratios": ratios}, f, indent=2)
