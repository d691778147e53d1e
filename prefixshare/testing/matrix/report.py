"""compat/MATRIX.md: the deep matrix's tables and the breadth matrix's, and the JSON record of a run."""

from __future__ import annotations

import platform
from dataclasses import asdict
from datetime import datetime, timezone

import torch
import transformers

import prefixshare

from .breadth import EXACT, LEAK_VISIBLE, NOT_BUILT, REFUSED, ArchitectureResult
from .deep import ADAPTERS, ARCHITECTURES, BACKENDS, DTYPES, PACKINGS, BF16_RATIONALE, LORA_TARGETS, TOLERANCE
from .deep import ERROR, FAIL, NOT_RUN, NOT_SUPPORTED, PASS, PASS_LOGPS_ONLY, PASS_REFERENCE_KERNEL
from .deep import REASON_BF16, REASON_FLEX_CPU, REASON_GEMMA2_SDPA, REASON_VARLEN_REFERENCE, Cell, describe_packings


def versions() -> dict[str, str]:
    """The versions a report names: python, torch, transformers, peft, bitsandbytes, prefixshare."""
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            found[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            found[name] = "not installed"
    found["prefixshare"] = prefixshare.__version__
    return found


def _fmt(x: float | None) -> str:
    return "–" if x is None else ("0" if x == 0 else f"{x:.0e}")


NOTE_MARKS = {REASON_FLEX_CPU: "[a]", REASON_BF16: "[b]", REASON_GEMMA2_SDPA: "[c]", REASON_VARLEN_REFERENCE: "[d]"}


def cell_text(cell: Cell) -> str:
    mark = NOTE_MARKS.get(cell.reason, "")
    if cell.state == PASS:
        return f"pass {_fmt(cell.logps_error)} / {_fmt(cell.grad_error)}"
    if cell.state == PASS_LOGPS_ONLY:
        return f"pass, log-probs only {mark} {_fmt(cell.logps_error)} / –"
    if cell.state == PASS_REFERENCE_KERNEL:
        return f"pass, reference kernel {mark} {_fmt(cell.logps_error)} / {_fmt(cell.grad_error)}"
    if cell.state == FAIL and cell.logps_error is not None:
        return f"**FAIL** {_fmt(cell.logps_error)} / {_fmt(cell.grad_error)}"
    if cell.state in (FAIL, ERROR):
        return f"**{cell.state.upper()}**: {cell.reason}".replace("|", "\\|")
    return f"{cell.state} {mark}".strip()


def summary_text(cells: list[Cell]) -> str:
    states = {c.state for c in cells}
    bad = [c for c in cells if c.state in (FAIL, ERROR)]
    if bad:
        return f"**FAIL** ({len(bad)} of {len(cells)})"
    if states == {PASS}:
        return "pass"
    if states == {PASS_LOGPS_ONLY}:
        return "pass, log-probs only [a]"
    if states == {PASS_REFERENCE_KERNEL}:
        return "pass, reference kernel [d]"
    if len({(c.state, c.reason) for c in cells}) == 1:
        return cell_text(cells[0])
    return ", ".join(sorted(states))


def _tol(x: float) -> str:
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _rows_in_order(cells: list[Cell]) -> list[tuple[str, str, str]]:
    rows = {(c.architecture, c.adapter, c.packing) for c in cells}
    return sorted(rows, key=lambda k: (ARCHITECTURES.index(k[0]), ADAPTERS.index(k[1]), PACKINGS.index(k[2])))


def render_markdown(cells: list[Cell], command: str, device: str, seconds: float, examples, packings, *,
                    machine: str) -> str:
    """The deep matrix's part of MATRIX.md: header, legend, summary, per-architecture tables, method, every cell.
    ``machine``: the machine in words (``prefixshare.tools.machine.describe_machine``)."""
    backends = [b for b in BACKENDS if any(c.backend == b for c in cells)]
    dtypes = [d for d in DTYPES if any(c.dtype == d for c in cells)]
    counts: dict[str, int] = {}
    for c in cells:
        counts[c.state] = counts.get(c.state, 0) + 1
    f32, bf16 = TOLERANCE["float32"], TOLERANCE["bfloat16"]
    on_cuda = device.startswith("cuda")

    lines = [
        "# Compatibility matrix",
        "",
        f"Produced by `{command}` on {machine}; "
        + ", ".join(f"{k} {val}" for k, val in versions().items())
        + f"; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {seconds:.0f} s.",
        "",
        "Does prefix sharing give the numbers of the plain model? Each cell patches a model with "
        "`prefixshare.patch(model, backend=...)` and compares the log-probs of every response, and the "
        "gradients of every trainable parameter, with each prompt+response run **alone** through the "
        f"unpatched model. Tolerance: relative `{_tol(f32[0])}` in float32 (log-probs and gradients); in "
        f"bfloat16 `{_tol(bf16[0])}` on log-probs and `{_tol(bf16[1])}` on gradients (why: see Method).",
        "",
        "- **pass**: log-probs and gradients within tolerance.",
        f"- **pass, log-probs only [a]**: {REASON_FLEX_CPU}; the forward pass was compared.",
        f"- **not supported [c]**: {REASON_GEMMA2_SDPA.split(': ', 1)[1]}; `prefixshare.patch` refuses it "
        "with a ValueError that says so (checked in every such cell).",
        f"- **not run [b]**: {REASON_BF16}.",
        f"- **pass, reference kernel [d]**: {REASON_VARLEN_REFERENCE}.",
        "- **FAIL** / **ERROR**: outside tolerance / an exception; the reason is listed under Summary.",
        "",
        "## Summary",
        "",
        f"{len(cells)} cells: " + ", ".join(f"{n} {state}" for state, n in counts.items()) + ".",
    ]
    if not on_cuda:
        lines += [
            "",
            "This run had no GPU: the bfloat16 cells, FlexAttention's gradients and the CUDA varlen kernels were not checked. Run "
            "`python compat/run_matrix.py` on a CUDA machine for them.",
        ]
    failures = [c for c in cells if c.state in (FAIL, ERROR)]
    if failures:
        lines += ["", "**Failures:**", ""]
        lines += [f"- `{' x '.join(c.key)}`: {c.reason}" for c in failures]
    for dtype_name in dtypes:
        of_dtype = [c for c in cells if c.dtype == dtype_name]
        lines += ["", f"{dtype_name}, by architecture (all adapters and packings):", ""]
        lines += ["| architecture | " + " | ".join(backends) + " |", "|---|" + "---|" * len(backends)]
        for architecture in ARCHITECTURES:
            row = [c for c in of_dtype if c.architecture == architecture]
            if row:
                texts = [summary_text([c for c in row if c.backend == b]) for b in backends]
                lines.append(f"| {architecture} | " + " | ".join(texts) + " |")

    lines += [
        "",
        "## Method",
        "",
        "**Comparison**: `prefixshare.testing.compare_with_alone(reference, patched, examples, collator)`: the "
        "per-response log-probs of one prefix-shared forward of the patched model, and the gradient of "
        "`sum(w * logps)` (fixed random `w`) on every trainable parameter, against the same quantities with "
        "every prompt+response run alone (batch of one, no padding) through the unpatched reference. Errors "
        "are normwise relative, `max|x - ref| / max|ref|`, the worst parameter for gradients.",
        "",
        f"**Tolerance**: float32 `{_tol(f32[0])}` on both. bfloat16 `{_tol(bf16[0])}` on log-probs and "
        f"`{_tol(bf16[1])}` on gradients. " + BF16_RATIONALE,
        "",
        "**Models**: tiny random models built from configs (`prefixshare.testing`: 2 layers, Gemma3 6; sliding "
        "windows of 8 tokens, Gemma2's softcaps, grouped-query attention). The reference of a cell is its "
        "model before patching; the patched model is a deep copy of it, patched. The reference runs with "
        "the backend's own kernel (eager, sdpa); for `flex_attention` it runs eager (transformers' own "
        "FlexAttention compiles a kernel per sequence length), and for `varlen` eager too.",
        "",
        f"**Data**: {len(examples)} random examples (`prefixshare.testing.random_examples`), prompts of 1-24 "
        "tokens, chosen and rejected of 1-16 tokens, so the 8-token windows matter.",
        "",
        "**Adapters**: `full` = every parameter trainable; `lora` = peft LoRA r=4 on "
        f"{', '.join(LORA_TARGETS)} with non-zero B (`init_lora_weights=False`), gradients on the LoRA "
        "matrices; `qlora` = the tiny checkpoint saved with `save_pretrained` and loaded back with "
        "`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, "
        "bnb_4bit_quant_type='nf4', bnb_4bit_compute_dtype=<dtype>))`, then the same LoRA (both models hold "
        "the same 4-bit weights, so float32 compute is held to the same 1e-5; bitsandbytes' bfloat16 CPU "
        "inference kernel, which ignores the compute dtype and has no backward, is switched off).",
        "",
        "**Packings**:",
        "",
    ]
    for packing, description in describe_packings(examples, packings).items():
        lines.append(f"- `{packing}`: {description}")

    for dtype_name in dtypes:
        of_dtype = [c for c in cells if c.dtype == dtype_name]
        lines += ["", f"## {dtype_name}: every cell", ""]
        if all(c.state in (NOT_RUN, NOT_SUPPORTED) for c in of_dtype):
            kinds: dict[str, int] = {}
            for c in of_dtype:
                text = f"{c.state}: {c.reason.split(': ', 1)[-1]}"
                kinds[text] = kinds.get(text, 0) + 1
            lines.append(f"No {dtype_name} cell ran: " + "; ".join(f"{n} {k}" for k, n in kinds.items()) + ".")
            continue
        lines += [
            "`log-prob error / gradient error`",
            "",
            "| architecture | adapter | packing | " + " | ".join(backends) + " |",
            "|---|---|---|" + "---|" * len(backends),
        ]
        index = {c.key: c for c in of_dtype}
        for architecture, adapter, packing in _rows_in_order(of_dtype):
            texts = []
            for backend in backends:
                cell = index.get((architecture, backend, adapter, packing, dtype_name))
                texts.append("" if cell is None else cell_text(cell))
            lines.append(f"| {architecture} | {adapter} | {packing} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- breadth report
BREADTH_STATES = (EXACT, REFUSED, NOT_BUILT, FAIL, ERROR)

# where the class's default config is not what its checkpoints are
BREADTH_NOTES = {
    "lfm2": "the default config has attention layers only; LFM2 checkpoints with convolution layers are refused "
    "(tests/test_trust.py)",
}


def _short_reason(result: ArchitectureResult) -> str:
    """The refusal or failure, without patch's boilerplate, for one table cell."""
    reason = result.reason
    for prefix in ("prefixshare cannot make this model exact: ", "prefixshare self-check failed on "):
        reason = reason.replace(prefix, "")
    reason = reason.replace(f"prefixshare cannot make {result.model_class} exact: ", "")
    for cut in (" Such a mixer reads", " The batch's responses would", " The model is left unpatched", " The layout travels"):
        reason = reason.split(cut)[0]
    return reason.replace("|", "\\|").replace("\n", " ")


def breadth_summary(results: list[ArchitectureResult]) -> dict[str, list[str]]:
    """``{state: [model types]}`` in :data:`BREADTH_STATES` order."""
    return {state: [r.model_type for r in results if r.status == state] for state in BREADTH_STATES}


def render_breadth_markdown(results: list[ArchitectureResult], seconds: float) -> str:
    """The breadth section of MATRIX.md: one row per model type of the installed transformers."""
    summary = breadth_summary(results)
    exact = [r for r in results if r.status == EXACT]
    worst_logps = max((r.worst[0] or 0.0 for r in exact), default=0.0)
    worst_grads = max((r.worst[1] or 0.0 for r in exact), default=0.0)
    weakest_leak = min((max(r.leak_error, r.leak_grad_error) for r in exact), default=float("nan"))
    lines = [
        f"## Every causal LM of transformers {transformers.__version__}",
        "",
        f"Every model type in `AutoModelForCausalLM`'s mapping ({len(results)}), built tiny from its config class "
        "alone (`prefixshare.testing.tiny_model_of`: the class's defaults with every size field shrunk to 2 layers "
        "or as many as it takes to hold each kind of layer of the default pattern, hidden 64, vocabulary 96, "
        "weights of std 0.1; sliding windows of 8 tokens where the class has them), then "
        "`prefixshare.patch(model, backend=...)` with no opt-in. An architecture is **exact** when every cell "
        "passes: eager and sdpa (each where patch accepts it), K=2 and K=4 responses, unpacked and packed, full "
        "fine-tuning and (dense models) LoRA on every linear layer, log-probs and gradients within "
        f"`{_tol(TOLERANCE['float32'][0])}` of every prompt+response run alone through the unpatched model "
        "(eager), and when a deliberately leaky rule (a response seeing the one before it) moves its log-probs "
        f"or gradients by at least `{LEAK_VISIBLE:g}`. **refused**: patch raised, and its reason is shown. "
        "**not built**: the config class cannot make a tiny model from its defaults (or the tiny model's own "
        f"forward fails). {seconds:.0f} s.",
        "",
        "Gradient error: the whole gradient (every trainable parameter) as one vector, `max|g - w| / max|w|`; "
        "a parameter missing a gradient or with an extra one fails on its own. (A per-parameter measure divides "
        "float32 rounding by nothing on some of these models: a key projection's bias has a true gradient of "
        "zero.)",
        "",
        "**" + ", ".join(f"{len(v)} {k}" for k, v in summary.items() if v) + f"** of {len(results)} model types. "
        f"Exact ones: worst log-prob error {_fmt(worst_logps)}, worst gradient error {_fmt(worst_grads)}; the "
        f"leaky rule moves every one of them by at least {weakest_leak:.0e}.",
    ]
    if summary[FAIL] or summary[ERROR]:
        lines += ["", "**Failures:** " + ", ".join(summary[FAIL] + summary[ERROR])]
    lines += [
        "",
        "| model type | class | result | MoE | attention features | worst log-prob / gradient error | leak | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (BREADTH_STATES.index(r.status) if r.status in BREADTH_STATES else 9, r.model_type)):
        errors = f"{_fmt(r.worst[0])} / {_fmt(r.worst[1])}" if r.cells else ""
        leak = f"{max(r.leak_error, r.leak_grad_error):.0e}" if r.leak_error is not None else ""
        features = ", ".join(r.features)
        refusals = "; ".join(f"{b}: refused ({m.split(', which')[0].split(' uses ')[-1]})" for b, m in r.refusals.items())
        reason = "; ".join(filter(None, [_short_reason(r) if r.status != EXACT else "", refusals,
                                         BREADTH_NOTES.get(r.model_type, "")]))  # fmt: skip
        status = r.status if r.status not in (FAIL, ERROR) else f"**{r.status.upper()}**"
        lines.append(
            f"| {r.model_type} | {r.model_class} | {status} | {'yes' if r.moe else ''} | {features} | {errors} | "
            f"{leak} | {reason} |"
        )
    return "\n".join(lines)


def render_report(cells: list[Cell], breadth: list[ArchitectureResult], *, command: str, device: str, machine: str,
                  seconds: float, breadth_seconds: float, examples, packings) -> str:
    """The whole of MATRIX.md: the deep matrix (or only its header line when no cell ran), then the breadth
    section when model types were checked."""
    if cells:
        parts = [render_markdown(cells, command, device, seconds, examples, packings, machine=machine)]
    else:
        parts = [f"# Compatibility matrix\n\nProduced by `{command}` on {machine}; "
                 + ", ".join(f"{k} {val}" for k, val in versions().items()) + "."]
    if breadth:
        parts.append(render_breadth_markdown(breadth, breadth_seconds))
    return "\n\n".join(parts)


def json_report(cells: list[Cell], breadth: list[ArchitectureResult], *, command: str, machine: str,
                seconds: float) -> dict:
    """What ``--json`` writes: the command, machine, versions, tolerances and every cell and model type."""
    return dict(
        command=command,
        machine=machine,
        versions=versions(),
        tolerance=TOLERANCE,
        seconds=seconds,
        cells=[asdict(c) for c in cells],
        breadth=[asdict(r) for r in breadth],
    )


def readme_support_summary(results: list[ArchitectureResult]) -> str:
    """The README's support paragraph: the count and the list of exact model types, and the refused kinds."""
    summary = breadth_summary(results)
    return (
        f"{len(summary[EXACT])} of the {len(results)} causal-LM model types of transformers {transformers.__version__} "
        f"are exact: {', '.join(summary[EXACT])}."
    )

