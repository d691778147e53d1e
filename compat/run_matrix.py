#!/usr/bin/env python
"""The compatibility matrix: does prefix sharing give the same numbers as the plain model?

Every cell is one (architecture, backend, adapter, packing, dtype). For each cell a tiny random model of
the architecture is built from its config (prefixshare.testing), wrapped in the adapter, deep-copied, and the
COPY is patched with ``prefixshare.patch(copy, backend=...)``. Then
:func:`prefixshare.testing.compare_with_alone` compares

* the per-response log-probs of one prefix-shared forward of the patched copy, and
* the gradients of every trainable parameter of ``sum(w * logps)`` (fixed random ``w``)

with the same quantities when every prompt+response is run ALONE (batch of one, no padding) through the
unpatched reference. The error is normwise relative, ``max |x - ref| / max |ref|``, worst parameter for
gradients.

Axes:
    architecture  llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3 (prefixshare.testing)
    backend       eager, sdpa, flex_attention, varlen
    adapter       full (every parameter trainable), lora (peft LoRA, r=4, non-zero B), qlora (the tiny
                  checkpoint saved and loaded back in 4-bit NF4 with bitsandbytes, then LoRA)
    packing       unpacked (PrefixShareCollator, one example per row), packed (PrefixShareCollator with a
                  max_tokens_per_row that puts several examples in one row), paired-packed (PairedCollator,
                  the classic one-sequence-per-response format, packed)
    dtype         float32, bfloat16 (bfloat16 on CUDA only)

Usage::

    python compat/run_matrix.py --out compat/MATRIX.md            # every cell this machine can run
    python compat/run_matrix.py --quick                            # a representative subset, table to stdout
    python compat/run_matrix.py --arch gemma2 --backend eager,flex_attention --json cells.json

The exit status is 1 when a cell that ran failed, so CI can call the script directly.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

try:
    import prefixshare
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import prefixshare

from prefixshare.tools.machine import describe_machine
from prefixshare.collators import PairedCollator, PrefixShareCollator
from prefixshare.testing import compare_with_alone, random_examples
from prefixshare.testing import ARCHITECTURE_NAMES, tiny_config, tiny_model

# ---------------------------------------------------------------------------------------------- the axes
ARCHITECTURES = ARCHITECTURE_NAMES
BACKENDS = ("eager", "sdpa", "flex_attention", "varlen")
ADAPTERS = ("full", "lora", "qlora")
PACKINGS = ("unpacked", "packed", "paired-packed")
DTYPES = ("float32", "bfloat16")

# --quick: full attention (llama), softcap + alternating windows (gemma2), 5:1 windows + q/k norm (gemma3)
QUICK = dict(architectures=("llama", "gemma2", "gemma3"), packings=("unpacked", "packed"))

# relative tolerances (log-probs, gradients); why bfloat16's are what they are: see BF16_RATIONALE
TOLERANCE = {"float32": (1e-5, 1e-5), "bfloat16": (1e-2, 1e-1)}

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# states
PASS = "pass"
PASS_LOGPS_ONLY = "pass (log-probs only; gradients need a GPU)"
PASS_REFERENCE_KERNEL = "pass (varlen reference kernel; the CUDA kernels need a GPU)"
FAIL = "fail"
ERROR = "error"
NOT_RUN = "not run"
NOT_SUPPORTED = "not supported"
RAN_OK = (PASS, PASS_LOGPS_ONLY, PASS_REFERENCE_KERNEL)

# reasons
REASON_FLEX_CPU = "needs a GPU (FlexAttention has no backward on CPU)"
REASON_BF16 = "needs a GPU (bfloat16 cells run on CUDA only)"
REASON_VARLEN_REFERENCE = (
    "the varlen sequences and K/V gather ran with the reference kernel (one SDPA call per sequence); "
    "flash-attn's and torch's varlen kernels run on CUDA in half precision only"
)
REASON_GEMMA2_SDPA = "not supported: sdpa cannot apply Gemma2's attention softcap (use eager or flex)"

# the unpatched reference runs every example alone with this kernel. FlexAttention's reference is eager:
# transformers' own (unpatched) flex_attention compiles one kernel per sequence length, ~45 s each on CPU.
REFERENCE_KERNEL = {"eager": "eager", "sdpa": "sdpa", "flex_attention": "eager", "varlen": "eager"}

BF16_RATIONALE = (
    "Why: bfloat16 keeps 8 significant bits (a rounding step of 2^-8 = 4e-3). The prefix-shared forward is "
    "the same mathematics as the runs alone computed in differently shaped tensors (one packed row instead "
    "of separate sequences, another mask, other kernel tilings and reduction orders), so every layer rounds "
    "differently; the differences add up over the layers and the backward pass, and a parameter's gradient "
    "sums many such terms and is stored in bfloat16. Measured on these tiny models (bfloat16 forced on "
    "CPU, eager and sdpa, full and LoRA): prefix-shared vs alone, both bfloat16, differ by up to 4e-4 on "
    "log-probs and 4e-2 on gradients, and the runs alone in bfloat16 differ from the same runs in float32 "
    "by up to 1.4e-3 and 6.7e-2: that much is bfloat16 itself. Deliberately broken attention rules (the "
    "rejected response seeing the chosen one, a sliding window dropped or one token too wide) give at "
    "least 2.8e-2 on log-probs and 0.75 on gradients, so the bfloat16 tolerances sit between the two. "
    "The bfloat16 cells check dtype handling (mask fill values, softmax precision, casts); the exactness "
    "of the attention rule is what the float32 cells check, at 1e-5."
)

DTYPE_OF = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Cell:
    architecture: str
    backend: str
    adapter: str
    packing: str
    dtype: str
    state: str = NOT_RUN
    reason: str = ""
    logps_error: float | None = None
    grad_error: float | None = None
    worst_parameter: str | None = None
    num_parameters: int = 0
    logps_tolerance: float | None = None
    grad_tolerance: float | None = None
    batch_shape: tuple[int, int] | None = None
    seconds: float = 0.0

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.architecture, self.backend, self.adapter, self.packing, self.dtype)


@dataclass
class Settings:
    device: str
    num_examples: int = 3
    seed: int = 0
    lora_rank: int = 4
    # tiny models gain nothing from intra-op threads, and on a busy machine they lose a lot (100x on 2 cores)
    threads: int | None = 1
    workdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="prefixshare_matrix_"))


# ---------------------------------------------------------------------------------------------- data
def make_examples(settings: Settings) -> list[dict]:
    vocab_size = tiny_config("llama").vocab_size  # every tiny config has the same vocabulary
    return random_examples(settings.num_examples, vocab_size, seed=settings.seed)


def packing_budget(lengths: list[int]) -> int:
    """A ``max_tokens_per_row`` that fits the longest unit, makes the two shortest share a row and halves the rows."""
    ordered = sorted(lengths)
    return max(ordered[-1], ordered[0] + ordered[1], -(-sum(ordered) // 2))


def make_collator(packing: str, examples: list[dict]):
    if packing == "unpacked":
        return PrefixShareCollator(pad_token_id=0)
    collator_class = PairedCollator if packing == "paired-packed" else PrefixShareCollator
    budget = packing_budget(collator_class(pad_token_id=0).unit_lengths(examples))
    return collator_class(pad_token_id=0, max_tokens_per_row=budget)


def describe_packings(examples: list[dict], packings) -> dict[str, str]:
    """One line per packing for the header: how many units in how many rows."""
    lines = {}
    for packing in packings:
        collator = make_collator(packing, examples)
        batch = collator(examples)
        units = len(collator.unit_lengths(examples))
        rows, length = batch["input_ids"].shape
        what = "sequences" if packing == "paired-packed" else "examples"
        budget = f", max_tokens_per_row={collator.max_tokens_per_row}" if collator.max_tokens_per_row else ""
        lines[packing] = f"{type(collator).__name__}: {units} {what} in {rows} rows of {length} tokens{budget}"
    return lines


# ---------------------------------------------------------------------------------------------- models
def lora_config(settings: Settings):
    from peft import LoraConfig

    # init_lora_weights=False: B is random, not zero, so the adapter changes the output and A gets gradients
    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=2 * settings.lora_rank,
        target_modules=LORA_TARGETS,
        lora_dropout=0.0,
        init_lora_weights=False,
    )


def add_lora(model, settings: Settings):
    from peft import get_peft_model

    torch.manual_seed(settings.seed + 1)  # the same adapter weights every time
    return get_peft_model(model, lora_config(settings))


def tiny_checkpoint(architecture: str, settings: Settings) -> str:
    """The tiny float32 model of ``architecture`` saved with save_pretrained (once per run)."""
    path = os.path.join(settings.workdir, architecture)
    if not os.path.exists(os.path.join(path, "config.json")):
        tiny_model(architecture, seed=settings.seed).save_pretrained(path)
    return path


# bitsandbytes (read in 0.50.2) has a second CPU path for 4-bit layers, on CPUs with AVX512-BF16: the first
# forward of a Linear4bit in eval mode whose input does not require grad repacks its weight for good
# (quant_state.packing_format_for_cpu) and every later forward, with or without grad, runs a fused kernel
# that rounds the input, the block scales and the output to bfloat16, whatever bnb_4bit_compute_dtype says,
# and that has no backward (the input's gradient is silently None). Measured on the tiny gemma2 (AMD EPYC,
# torch 2.13 CPU): one such layer is 3.6e-3 off the float32 matmul of its dequantized weight, against
# 4e-7 for bitsandbytes' default path. Which path a layer takes depended on the cell: the FlexAttention
# cells run forward-only (no_grad) on CPU, so every layer of both models went bfloat16, and the float32
# rounding differences between one packed row and the runs alone (~1e-7) crossed bfloat16 rounding steps
# in the next layer: 1.4e-5 on log-probs in gemma2 x flex_attention x qlora x float32, the same in every
# packing (no leak: 2.5e-8 with the path off); the eager cells only had layer 0's q/k/v repacked (grad
# enabled, the embedding output needs none). The matrix checks the float32 numbers of the path QLoRA trains
# through, so that path is switched off on every 4-bit layer it loads, and a cell fails if a layer was
# repacked anyway (a bitsandbytes that changes how the path is chosen).
BNB_CPU_BF16_SWITCH = "support_avx512bf16_for_cpu"


def keep_bnb_default_path(model):
    """Keep every bitsandbytes 4-bit layer of ``model`` off the bfloat16 CPU inference path (see above)."""
    for module in model.modules():
        if hasattr(module, BNB_CPU_BF16_SWITCH):
            setattr(module, BNB_CPU_BF16_SWITCH, False)
    return model


def repacked_4bit_layers(model) -> list[str]:
    """Names of the 4-bit layers whose weight bitsandbytes repacked for its bfloat16 CPU kernel."""
    return [
        name
        for name, module in model.named_modules()
        if getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
    ]


def load_4bit(architecture: str, kernel: str, dtype: torch.dtype, settings: Settings):
    """The user's QLoRA path: from_pretrained(checkpoint, quantization_config=4-bit NF4), bitsandbytes' default
    kernels (:func:`keep_bnb_default_path`)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint(architecture, settings),
        quantization_config=quantization,
        attn_implementation=kernel,
        device_map={"": settings.device},
        dtype=dtype,
    )
    return keep_bnb_default_path(model).eval()


