"""The breadth matrix: every causal LM of the installed transformers, exact, refused (with patch's reason) or not
built (with the reason)."""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from dataclasses import dataclass, field

import torch

import prefixshare

from ..._compat import text_config
from ...layout import PrefixShareLayout
from ...structure import attention_features
from ..exactness import align_gradients, gradient_error, logps_alone, loss_weights, random_examples, relative_error
from ..exactness import trainable_grads
from ..tiny import causal_lm_model_types, tiny_model_of
from .deep import ERROR, FAIL, NOT_RUN, TOLERANCE, Settings, default_device, make_collator, torch_threads
from .progress import Progress

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
# and FAIL, ERROR as in the deep matrix


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
    reference.zero_grad(set_to_none=True)
    want = logps_alone(reference, examples)
    (want * loss_weights(want.shape).to(want.device)).sum().backward()
    return want.detach(), trainable_grads(reference)


# The breadth matrix's gradient error is the normwise relative error of the whole gradient, every trainable
# parameter as one vector: max |g - w| / max |w| (prefixshare.testing.gradient_error with floor 1); a parameter
# whose gradient is missing or extra fails on its own. A per-parameter measure divides float32 rounding by
# nothing on some architectures: a key bias's true gradient is zero (softmax ignores a shift common to all keys),
# and a scalar summed over every token (Apertus' xIELU alpha) or Gemma 4's scaling-free attention carry rounding
# of 1e-5 of their own scale even between two plain batches of the unpatched model (paired rows vs runs alone:
# 6e-6 on Gemma 4, 4e-7 on Llama). The leaky negative control is measured the same way, on every architecture.
ENUM_GRADIENT_FLOOR = 1.0


def _shared_errors(patched, examples, collator, want, want_grads) -> tuple[float, float, str]:
    patched.zero_grad(set_to_none=True)
    got = prefixshare.response_logps(patched, collator(examples)).logps
    (got * loss_weights(got.shape).to(got.device)).sum().backward()
    grads, want_grads, one_sided = align_gradients(trainable_grads(patched), want_grads)
    if one_sided:
        return relative_error(got, want), float("inf"), f"gradients on one side only: {one_sided[:3]}"
    worst, name = gradient_error(grads, want_grads, floor=ENUM_GRADIENT_FLOOR)
    return relative_error(got, want), worst, name or ""


@contextlib.contextmanager
def leaky_layout():
    """Within the block, every layout lets a response see the responses before it in its unit (plain causal
    attention within the unit): the negative control of the breadth matrix."""
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


def breadth_examples(model, settings: Settings, num_responses: int) -> list[dict]:
    """``settings.num_examples`` random examples of K = ``num_responses`` in the ids ``model`` knows."""
    vocabulary = _vocabulary(model)
    return random_examples(settings.num_examples, vocabulary, seed=settings.seed + num_responses, num_responses=num_responses)


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
            examples = breadth_examples(base, settings, num_responses)
            want, want_grads = _alone_and_grads(reference, examples)
            for backend in accepted:
                patched = prefixshare.patch(copy.deepcopy(reference), backend=backend, verify=False)
                for packing in ENUM_PACKINGS:
                    logps_error, grad_error, worst = _shared_errors(
                        patched, examples, make_collator(packing, examples), want, want_grads
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
    examples = breadth_examples(base, settings, 2)
    want, want_grads = _alone_and_grads(base, examples)
    with leaky_layout():
        result.leak_error, result.leak_grad_error, _ = _shared_errors(
            patched, examples, make_collator("packed", examples), want, want_grads
        )
    if failures:
        return FAIL, "; ".join(failures)
    if not max(result.leak_error, result.leak_grad_error) >= LEAK_VISIBLE:
        return FAIL, (
            f"a leaky rule moves this tiny model's log-probs by only {result.leak_error:.1e} and its gradients by "
            f"{result.leak_grad_error:.1e} (both < {LEAK_VISIBLE:g}): the check cannot tell exact from leaky here"
        )
    return EXACT, ""


def run_enumeration(
    model_types=None, settings: Settings | None = None, log=print, progress: bool = False, **options
) -> list[ArchitectureResult]:
    """:func:`check_architecture` for ``model_types`` (default: every causal LM of the installed transformers).
    ``log`` gets one line per model type; ``progress``: a bar on stderr, one tick per model type."""
    settings = settings or Settings(device=default_device())
    model_types = list(model_types or causal_lm_model_types())
    results = []
    with torch_threads(settings.threads), Progress(len(model_types), "breadth", "model type", log, progress) as bar:
        for model_type in model_types:
            bar.now(model_type)
            result = check_architecture(model_type, settings, **options)
            bar.log(f"  {model_type:28s} {result.status:9s} ({result.seconds:.1f}s) {result.reason[:160]}")
            bar.tick()
            results.append(result)
    return results
