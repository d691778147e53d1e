"""The compatibility matrix (prefixshare.testing.matrix, the logic behind compat/run_matrix.py) on CPU: every
cell that runs passes at 1e-5, every other cell says why it did not run, and the matrix does fail when the
attention rule is wrong.

The whole CPU matrix runs once per session (~30-70 s on 2 cores: tiny models, 3 examples); the bfloat16
cells need CUDA and are reported as not run, FlexAttention's gradients need CUDA and only its log-probs
are compared.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import types
from pathlib import Path

import pytest
import torch

import prefixshare
from prefixshare.layout import PrefixShareLayout
from prefixshare.testing import ARCHITECTURE_NAMES, tiny_model
from prefixshare.testing import matrix as rm
from prefixshare.testing.matrix import deep

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

# peft 0.21 calls a transformers 5 method deprecated for v6
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    """compat/run_matrix.py as a module (its ``main`` runs in this process: no second import of torch)."""
    spec = importlib.util.spec_from_file_location("prefixshare_run_matrix", ROOT / "compat" / "run_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cpu_cells():
    """Every cell of the matrix, run on CPU (bfloat16 cells are decided without building a model)."""
    return rm.run_matrix(settings=rm.Settings(device="cpu"), log=lambda line: None)


def test_the_matrix_covers_every_axis(cpu_cells):
    keys = {c.key for c in cpu_cells}
    assert len(keys) == len(cpu_cells) == 7 * 4 * 3 * 3 * 2
    assert {c.architecture for c in cpu_cells} == set(ARCHITECTURE_NAMES)


def test_every_cpu_cell_that_runs_passes(cpu_cells):
    ran = [c for c in cpu_cells if c.state not in (rm.NOT_RUN, rm.NOT_SUPPORTED)]
    assert len(ran) == 7 * 4 * 3 * 3 - 3 * 3  # every float32 cell but gemma2 x sdpa
    failures = [f"{' x '.join(c.key)}: {c.state}: {c.reason}" for c in ran if c.state not in rm.RAN_OK]
    assert not failures, "\n".join(failures)
    for c in ran:
        assert c.logps_error <= 1e-5, c


def test_gradients_are_compared_wherever_cpu_can_compute_them(cpu_cells):
    for c in cpu_cells:
        if c.dtype != "float32" or c.state == rm.NOT_SUPPORTED:
            continue
        if c.backend == "flex_attention":
            assert (c.state, c.reason) == (rm.PASS_LOGPS_ONLY, rm.REASON_FLEX_CPU), c
            assert c.grad_error is None
            continue
        if c.backend == "varlen":  # on CPU the varlen sequences run through the reference kernel
            assert (c.state, c.reason) == (rm.PASS_REFERENCE_KERNEL, rm.REASON_VARLEN_REFERENCE), c
        else:
            assert c.state == rm.PASS, c
        assert c.grad_error is not None and c.grad_error <= 1e-5, c
        assert c.num_parameters > 0
        if c.adapter in ("lora", "qlora"):  # only the adapter trains: base weights (4-bit or not) are frozen
            assert "lora_" in c.worst_parameter, c


def test_cells_that_do_not_run_say_why(cpu_cells):
    for c in cpu_cells:
        if c.architecture == "gemma2" and c.backend == "sdpa":
            assert (c.state, c.reason) == (rm.NOT_SUPPORTED, rm.REASON_GEMMA2_SDPA), c
        elif c.dtype == "bfloat16":
            assert (c.state, c.reason) == (rm.NOT_RUN, rm.REASON_BF16), c
        assert c.state in rm.RAN_OK or c.reason, c


def test_patch_refuses_sdpa_for_gemma2s_softcap():
    model = tiny_model("gemma2")
    with pytest.raises(ValueError, match="softcap.*eager"):
        prefixshare.patch(model, backend="sdpa")
    assert not prefixshare.is_patched(model)


# ---------------------------------------------------------------------------------------------- negative controls
def _run_one(architecture, backend="eager", adapter="full", packings=("unpacked", "packed")):
    settings = rm.Settings(device="cpu")
    examples = rm.make_examples(settings)
    group = (architecture, backend, adapter, "float32", packings, examples, settings)
    return rm.run_group(*group, log=lambda line: None)


@pytest.mark.parametrize(
    "architecture, backend, adapter",
    [("llama", "sdpa", "full"), ("gemma2", "flex_attention", "qlora")],  # the second: forward-only, 4-bit
)
def test_the_matrix_fails_when_responses_see_each_other(architecture, backend, adapter):
    with rm.leaky_layout():  # causal within the unit: rejected attends to chosen
        cells = _run_one(architecture, backend, adapter)
    for cell in cells:
        assert cell.state == rm.FAIL and cell.logps_error > 1e-2, cell


def test_4bit_layers_compute_in_float32_after_a_no_grad_forward(tmp_path):
    """A 4-bit layer of the matrix's QLoRA model gives the float32 matmul of its dequantized weight, also after
    an eval-mode forward under no_grad (how FlexAttention cells run on CPU).

    Fails on the main this branch started from, on a CPU with AVX512-BF16 (bitsandbytes 0.50.2): that
    forward moved every layer to bitsandbytes' bfloat16 kernel, 3.6e-3 off.
    """
    import bitsandbytes.functional as bnbf

    model = deep.load_4bit("gemma2", "eager", torch.float32, rm.Settings(device="cpu", workdir=str(tmp_path)))
    layer = model.model.layers[1].mlp.down_proj
    weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]), use_cache=False)
        got = layer(x).double()
    exact = x.double() @ weight.t()
    assert float((got - exact).abs().max() / exact.abs().max()) < 1e-5


@pytest.mark.skipif(
    not __import__("bitsandbytes.functional").functional.has_avx512bf16(),
    reason="bitsandbytes has no bfloat16 CPU kernel on this CPU",
)
def test_a_qlora_cell_fails_when_bitsandbytes_computes_in_bfloat16(monkeypatch):
    """Without keep_bnb_default_path the forward-only cell runs in bfloat16: the cell must fail and say so."""
    monkeypatch.setattr(deep, "keep_bnb_default_path", lambda model: model)
    for cell in _run_one("gemma2", "flex_attention", "qlora", packings=("packed",)):
        assert cell.state == rm.FAIL and "bfloat16 CPU kernel" in cell.reason, cell


@pytest.mark.parametrize("mistake", ["no window", "window one too wide"])
def test_the_matrix_fails_when_the_sliding_window_is_wrong(monkeypatch, mistake):
    original = PrefixShareLayout.attention_predicate

    def wrong(self, sliding_window=None):
        if mistake == "no window" or sliding_window is None:
            return original(self)
        return original(self, sliding_window + 1)

    monkeypatch.setattr(PrefixShareLayout, "attention_predicate", wrong)
    for cell in _run_one("mistral", "eager", "lora"):
        # errors of a few 1e-2 on log-probs, ~1 on gradients: far above 1e-5, and above bfloat16's tolerance
        assert cell.state == rm.FAIL and cell.logps_error > 1e-2 and cell.grad_error > 1e-1, cell


def test_qlora_reference_can_be_rebuilt_when_deepcopy_fails(monkeypatch):
    """The fallback for 4-bit models that cannot be deep-copied: load the checkpoint again, copy the adapter."""

    def no_deepcopy(model):
        raise RuntimeError("no deepcopy for this model")

    monkeypatch.setattr(deep, "copy", types.SimpleNamespace(deepcopy=no_deepcopy))  # only the deep matrix's deepcopy
    for cell in _run_one("qwen3", "sdpa", "qlora", packings=("packed",)):
        assert cell.state == rm.PASS and cell.grad_error <= 1e-5, cell


# ---------------------------------------------------------------------------------------------- the script
def test_the_script_writes_markdown_and_json(tmp_path):
    out, cells_json = tmp_path / "MATRIX.md", tmp_path / "cells.json"
    status = _load_script().main(
        ["--arch", "gemma2", "--adapter", "full", "--packing", "packed", "--device", "cpu",
         "--out", str(out), "--json", str(cells_json)]
    )
    assert status == 0
    text = out.read_text()
    assert "python compat/run_matrix.py --arch gemma2" in text
    assert "`1e-5` in float32" in text and "torch " in text and "bitsandbytes " in text
    assert "| architecture | adapter | packing | eager | sdpa | flex_attention | varlen |" in text
    assert "not supported [c]" in text and "pass, log-probs only [a]" in text
    assert rm.REASON_BF16 in text and rm.REASON_GEMMA2_SDPA in text
    payload = json.loads(cells_json.read_text())
    states = {(c["backend"], c["dtype"]): c["state"] for c in payload["cells"]}
    assert states == {
        ("eager", "float32"): rm.PASS,
        ("sdpa", "float32"): rm.NOT_SUPPORTED,
        ("flex_attention", "float32"): rm.PASS_LOGPS_ONLY,
        ("eager", "bfloat16"): rm.NOT_RUN,
        ("sdpa", "bfloat16"): rm.NOT_SUPPORTED,
        ("flex_attention", "bfloat16"): rm.NOT_RUN,
        ("varlen", "float32"): rm.PASS_REFERENCE_KERNEL,
        ("varlen", "bfloat16"): rm.NOT_RUN,
    }


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, so tqdm draws its bar into it."""

    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_the_matrix_shows_a_progress_bar_on_a_terminal_only(monkeypatch, terminal):
    """One tick per cell (deep matrix) and per model type (breadth), on stderr, the log lines above the bar; no bar
    where stderr is not a terminal. (New with the progress bars: run_matrix had no ``progress`` on main.)"""
    pytest.importorskip("tqdm")
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    lines = []
    settings = rm.Settings(device="cpu")
    cells = rm.run_matrix(["llama"], ["eager"], ["full"], ["unpacked", "packed"], ["float32"], settings,
                          log=lines.append, progress=True)  # fmt: skip
    results = rm.run_enumeration(["bart"], rm.Settings(device="cpu"), log=lines.append, progress=True)
    assert [c.state for c in cells] == [rm.PASS, rm.PASS] and results[0].status == rm.REFUSED
    assert len(lines) == 2 and "llama" in lines[0] and "bart" in lines[1]  # the log, bar or not
    drawn = stderr.getvalue()
    if terminal:
        assert "matrix: 100%" in drawn and "2/2" in drawn and "breadth: 100%" in drawn and "1/1" in drawn
    else:
        assert drawn == ""