def build_reference(architecture: str, backend: str, adapter: str, dtype: torch.dtype, settings: Settings):
    """The unpatched model of one cell (adapter applied, on the device, eval mode)."""
    kernel = REFERENCE_KERNEL[backend]
    if adapter == "qlora":
        model = add_lora(load_4bit(architecture, kernel, dtype, settings), settings)
    else:
        model = tiny_model(architecture, attn_implementation=kernel, dtype=dtype, seed=settings.seed)
        model = model.to(settings.device)
        if adapter == "lora":
            model = add_lora(model, settings)
    model.to(settings.device)
    return model.eval()


def clone(reference, rebuild):
    """A deep copy of ``reference``; if one cannot be made (a quantized model), rebuild it and copy the adapter."""
    try:
        return copy.deepcopy(reference)
    except Exception:  # noqa: BLE001 - any failure of deepcopy: fall back to loading the checkpoint again
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        twin = rebuild()
        set_peft_model_state_dict(twin, get_peft_model_state_dict(reference))
        return twin


# ---------------------------------------------------------------------------------------------- cells
def _softcap_refused(architecture: str, dtype: torch.dtype, settings: Settings) -> tuple[bool, str]:
    """patch(model, backend='sdpa') on a softcapped model must raise a ValueError that says so.

    (transformers itself refuses to load Gemma2 with attn_implementation='sdpa', so the model is loaded eager.)
    """
    model = tiny_model(architecture, attn_implementation="eager", dtype=dtype, seed=settings.seed)
    try:
        prefixshare.patch(model, backend="sdpa")
    except ValueError as error:
        message = str(error)
        if "softcap" in message and "eager" in message:
            return True, message
        return False, f"patch raised a ValueError that does not explain the softcap: {message}"
    return False, "patch(model, backend='sdpa') accepted a model with an attention logit softcap"


