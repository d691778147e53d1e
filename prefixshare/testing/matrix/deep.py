"""The deep matrix: does prefix sharing give the numbers of the plain model on seven tiny architectures?

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
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import torch
import transformers

import prefixshare

from ...collators import PairedCollator, PrefixShareCollator
from ..exactness import compare_with_alone, random_examples
from ..tiny import ARCHITECTURE_NAMES, tiny_config, tiny_model
from .progress import Progress

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
    progress: bool = False,
) -> list[Cell]:
    """Run every cell of the product; returns the cells in table order. ``log`` gets one line per group of cells
    (the packings of one architecture, backend, adapter and dtype); ``progress``: a bar on stderr, one tick per
    cell (:class:`Progress`)."""
    settings = settings or Settings(device=default_device())
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of the QLoRA loads
    examples = make_examples(settings)
    cells = []
    total = len(dtypes) * len(architectures) * len(adapters) * len(backends) * len(packings)
    try:
        with torch_threads(settings.threads), Progress(total, "matrix", "cell", log, progress) as bar:
            for dtype_name in dtypes:
                for architecture in architectures:
                    for adapter in adapters:
                        for backend in backends:
                            bar.now(f"{architecture} {backend} {adapter} {dtype_name}")
                            group = (architecture, backend, adapter, dtype_name, packings, examples, settings, bar.log)
                            cells += run_group(*group)
                            bar.tick(len(packings))
    finally:
        shutil.rmtree(settings.workdir, ignore_errors=True)
    return cells


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads set to ``threads`` within the block (None: left as they are), restored after."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