# ---------------------------------------------------------------------------------------------- every architecture
# A representative subset of the breadth matrix (every causal LM of the installed transformers), seconds each:
# expected result per model type (model types this transformers lacks are skipped)
BREADTH_FAST = {
    "llama": rm.EXACT,
    "gpt2": rm.EXACT,  # learned absolute positions, fused qkv (Conv1D projections)
    "mixtral": rm.EXACT,  # MoE
    "gpt_oss": rm.EXACT,  # MoE, attention sinks
    "deepseek_v3": rm.EXACT,  # MLA, MoE
    "gemma2": rm.EXACT,  # softcap: sdpa refused, eager exact
    "cohere2": rm.EXACT,  # NoPE full layers
    "qwen2_moe": rm.EXACT,  # a window in the model's mask only
    "granite": rm.EXACT,  # multipliers
    "bart": rm.REFUSED,  # ignores position_ids
    "llama4_text": rm.REFUSED,  # chunked attention
    "qwen3_next": rm.REFUSED,  # linear attention
    "bloom": rm.REFUSED,  # ALiBi outside the attention interface
}


def _available(model_type):
    from prefixshare.testing import causal_lm_model_types

    return model_type in causal_lm_model_types()


# what transformers 4.57 implements otherwise: GPT-2's blocks do not pass their keyword arguments on to attention,
# Qwen2-MoE's attention does not go through the AttentionInterface (both refused there, with that reason)
REFUSED_IN_4 = {"gpt2": "do not pass their keyword arguments", "qwen2_moe": "AttentionInterface"}