def _flex_backward_missing(error: BaseException) -> bool:
    return isinstance(error, NotImplementedError) and "backward" in str(error) and "CPU" in str(error)


def run_group(architecture, backend, adapter, dtype_name, packings, examples, settings, log=print) -> list[Cell]:
    """Every packing of one (architecture, backend, adapter, dtype): the models are built once."""
    start = time.perf_counter()
    cells = _run_group(architecture, backend, adapter, dtype_name, packings, examples, settings)
    states = "  ".join(f"{c.packing}={c.state.split(' (')[0]}" for c in cells)
    seconds = time.perf_counter() - start
    log(f"  {architecture:8s} {backend:15s} {adapter:6s} {dtype_name:9s} {states}  ({seconds:.1f}s)")
    return cells


def _run_group(architecture, backend, adapter, dtype_name, packings, examples, settings) -> list[Cell]:
    logps_tolerance, grad_tolerance = TOLERANCE[dtype_name]
    cells = [
        Cell(architecture, backend, adapter, packing, dtype_name, logps_tolerance=logps_tolerance,
             grad_tolerance=grad_tolerance)
        for packing in packings
    ]
    dtype = DTYPE_OF[dtype_name]
    on_cuda = settings.device.startswith("cuda")

    def finish(state, reason=""):
        for cell in cells:
            cell.state, cell.reason = state, reason
        return cells

    if backend == "sdpa" and getattr(tiny_config(architecture), "attn_logit_softcapping", None) is not None:
        try:
            refused, message = _softcap_refused(architecture, torch.float32, settings)
        except Exception as error:  # noqa: BLE001
            refused, message = False, f"{type(error).__name__}: {error}"
        return finish(NOT_SUPPORTED, REASON_GEMMA2_SDPA) if refused else finish(FAIL, message)
    if dtype == torch.bfloat16 and not on_cuda:
        return finish(NOT_RUN, REASON_BF16)

    try:
        reference = build_reference(architecture, backend, adapter, dtype, settings)
        patched = clone(reference, lambda: build_reference(architecture, backend, adapter, dtype, settings))
        # the matrix's own comparison is the check here (its negative controls break the rule on purpose, which
        # patch's self-check would refuse first); the self-check has tests of its own
        prefixshare.patch(patched, backend=backend, verify=False)
        if prefixshare.is_patched(reference):
            return finish(FAIL, "patching the copy also patched the reference")
        if prefixshare.patched_backend(patched) != backend:
            return finish(FAIL, f"patched_backend() is {prefixshare.patched_backend(patched)!r}, not {backend!r}")
    except Exception as error:  # noqa: BLE001 - report, don't stop the matrix
        return finish(ERROR, f"building the models: {type(error).__name__}: {error}")

    gradients = True
    for cell in cells:
        t0 = time.perf_counter()
        try:
            collator = make_collator(cell.packing, examples)
            cell.batch_shape = tuple(collator(examples)["input_ids"].shape)
            try:
                result = compare_with_alone(reference, patched, examples, collator, gradients=gradients)
            except NotImplementedError as error:
                if not (gradients and backend == "flex_attention" and _flex_backward_missing(error)):
                    raise
                gradients = False  # FlexAttention forward-only off CUDA: compare the log-probs
                result = compare_with_alone(reference, patched, examples, collator, gradients=False)
            cell.logps_error, cell.grad_error = result.logps_error, result.grad_error
            cell.worst_parameter, cell.num_parameters = result.worst_parameter, result.num_parameters
            reason = _failure_reason(result, logps_tolerance, grad_tolerance)
            repacked = repacked_4bit_layers(reference) + repacked_4bit_layers(patched)
            if repacked:
                reason = " and ".join(filter(None, [reason, (
                    f"bitsandbytes switched {len(repacked)} 4-bit layers (first: {repacked[0]}) to its bfloat16 "
                    "CPU kernel, so this cell did not compute in its dtype; see keep_bnb_default_path"
                )]))
            if reason:
                cell.state, cell.reason = FAIL, reason
            elif backend == "varlen" and not (on_cuda and dtype in (torch.float16, torch.bfloat16)):
                cell.state, cell.reason = PASS_REFERENCE_KERNEL, REASON_VARLEN_REFERENCE
            elif gradients:
                cell.state = PASS
            else:
                cell.state, cell.reason = PASS_LOGPS_ONLY, REASON_FLEX_CPU
        except Exception as error:  # noqa: BLE001
            cell.state, cell.reason = ERROR, f"{type(error).__name__}: {error}"
        cell.seconds = time.perf_counter() - t0
    return cells


def _failure_reason(result, logps_tolerance, grad_tolerance) -> str:
    """Empty when the comparison is within tolerance (NaN counts as a failure)."""
    parts = []
    if not result.logps_error <= logps_tolerance:
        parts.append(f"log-prob error {result.logps_error:.1e} > {logps_tolerance:g}")
    if result.grad_error is not None and not result.grad_error <= grad_tolerance:
        parts.append(f"gradient error {result.grad_error:.1e} > {grad_tolerance:g} on {result.worst_parameter}")
    return " and ".join(parts)


def run_matrix(
    architectures=ARCHITECTURES,
    backends=BACKENDS,
    adapters=ADAPTERS,
    packings=PACKINGS,
    dtypes=DTYPES,
    settings: Settings | None = None,
    log=print,
) -> list[Cell]:
    """Run every cell of the product; returns the cells in table order."""
    settings = settings or Settings(device=default_device())
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of the QLoRA loads
    examples = make_examples(settings)
    cells = []
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        for dtype_name in dtypes:
            for architecture in architectures:
                for adapter in adapters:
                    for backend in backends:
                        group = (architecture, backend, adapter, dtype_name, packings, examples, settings, log)
                        cells += run_group(*group)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(settings.workdir, ignore_errors=True)
    return cells


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------- every architecture
# The breadth matrix: every decoder-only causal LM of the installed transformers (AutoModelForCausalLM's mapping),
# each built tiny from its config alone (prefixshare.testing.tiny_model_of), patched by prefixshare.patch(model,
# backend=...) with no opt-in, and compared with every prompt+response run alone through the unpatched model
# (eager), log-probs and gradients, for K responses per prompt, unpacked and packed, full fine-tuning and (dense
# models) LoRA on every linear layer. A model patch() refuses is reported with patch's own message.
ENUM_BACKENDS = ("eager", "sdpa")
ENUM_RESPONSES = (2, 4)
ENUM_PACKINGS = ("unpacked", "packed")
# a leak must be visible: with a rule that lets the rejected response see the chosen one, the log-probs or the
# gradients of the tiny model must move by at least this much (100 times the tolerance), or the comparison could
# not tell exact from leaky on it
LEAK_VISIBLE = 1e-3