@pytest.mark.parametrize("model_type", list(BREADTH_FAST))
def test_breadth_representatives(model_type):
    from prefixshare._compat import TRANSFORMERS_VERSION

    if not _available(model_type):
        pytest.skip(f"transformers has no {model_type} here")
    result = rm.check_architecture(model_type, rm.Settings(device="cpu"))
    if TRANSFORMERS_VERSION.major < 5 and model_type in REFUSED_IN_4:
        assert result.status == rm.REFUSED and REFUSED_IN_4[model_type] in result.reason, result
        return
    assert result.status == BREADTH_FAST[model_type], (result.status, result.reason)
    if result.status == rm.EXACT:
        assert result.cells and max(result.leak_error, result.leak_grad_error) >= rm.LEAK_VISIBLE
        assert {c["responses"] for c in result.cells} == {2, 4}
        assert {c["packing"] for c in result.cells} == {"unpacked", "packed"}
        assert {c["adapter"] for c in result.cells} == ({"full"} if result.moe else {"full", "lora"})
    else:
        assert result.reason


@pytest.mark.parametrize("model_type", ["llama", "gpt_oss"])
def test_breadth_fails_a_leaky_rule(monkeypatch, model_type):
    """The breadth matrix's own comparison catches a leak (with patch's self-check, which would refuse the model
    first, switched off)."""
    if not _available(model_type):
        pytest.skip(f"transformers has no {model_type} here")
    import prefixshare.selfcheck

    monkeypatch.setattr(prefixshare.selfcheck, "self_check", lambda model, **options: {})
    with rm.leaky_layout():
        result = rm.check_architecture(model_type, rm.Settings(device="cpu"), lora=False)
    assert result.status == rm.FAIL, result.reason
    assert all(c["logps_error"] > 1e-3 for c in result.cells), result.cells