EXACT = "exact"
REFUSED = "refused"
NOT_BUILT = "not built"
# states FAIL and ERROR as above


@dataclass
class ArchitectureResult:
    """One model type of the breadth matrix. ``cells``: one dict per (backend, adapter, K, packing) that ran, with
    ``logps_error`` / ``grad_error``; ``refusals``: backend -> patch's message for a backend it refused."""

    model_type: str
    model_class: str = ""
    status: str = NOT_RUN
    reason: str = ""
    features: list = field(default_factory=list)
    moe: bool = False
    cells: list = field(default_factory=list)
    refusals: dict = field(default_factory=dict)
    leak_error: float | None = None
    leak_grad_error: float | None = None
    seconds: float = 0.0

    @property
    def worst(self) -> tuple[float | None, float | None]:
        logps = [c["logps_error"] for c in self.cells if c.get("logps_error") is not None]
        grads = [c["grad_error"] for c in self.cells if c.get("grad_error") is not None]
        return (max(logps) if logps else None, max(grads) if grads else None)


def _is_moe(config) -> bool:
    """Whether the text config (or a sub-dict of it, as DBRX's ffn_config) routes tokens to several experts."""
    from prefixshare._compat import text_config

    names = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

    def found(values: dict) -> bool:
        return any(
            (k in names and isinstance(v, int) and not isinstance(v, bool) and v > 1)
            or (isinstance(v, dict) and found(v))
            for k, v in values.items()
        )

    return found(text_config(config).to_dict())


def _alone_and_grads(reference, examples) -> tuple[torch.Tensor, dict]:
    """Log-probs of every prompt+response run alone, and the gradients of sum(w * logps) (fixed random w)."""
    from prefixshare.testing.exactness import _loss_weights, _trainable_grads, logps_alone

    reference.zero_grad(set_to_none=True)
    want = logps_alone(reference, examples)
    (want * _loss_weights(want.shape).to(want.device)).sum().backward()
    return want.detach(), _trainable_grads(reference)


# The breadth matrix's gradient error is the normwise relative error of the whole gradient, every trainable
# parameter as one vector: max |g - w| / max |w| (prefixshare.testing.gradient_error with floor 1); a parameter
# whose gradient is missing or extra fails on its own. A per-parameter measure divides float32 rounding by
# nothing on some architectures: a key bias's true gradient is zero (softmax ignores a shift common to all keys),
# and a scalar summed over every token (Apertus' xIELU alpha) or Gemma 4's scaling-free attention carry rounding
# of 1e-5 of their own scale even between two plain batches of the unpatched model (paired rows vs runs alone:
# 6e-6 on Gemma 4, 4e-7 on Llama). The leaky negative control is measured the same way, on every architecture.
ENUM_GRADIENT_FLOOR = 1.0


def _shared_errors(patched, examples, collator, want, want_grads) -> tuple[float, float, str]:
    from prefixshare.testing.exactness import _loss_weights, _trainable_grads, align_gradients, gradient_error, relative_error

    patched.zero_grad(set_to_none=True)
    got = prefixshare.response_logps(patched, collator(examples)).logps
    (got * _loss_weights(got.shape).to(got.device)).sum().backward()
    grads, want_grads, one_sided = align_gradients(_trainable_grads(patched), want_grads)
    if one_sided:
        return relative_error(got, want), float("inf"), f"gradients on one side only: {one_sided[:3]}"
    worst, name = gradient_error(grads, want_grads, floor=ENUM_GRADIENT_FLOOR)
    return relative_error(got, want), worst, name or ""


@contextlib.contextmanager
def leaky_layout():
    """Within the block, every layout lets a response see the responses before it in its unit (plain causal
    attention within the unit): the negative control of the breadth matrix."""
    from prefixshare.layout import PrefixShareLayout

    original = PrefixShareLayout.attention_predicate

    def leaky(self, sliding_window=None):
        unit = self.unit_ids

        def predicate(b, h, q_idx, kv_idx):
            return (unit[b, q_idx] == unit[b, kv_idx]) & (kv_idx <= q_idx)

        return predicate

    PrefixShareLayout.attention_predicate = leaky
    try:
        yield
    finally:
        PrefixShareLayout.attention_predicate = original


def _vocabulary(model) -> int:
    """Token ids both the embedding and the LM head know (Moshi's embedding has one more than its head)."""
    sizes = [model.get_input_embeddings().num_embeddings]
    head = model.get_output_embeddings()
    if isinstance(getattr(head, "out_features", None), int):
        sizes.append(head.out_features)
    return min(sizes)


def _enum_examples(model, settings: Settings, num_responses: int) -> list[dict]:
    vocabulary = _vocabulary(model)
    return random_examples(settings.num_examples, vocabulary, seed=settings.seed + num_responses, num_responses=num_responses)


def _enum_collator(packing: str, examples):
    if packing == "unpacked":
        return PrefixShareCollator(pad_token_id=0)
    budget = packing_budget(PrefixShareCollator(pad_token_id=0).unit_lengths(examples))
    return PrefixShareCollator(pad_token_id=0, max_tokens_per_row=budget)


def _enum_lora(model, settings: Settings):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(settings.seed + 1)
    config = LoraConfig(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, target_modules="all-linear",
                        lora_dropout=0.0, init_lora_weights=False)  # fmt: skip
    return get_peft_model(model, config)