def test_default_initialization_can_hide_a_leak():
    """Why the tiny models are initialized with std 0.1: with transformers' default 0.02 the same leak moves a
    tiny Llama's log-probs several times less (measured: 8e-3 against 6e-2); a leak of a token or two shrinks
    the same way, towards the float32 noise (the matrix requires 1e-3 from the whole leak, on every exact one)."""
    import copy

    from prefixshare.testing import tiny_model_of

    errors = {}
    for std in (0.02, 0.1):
        base = tiny_model_of("llama", initializer_range=std)
        examples = rm.breadth_examples(base, rm.Settings(device="cpu"), 2)
        patched = prefixshare.patch(copy.deepcopy(base), verify=False)
        with torch.no_grad(), rm.leaky_layout():
            got = prefixshare.response_logps(patched, rm.make_collator("packed", examples)(examples)).logps
            want = prefixshare.testing.logps_alone(base, examples)
        errors[std] = prefixshare.testing.relative_error(got, want)
    assert errors[0.1] > 5 * errors[0.02], errors


@pytest.mark.slow
@pytest.mark.breadth
def test_every_causal_lm_of_this_transformers_is_exact_or_refused_with_a_reason():
    """The whole breadth matrix (about 3 minutes on 2 CPU cores): no architecture is accepted with wrong numbers,
    every refusal has a reason, every exact one can show a leak."""
    results = rm.run_enumeration(settings=rm.Settings(device="cpu"), log=lambda line: None)
    bad = [f"{r.model_type}: {r.status}: {r.reason}" for r in results if r.status in (rm.FAIL, rm.ERROR)]
    assert not bad, "\n".join(bad)
    for r in results:
        assert r.status in (rm.EXACT, rm.REFUSED, rm.NOT_BUILT), r
        if r.status == rm.EXACT:
            assert max(r.leak_error, r.leak_grad_error) >= rm.LEAK_VISIBLE, r
        else:
            assert r.reason, r
    assert sum(r.status == rm.EXACT for r in results) >= 60