def _describe(error: BaseException) -> str:
    """``Type: first line of the message`` (the message may be empty: StopIteration)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def check_architecture(model_type: str, settings: Settings, *, lora: bool = True, backends=ENUM_BACKENDS) -> ArchitectureResult:
    """The breadth-matrix row of one model type: exact, refused (patch's reason), not built (why), or FAIL/ERROR."""
    from prefixshare.structure import attention_features
    from prefixshare.testing import tiny_model_of

    result = ArchitectureResult(model_type)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = tiny_model_of(model_type, seed=settings.seed).to(settings.device)
    except Exception as error:  # noqa: BLE001 - a config class that cannot be built from its defaults
        result.status, result.reason = NOT_BUILT, _describe(error)
        result.seconds = time.perf_counter() - start
        return result
    result.model_class = type(base).__name__
    result.moe = _is_moe(base.config)
    try:  # the tiny model's own forward must work before anything of prefixshare is asked of it
        vocabulary = _vocabulary(base)
        with torch.no_grad():  # the largest ids the examples use, too
            base(input_ids=torch.tensor([[3, vocabulary - 1, 4, vocabulary - 2]], device=settings.device), use_cache=False)
    except Exception as error:  # noqa: BLE001
        result.status = NOT_BUILT
        result.reason = f"the tiny model's own forward fails: {_describe(error)}"
        result.seconds = time.perf_counter() - start
        return result
    try:
        result.features = sorted(attention_features(base))
        result.status, result.reason = _check_built(base, result, settings, lora and not result.moe, backends)
    except Exception as error:  # noqa: BLE001 - report, don't stop the matrix
        result.status, result.reason = ERROR, f"{type(error).__name__}: {str(error)[:400]}"
    result.seconds = time.perf_counter() - start
    return result


def _check_built(base, result: ArchitectureResult, settings: Settings, lora: bool, backends) -> tuple[str, str]:
    adapters = ("full", "lora") if lora else ("full",)
    accepted = []
    for backend in backends:
        candidate = copy.deepcopy(base)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prefixshare.patch(candidate, backend=backend)
        except prefixshare.UnsupportedModelError as error:  # the model itself (every backend): its reason
            return REFUSED, str(error)
        except ValueError as error:  # this backend cannot apply a feature the model has
            result.refusals[backend] = str(error)
            continue
        accepted.append(backend)
    if not accepted:
        return REFUSED, "; ".join(f"{b}: {m}" for b, m in result.refusals.items())
    failures = []
    for adapter in adapters:
        reference = base if adapter == "full" else _enum_lora(copy.deepcopy(base), settings)
        for num_responses in ENUM_RESPONSES:
            examples = _enum_examples(base, settings, num_responses)
            want, want_grads = _alone_and_grads(reference, examples)
            for backend in accepted:
                patched = prefixshare.patch(copy.deepcopy(reference), backend=backend, verify=False)
                for packing in ENUM_PACKINGS:
                    logps_error, grad_error, worst = _shared_errors(
                        patched, examples, _enum_collator(packing, examples), want, want_grads
                    )
                    cell = dict(backend=backend, adapter=adapter, responses=num_responses, packing=packing,
                                logps_error=logps_error, grad_error=grad_error, worst_parameter=worst)  # fmt: skip
                    result.cells.append(cell)
                    tolerance = TOLERANCE["float32"]
                    if not (logps_error <= tolerance[0] and grad_error <= tolerance[1]):
                        failures.append(
                            f"{backend} x {adapter} x K={num_responses} x {packing}: log-probs {logps_error:.1e}, "
                            f"gradients {grad_error:.1e} ({worst})"
                        )
    # the negative control: a leaky rule must show on this model, in log-probs and in gradients
    patched = prefixshare.patch(copy.deepcopy(base), backend=accepted[0], verify=False)
    examples = _enum_examples(base, settings, 2)
    want, want_grads = _alone_and_grads(base, examples)
    with leaky_layout():
        result.leak_error, result.leak_grad_error, _ = _shared_errors(
            patched, examples, _enum_collator("packed", examples), want, want_grads
        )
    if failures:
        return FAIL, "; ".join(failures)
    if not max(result.leak_error, result.leak_grad_error) >= LEAK_VISIBLE:
        return FAIL, (
            f"a leaky rule moves this tiny model's log-probs by only {result.leak_error:.1e} and its gradients by "
            f"{result.leak_grad_error:.1e} (both < {LEAK_VISIBLE:g}): the check cannot tell exact from leaky here"
        )
    return EXACT, ""


def run_enumeration(model_types=None, settings: Settings | None = None, log=print, **options) -> list[ArchitectureResult]:
    """:func:`check_architecture` for ``model_types`` (default: every causal LM of the installed transformers)."""
    from prefixshare.testing import causal_lm_model_types

    settings = settings or Settings(device=default_device())
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    results = []
    try:
        for model_type in model_types or causal_lm_model_types():
            result = check_architecture(model_type, settings, **options)
            log(f"  {model_type:28s} {result.status:9s} ({result.seconds:.1f}s) {result.reason[:160]}")
            results.append(result)
    finally:
        torch.set_num_threads(threads)
    return results


# ---------------------------------------------------------------------------------------------- report
def versions() -> dict[str, str]:
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


def render_markdown(cells: list[Cell], command: str, device: str, seconds: float, examples, packings) -> str:
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
        f"Produced by `{command}` on {describe_machine(device)}; "
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


def readme_support_summary(results: list[ArchitectureResult]) -> str:
    """The README's support paragraph: the count and the list of exact model types, and the refused kinds."""
    summary = breadth_summary(results)
    return (
        f"{len(summary[EXACT])} of the {len(results)} causal-LM model types of transformers {transformers.__version__} "
        f"are exact: {', '.join(summary[EXACT])}."
    )


# ---------------------------------------------------------------------------------------------- CLI
def _choices(values, allowed, what):
    if not values:
        return tuple(allowed)
    chosen = [v.strip() for value in values for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return tuple(v for v in allowed if v in chosen)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="write the Markdown table here (default: print it)")
    parser.add_argument("--json", help="also write every cell as JSON here")
    parser.add_argument("--arch", action="append", help=f"architectures, comma separated ({', '.join(ARCHITECTURES)})")
    parser.add_argument("--backend", action="append", help=f"backends ({', '.join(BACKENDS)})")
    parser.add_argument("--adapter", action="append", help=f"adapters ({', '.join(ADAPTERS)})")
    parser.add_argument("--packing", action="append", help=f"packings ({', '.join(PACKINGS)})")
    parser.add_argument("--dtype", action="append", help=f"dtypes ({', '.join(DTYPES)})")
    parser.add_argument("--quick", action="store_true", help="a representative subset: " + str(QUICK))
    parser.add_argument(
        "--breadth", action="store_true",
        help="also check every causal-LM model type of the installed transformers (the breadth section)",
    )
    parser.add_argument("--breadth-only", action="store_true", help="only the breadth section")
    parser.add_argument("--model-type", action="append", help="breadth: these model types only (comma separated)")
    parser.add_argument("--device", default=default_device(), help="cpu or cuda[:n] (default: %(default)s)")
    parser.add_argument("--examples", type=int, default=3, help="examples per batch (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s; 0 = torch's default)"
    )
    args = parser.parse_args(argv)
    # peft 0.21 calls a transformers 5 method deprecated for v6: not what this script checks
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    architectures = _choices(args.arch, ARCHITECTURES, "architecture")
    packings = _choices(args.packing, PACKINGS, "packing")
    if args.quick:
        # --quick narrows what --arch / --packing chose (everything when they are not given)
        architectures = tuple(a for a in architectures if a in QUICK["architectures"])
        packings = tuple(p for p in packings if p in QUICK["packings"])
    settings = Settings(device=args.device, num_examples=args.examples, seed=args.seed, threads=args.threads or None)
    torch.manual_seed(args.seed)

    start = time.perf_counter()
    print(f"prefixshare compatibility matrix on {args.device}", file=sys.stderr)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    cells = [] if args.breadth_only else run_matrix(
        architectures,
        _choices(args.backend, BACKENDS, "backend"),
        _choices(args.adapter, ADAPTERS, "adapter"),
        packings,
        _choices(args.dtype, DTYPES, "dtype"),
        settings,
        log=log,
    )
    seconds = time.perf_counter() - start
    breadth, breadth_seconds = [], 0.0
    if args.breadth or args.breadth_only:
        model_types = [t.strip() for v in args.model_type or [] for t in v.split(",") if t.strip()] or None
        breadth_start = time.perf_counter()
        breadth = run_enumeration(model_types, Settings(device=args.device, seed=args.seed), log=log)
        breadth_seconds = time.perf_counter() - breadth_start

    command = " ".join(["python", "compat/run_matrix.py", *(argv if argv is not None else sys.argv[1:])])
    parts = []
    if cells:
        parts.append(render_markdown(cells, command, args.device, seconds, make_examples(settings), packings))
    else:
        parts.append(f"# Compatibility matrix\n\nProduced by `{command}` on {describe_machine(args.device)}; "
                     + ", ".join(f"{k} {val}" for k, val in versions().items()) + ".")
    if breadth:
        parts.append(render_breadth_markdown(breadth, breadth_seconds))
    markdown = "\n\n".join(parts)
    if args.out:
        Path(args.out).write_text(markdown + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(markdown)
    if args.json:
        payload = dict(
            command=command,
            machine=describe_machine(args.device),
            versions=versions(),
            tolerance=TOLERANCE,
            seconds=seconds,
            cells=[asdict(c) for c in cells],
            breadth=[asdict(r) for r in breadth],
        )
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    failed = [c for c in cells if c.state in (FAIL, ERROR)] + [r for r in breadth if r.status in (FAIL, ERROR)]
    print(f"{len(cells)} cells, {len(breadth)} model types in {time.perf_counter() - start:.0f} s; {len(failed)} failed",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
