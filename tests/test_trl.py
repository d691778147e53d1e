"""PrefixShareDPOTrainer against TRL's own DPOTrainer: same data, seed and optimizer, same per-step numbers.

Every DPOConfig option of TRL 1.16 that changes the numbers is one case of LOSS_CASES / OPTION_CASES (one trainer
run of each kind per case). Set PREFIXSHARE_TRL_DIFFS=path.json to write the worst relative and absolute difference
seen per case (the report of docs/trl.md).

Each comparison trains a tiny Llama (prefixshare.testing, no dropout) for 3 optimizer steps of 4 pairs with both
trainers and compares every logged value at every step.

Tolerance: relative 1e-4, absolute 1e-5 (and exact equality for counts: num_tokens, rewards/accuracies,
mean_token_accuracy, step, epoch, learning_rate). Both trainers compute the same float32 math; they differ only
in summation order: attention over a prompt shared by two responses instead of two padded rows, the LM head on
the gathered response rows with a log-softmax instead of TRL's chunked online-logsumexp kernel. That is ~1e-7
relative per value, at most ~2e-6 after three steps here (observed over all the cases below: <= 1.6e-6
relative on every non-reward value, <= 1.7e-6 absolute on rewards). The rewards are beta * (policy - reference) differences of nearly equal sums,
hence the absolute bound.

The optimizer is TRL's default AdamW with ``adam_epsilon=1e-6`` instead of 1e-8. Some gradient directions are
exactly zero in exact arithmetic (the first response token is often the same for chosen and rejected, e.g. a
space: its log-prob enters both sides of the DPO margin and cancels), so both trainers see float32 rounding noise
there (~1e-10), and AdamW's m / (sqrt(v) + eps) turns noise of any size into a full learning-rate step whose sign
is the noise's. Two correct implementations then drift apart by ~lr along those directions (seen: 6e-4 on
log-probs after two steps, while loss and margins agree to 1e-7). eps=1e-6 leaves real gradients' steps as they
are and keeps noise at noise size.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import DPOConfig, DPOTrainer  # noqa: E402

from prefixshare import UnsupportedModelError, is_patched  # noqa: E402
from prefixshare.layout import LAYOUT_KEY  # noqa: E402
from prefixshare.data import load_toy_preferences, toy_tokenizer  # noqa: E402
from prefixshare.integrations.trl import (  # noqa: E402
    SUPPORTED_LOSS_TYPES,
    PrefixShareDPOCollator,
    PrefixShareDPOTrainer,
)
from prefixshare.testing import tiny_model, tiny_model_of  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
EXACT = {"num_tokens", "rewards/accuracies", "mean_token_accuracy", "step", "epoch", "learning_rate"}



def uneven(rows):
    """The rows with responses of unequal lengths (the toy data's chosen and rejected are equally long), so that
    the length normalizations (ipo, sigmoid_norm, sft), LD-DPO's split and WPO's per-response means all matter."""
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        if i % 3 == 0:
            row["rejected"] += " or so"
        elif i % 3 == 1:
            row["chosen"] += ", I think"
        out.append(row)
    return out


ROWS = uneven(load_toy_preferences()[:12])  # 3 steps of 4 pairs, one epoch
EVAL_ROWS = uneven(load_toy_preferences()[100:104])


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tokenizer()


def dataset(rows, tag):
    # The tag changes the dataset's fingerprint, so that TRL's precomputed reference log-probs (cached by
    # fingerprint) are computed by each trainer rather than reused from the other one's run.
    return datasets.Dataset.from_list(rows).add_column("run", [tag] * len(rows))


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=0,
        max_length=128,
        disable_tqdm=True,
        adam_epsilon=1e-6,
    )
    values.update(overrides)
    return DPOConfig(**values)


def model(tokenizer, model_type="llama", seed=0, **config):
    if model_type == "llama":
        return tiny_model("llama", vocab_size=len(tokenizer), seed=seed, **config).train()
    return tiny_model_of(model_type, vocab_size=len(tokenizer), seed=seed, **config).train()


def train(
    cls, tokenizer, tmp_path, *, reference="model", evaluate=False, trainer_kwargs=None, model_config=None, **overrides
):
    """Train 3 steps; return (per-step logs, eval metrics or None, trainer). ``model_config``: the policy's (and
    reference's) model type and config overrides (default: a tiny Llama)."""
    kwargs = dict(trainer_kwargs or {})
    model_config = dict(model_config or {})
    if reference == "model":
        kwargs["ref_model"] = model(tokenizer, **model_config).eval()
    elif reference == "lora":
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    if evaluate:
        kwargs["eval_dataset"] = dataset(EVAL_ROWS, cls.__name__)
    trainer = cls(
        model=model(tokenizer, **model_config),
        args=config(tmp_path / cls.__name__, **overrides),
        train_dataset=dataset(ROWS, cls.__name__),
        processing_class=tokenizer,
        **kwargs,
    )
    assert len(trainer.train_dataset) == len(ROWS)  # no prompt was long enough for TRL to drop it
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]
    return logs, (trainer.evaluate() if evaluate else None), trainer


WORST: dict[str, dict[str, float]] = {}  # case -> worst relative / absolute difference seen (see the docstring)
UNTIMED = ("runtime", "samples_per_second", "steps_per_second", "preparation_time")  # wall-clock entries of logs


@pytest.fixture(scope="module", autouse=True)
def report_differences():
    yield
    path = os.environ.get("PREFIXSHARE_TRL_DIFFS")
    if path and WORST:
        previous = json.load(open(path)) if os.path.exists(path) else {}
        with open(path, "w") as f:
            json.dump({**previous, **WORST}, f, indent=1, sort_keys=True)


def assert_same(ours: dict, theirs: dict, where: str, case: str | None = None):
    assert set(ours) == set(theirs), f"{where}: metric names differ: {sorted(set(ours) ^ set(theirs))}"
    worst = WORST.setdefault(case or where, {"rel": 0.0, "abs": 0.0})
    for key, want in theirs.items():
        got = ours[key]
        if any(word in key for word in UNTIMED):
            continue
        if key in EXACT or not isinstance(want, float):
            assert got == want, f"{where} {key}: {got} != {want}"
        else:
            assert math.isfinite(got) and got == pytest.approx(want, rel=RTOL, abs=ATOL), f"{where} {key}: {got} vs {want}"
            diff = abs(got - want)
            # the share of the tolerance used, and the plain differences (relative where the value is not ~0)
            if diff / (ATOL + RTOL * abs(want)) > worst.get("tolerance_used", 0.0):
                worst["tolerance_used"], worst["at"] = diff / (ATOL + RTOL * abs(want)), f"{where} {key}"
            worst["abs"] = max(worst["abs"], diff)
            if abs(want) >= 1e-2:
                worst["rel"] = max(worst["rel"], diff / abs(want))


def assert_logs_match(ours, theirs, case: str | None = None):
    assert len(ours) == len(theirs) == 3
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        assert_same(a, b, f"step {step}", case)
    assert any(abs(entry["rewards/margins"]) > 1e-3 for entry in theirs[1:])  # training moved the policy


# ---------------------------------------------------------------------------------------------- equality with TRL
def test_sigmoid_with_reference_model_matches_trl(tokenizer, tmp_path):
    theirs, their_eval, _ = train(DPOTrainer, tokenizer, tmp_path, evaluate=True)
    ours, our_eval, trainer = train(PrefixShareDPOTrainer, tokenizer, tmp_path, evaluate=True)
    assert_logs_match(ours, theirs, "sigmoid, reference model")
    for key in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second"):
        their_eval.pop(key), our_eval.pop(key)
    assert_same(our_eval, their_eval, "evaluate()")
    assert is_patched(trainer.model) and is_patched(trainer.ref_model)
    assert isinstance(trainer.data_collator, PrefixShareDPOCollator)

    # packing several pairs per row changes nothing but rounding
    packed, _, trainer = train(
        PrefixShareDPOTrainer, tokenizer, tmp_path, trainer_kwargs={"prefixshare_max_tokens_per_row": 200}
    )
    assert_logs_match(packed, theirs, "sigmoid, packed rows")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["input_ids"].shape[0] < 4  # the 4 pairs really shared rows


# Every loss_type alone (discopop with a non-default tau), then combinations with loss_weights and every option that
# changes the numbers. Label smoothing 0.1 where a loss reads it (robust, exo_pair, aot, aot_unpaired).
LOSS_CASES = {
    name: dict(loss_type=[name], **({"label_smoothing": 0.1} if name in ("robust", "exo_pair", "aot", "aot_unpaired") else {}))
    for name in SUPPORTED_LOSS_TYPES
}
LOSS_CASES["discopop"]["discopop_tau"] = 0.2
LOSS_CASES["ipo"]["beta"] = 0.5
ALL = list(SUPPORTED_LOSS_TYPES)
ON_MARGIN = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]  # TRL's f-DPO set
OPTION_CASES = {
    # RPO-like mix with label smoothing (the weighted combination of the previous suite)
    "robust+hinge+sft": dict(loss_type=["robust", "hinge", "sft"], loss_weights=[1.0, 0.5, 0.2], label_smoothing=0.1),
    # all fifteen at once, each with its own weight
    "all loss types weighted": dict(
        loss_type=ALL, loss_weights=[0.1 * (i + 1) for i in range(len(ALL))], label_smoothing=0.1, discopop_tau=0.3
    ),
    "forward_kl": dict(loss_type=ON_MARGIN, f_divergence_type="forward_kl", label_smoothing=0.1),
    "js_divergence": dict(loss_type=ON_MARGIN, f_divergence_type="js_divergence", label_smoothing=0.1),
    "alpha_divergence 0.3": dict(
        loss_type=ON_MARGIN, loss_weights=[1.0, 0.5, 0.2, 0.3, 1.0, 1.0, 0.7, 0.1],
        f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3, label_smoothing=0.1,
    ),
    # WPO: with every loss TRL weighs (not aot, refused by TRL; not sft and hinge, on which TRL fails)
    "use_weighting": dict(
        loss_type=[t for t in ALL if t not in ("aot", "aot_unpaired", "sft", "hinge")], use_weighting=True,
        label_smoothing=0.1,
    ),
    "use_weighting sigmoid": dict(use_weighting=True),
    # LD-DPO: every loss on the split log-probs (sft on the plain ones, as in TRL)
    "ld_alpha 0.3": dict(loss_type=ALL, ld_alpha=0.3, label_smoothing=0.1),
    "ld_alpha 0 + WPO + js": dict(
        loss_type=["sigmoid", "ipo"], ld_alpha=0.0, use_weighting=True, f_divergence_type="js_divergence"
    ),
    # TR-DPO: the reference mixed into the policy every step
    "sync_ref_model": dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.6),
    # MoE coefficient on a dense model: 0.0 is accepted by TRL (and here) and changes nothing
    "router_aux_loss_coef 0": dict(router_aux_loss_coef=0.0),
    # rows padded to a multiple, completions truncated (keep_start), the deprecated pad_token (EOS as padding)
    "pad_to_multiple_of, max_length, pad_token": dict(pad_to_multiple_of=16, max_length=84, pad_token="<eos>"),
    # keep_end (deprecated in TRL): each sequence keeps its last tokens; pairs cut at different prompt tokens get
    # a unit per response; at 20 tokens some sequences keep no prompt token at all
    "truncation_mode keep_end 60": dict(truncation_mode="keep_end", max_length=60),
    "truncation_mode keep_end 20": dict(truncation_mode="keep_end", max_length=20),
}


@pytest.mark.parametrize("case", list(LOSS_CASES) + list(OPTION_CASES))
def test_every_loss_type_and_option_matches_trl(tokenizer, tmp_path, case):
    """Three steps with TRL's DPOTrainer and ours, every logged value equal within 1e-4 relative / 1e-5 absolute.

    Fails on the main this started from: every case but sigmoid/hinge/ipo/robust/sft raised ValueError in __init__
    ("does not support loss_type ..." / f_divergence_type / use_weighting / ld_alpha).
    """
    options = {**LOSS_CASES, **OPTION_CASES}[case]
    theirs, _, _ = train(DPOTrainer, tokenizer, tmp_path, **options)
    ours, _, _ = train(PrefixShareDPOTrainer, tokenizer, tmp_path, **options)
    assert_logs_match(ours, theirs, case)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_moe_router_aux_loss_matches_trl(tokenizer, tmp_path, model_type, packed):
    """A Mixture-of-Experts policy with its load-balancing loss (router_aux_loss_coef != 0): the logged aux_loss
    and the loss are trl.DPOTrainer's, step by step. TRL's paired forward routes each prompt twice; the drop-in
    routes it once and counts it once per response (a prompt token is routed identically in both rows).

    Fails on the main this started from: NotImplementedError in __init__ (the router loss was not wired).
    """
    options = dict(router_aux_loss_coef=0.5, model_config=dict(model_type=model_type))
    theirs, _, _ = train(DPOTrainer, tokenizer, tmp_path, **options)
    kwargs = {"prefixshare_max_tokens_per_row": 200} if packed else {}
    ours, _, trainer = train(PrefixShareDPOTrainer, tokenizer, tmp_path, trainer_kwargs=kwargs, **options)
    assert trainer.aux_loss_enabled
    assert all(entry["aux_loss"] > 0 for entry in theirs)
    assert_logs_match(ours, theirs, f"{model_type} router_aux_loss_coef 0.5{', packed' if packed else ''}")
    if packed:
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        assert batch["input_ids"].shape[0] < 4


def test_keep_end_packed_matches_trl_and_shares_what_it_can(tokenizer, tmp_path):
    """truncation_mode="keep_end" with packed rows: TRL's numbers; pairs cut at the same prompt token still share it.

    Fails on the main this started from: ValueError "does not support truncation_mode='keep_end'".
    """
    options = dict(truncation_mode="keep_end", max_length=66)
    theirs, _, _ = train(DPOTrainer, tokenizer, tmp_path, **options)
    ours, _, trainer = train(
        PrefixShareDPOTrainer, tokenizer, tmp_path, trainer_kwargs={"prefixshare_max_tokens_per_row": 160}, **options
    )
    assert_logs_match(ours, theirs, "truncation_mode keep_end 66, packed")
    layout = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])[LAYOUT_KEY]
    shared = [p for p in layout.placements if len(p.unit.response_slots) == 2]
    alone = [p for p in layout.placements if len(p.unit.response_slots) == 1]
    assert shared and alone  # pairs within max_length (or cut alike) share their prompt; the others cannot


def test_unknown_truncation_mode_is_refused_with_trl_wording():
    with pytest.raises(ValueError, match="Unsupported truncation mode: left, expected 'keep_start' or 'keep_end'"):
        PrefixShareDPOCollator(0, max_length=8, truncation_mode="left")


def test_padding_free_packs_each_batch_into_one_row(tokenizer, tmp_path):
    """padding_free=True: TRL 1.16 pads anyway (it warns); here each batch is one row without padding, same numbers.

    Fails on main: padding_free=True raised ValueError.
    """
    theirs, _, _ = train(DPOTrainer, tokenizer, tmp_path, padding_free=True)
    ours, _, trainer = train(PrefixShareDPOTrainer, tokenizer, tmp_path, padding_free=True)
    assert_logs_match(ours, theirs, "padding_free")
    assert trainer.padding_free and trainer.args.padding_free
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 1 and batch[LAYOUT_KEY].num_tokens == batch["input_ids"].numel()


def test_lora_with_disabled_adapters_matches_trl(tokenizer, tmp_path):
    pytest.importorskip("peft")
    theirs, _, _ = train(DPOTrainer, tokenizer, tmp_path, reference="lora", learning_rate=1e-2)
    ours, _, trainer = train(PrefixShareDPOTrainer, tokenizer, tmp_path, reference="lora", learning_rate=1e-2)
    assert trainer.ref_model is None
    assert_logs_match(ours, theirs, "LoRA, adapters disabled as reference")


@pytest.mark.parametrize("ld_alpha", [None, 0.5])
def test_precomputed_reference_matches_trl(tokenizer, tmp_path, monkeypatch, ld_alpha):
    """With ld_alpha, the precomputed reference log-probs are LD-DPO's too (per-token, split at the shorter
    response); fails on main (ld_alpha raised ValueError)."""
    calls = []
    original = PrefixShareDPOTrainer.compute_ref_log_probs

    def spy(self, model, inputs):
        calls.append(inputs["input_ids"].shape)
        return original(self, model, inputs)

    monkeypatch.setattr(PrefixShareDPOTrainer, "compute_ref_log_probs", spy)
    options = dict(reference=None, precompute_ref_log_probs=True, ld_alpha=ld_alpha, precompute_ref_batch_size=3)
    theirs, _, their_trainer = train(DPOTrainer, tokenizer, tmp_path, **options)
    ours, _, trainer = train(PrefixShareDPOTrainer, tokenizer, tmp_path, **options)
    assert calls, "the reference log-probs were not computed by PrefixShareDPOTrainer"
    assert trainer.ref_model is None
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        assert trainer.train_dataset[key] == pytest.approx(their_trainer.train_dataset[key], rel=1e-5)
    assert_logs_match(ours, theirs, f"precompute_ref_log_probs, ld_alpha={ld_alpha}")


def test_streaming_eval_set_matches_trl_and_map_style(tokenizer, tmp_path):
    """evaluate() on a datasets.IterableDataset gives the numbers of TRL and of the map-style set.

    Accelerate dispatches batches of iterable datasets (collate on the main process, concatenate, slice rows), which a
    prefix-shared batch does not survive; on main this raised "RuntimeError: zero-dimensional tensor ... cannot be
    concatenated". 6 pairs with batches of 4: a full and a partial batch; with packing too. The reference model has
    other weights than the policy, so that rewards are not all zero without training.
    """
    rows = uneven(load_toy_preferences()[100:106])
    results = {}
    for cls, kwargs in (
        (DPOTrainer, {}),
        (PrefixShareDPOTrainer, {}),
        (PrefixShareDPOTrainer, {"prefixshare_max_tokens_per_row": 200}),
    ):
        trainer = cls(
            model=model(tokenizer),
            ref_model=tiny_model("llama", vocab_size=len(tokenizer), seed=1),
            args=config(tmp_path / cls.__name__),
            train_dataset=dataset(ROWS, "x"),
            processing_class=tokenizer,
            **kwargs,
        )
        for streaming in (False, True):
            data = dataset(rows, f"{cls.__name__}{kwargs}{streaming}")
            result = trainer.evaluate(data.to_iterable_dataset() if streaming else data)
            for key in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second"):
                result.pop(key)
            results[cls.__name__, bool(kwargs), streaming] = result
    assert abs(results["DPOTrainer", False, False]["eval_rewards/margins"]) > 1e-3
    for streaming in (False, True):
        theirs = results["DPOTrainer", False, streaming]
        for packed in (False, True):
            assert_same(results["PrefixShareDPOTrainer", packed, streaming], theirs, f"{streaming=}, {packed=}")

    # Streaming and map-style agree too, but for eval_loss: transformers' evaluation loop weights each batch's loss
    # by the nominal batch size and accelerate trims the last, partial batch to its real size only when the dataset
    # has a length. So a streaming eval_loss is the mean over batches, a map-style one the mean over pairs; TRL's
    # numbers differ the same way (compared above), the other metrics are means over batches in both.
    def without_loss(result):
        return {key: value for key, value in result.items() if key != "eval_loss"}

    theirs, ours = results["DPOTrainer", False, False], results["PrefixShareDPOTrainer", False, True]
    assert_same(without_loss(ours), without_loss(theirs), "streaming vs map-style")


def poisoned_model(tokenizer):
    """A policy whose logit of the EOS token (the last token of every completion, TRL appends it) is nan."""
    m = model(tokenizer)
    with torch.no_grad():
        m.lm_head.weight[tokenizer.eos_token_id] = float("nan")
    return m


def assert_same_allowing_nan(ours: dict, theirs: dict, where: str):
    """assert_same, except that a value may be nan provided it is nan in both."""
    nan = {key for key, value in theirs.items() if isinstance(value, float) and math.isnan(value)}
    ours_nan = {key for key, value in ours.items() if isinstance(value, float) and math.isnan(value)}
    assert ours_nan == nan, f"{where}: nan in {sorted(ours_nan)}, TRL: nan in {sorted(nan)}"
    finite_ours, finite_theirs = ({k: v for k, v in d.items() if k not in nan} for d in (ours, theirs))
    assert_same(finite_ours, finite_theirs, where)
    return nan


def test_nonfinite_logps_log_nan_as_trl(tokenizer, tmp_path):
    """nan log-probs: both trainers train on, and log nan for the same metrics and equal values for the others.

    On main PrefixShareDPOTrainer raised "ValueError: dpo loss: policy_chosen_logps has 4 non-finite entries" from
    its loss; and it counted a nan target logit as a top-1 hit (mean_token_accuracy 0.10 at step 1 here, TRL: 0.0).
    """
    logs, evals = {}, {}
    for cls in (DPOTrainer, PrefixShareDPOTrainer):
        trainer = cls(
            model=poisoned_model(tokenizer),
            ref_model=tiny_model("llama", vocab_size=len(tokenizer)),
            args=config(tmp_path / cls.__name__, max_steps=2),
            train_dataset=dataset(ROWS, cls.__name__),
            processing_class=tokenizer,
        )
        trainer.train()
        logs[cls] = [entry for entry in trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]
        evals[cls] = trainer.evaluate(dataset(EVAL_ROWS, cls.__name__))
        for key in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second"):
            evals[cls].pop(key)
    assert len(logs[DPOTrainer]) == len(logs[PrefixShareDPOTrainer]) == 2
    for step, (ours, theirs) in enumerate(zip(logs[PrefixShareDPOTrainer], logs[DPOTrainer]), 1):
        nan = assert_same_allowing_nan(ours, theirs, f"step {step}")
        assert {"logps/chosen", "logps/rejected", "rewards/margins", "grad_norm"} <= nan
    nan = assert_same_allowing_nan(evals[PrefixShareDPOTrainer], evals[DPOTrainer], "evaluate()")
    assert {"eval_loss", "eval_logps/chosen", "eval_rewards/margins"} <= nan


def test_stop_on_nonfinite_raises(tokenizer, tmp_path):
    """prefixshare_stop_on_nonfinite=True: a clear FloatingPointError at the first step, in train() and evaluate().

    Fails on main: the keyword did not exist (TypeError from DPOTrainer.__init__).
    """
    def trainer(**overrides):
        return PrefixShareDPOTrainer(
            model=poisoned_model(tokenizer),
            ref_model=tiny_model("llama", vocab_size=len(tokenizer)),
            args=config(tmp_path, **overrides),
            train_dataset=dataset(ROWS, "x"),
            processing_class=tokenizer,
            prefixshare_stop_on_nonfinite=True,
        )

    message = (
        r"PrefixShareDPOTrainer: non-finite \(nan or inf\) log-probs in {mode} after 0 optimizer steps: "
        r"policy chosen 4/4, "
        r"policy rejected 4/4 pairs\. .*prefixshare_stop_on_nonfinite=True"
    )
    with pytest.raises(FloatingPointError, match=message.format(mode="train")):
        trainer().train()
    with pytest.raises(FloatingPointError, match=message.format(mode="eval")):
        trainer().evaluate(dataset(EVAL_ROWS, "x"))
    with pytest.raises(ValueError, match="prefixshare_stop_on_nonfinite must be True or False"):
        PrefixShareDPOTrainer(
            model=model(tokenizer), args=config(tmp_path), train_dataset=dataset(ROWS, "x"),
            processing_class=tokenizer, prefixshare_stop_on_nonfinite="yes",
        )


def test_compute_metrics_gets_the_eval_prediction_of_trl(tokenizer, tmp_path):
    """compute_metrics (deprecated in TRL, with the same FutureWarning): the same EvalPrediction as trl.DPOTrainer,
    the logits of TRL's paired rows ([2B, L, V], from an extra forward) and those rows as label_ids; evaluate() and
    its metrics equal. 6 pairs in batches of 4: the trimming of the last batch is the Trainer's, the same.

    Fails on main: compute_metrics raised ValueError in __init__.
    """
    seen, results = {}, {}
    for cls in (DPOTrainer, PrefixShareDPOTrainer):

        def compute_metrics(prediction, name=cls.__name__):
            seen[name] = prediction
            return {"mean_logit": float(prediction.predictions.mean())}

        trainer = cls(
            model=model(tokenizer),
            ref_model=tiny_model("llama", vocab_size=len(tokenizer), seed=1),
            args=config(tmp_path / cls.__name__, max_length=82),  # also: truncated pairs, laid out as TRL's collator
            train_dataset=dataset(ROWS, "x"),
            eval_dataset=dataset(uneven(load_toy_preferences()[100:106]), cls.__name__),
            processing_class=tokenizer,
            compute_metrics=compute_metrics,
        )
        with pytest.warns(FutureWarning, match="return_outputs=True"):
            results[cls] = {k: v for k, v in trainer.evaluate().items() if not any(w in k for w in UNTIMED)}
    ours, theirs = seen["PrefixShareDPOTrainer"], seen["DPOTrainer"]
    assert ours.predictions.shape == theirs.predictions.shape and ours.predictions.shape[-1] == len(tokenizer)
    assert (ours.label_ids == theirs.label_ids).all()
    torch.testing.assert_close(torch.as_tensor(ours.predictions), torch.as_tensor(theirs.predictions), rtol=RTOL, atol=ATOL)
    assert_same(results[PrefixShareDPOTrainer], results[DPOTrainer], "evaluate() with compute_metrics")


def test_model_given_by_name_with_model_init_kwargs_matches_trl(tokenizer, tmp_path):
    """model="path", DPOConfig(model_init_kwargs=...): TRL loads the policy and its reference copy; both are patched
    on their first prefix-shared forward. The saved model is in float32 and the kwargs ask for bfloat16, so a
    kwargs-ignoring load would differ from TRL's."""
    path = tmp_path / "tiny-llama"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    init = {"dtype": "bfloat16", "attn_implementation": "eager"}
    logs = {}
    for cls in (DPOTrainer, PrefixShareDPOTrainer):
        trainer = cls(
            model=str(path), args=config(tmp_path / cls.__name__, model_init_kwargs=init), train_dataset=dataset(ROWS, "x")
        )
        trainer.train()
        assert trainer.model.dtype == torch.bfloat16 and trainer.ref_model.dtype == torch.bfloat16
        logs[cls] = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    assert is_patched(trainer.model) and is_patched(trainer.ref_model)
    # bfloat16 weights with float32 log-probs: the rounding of bfloat16 matmuls, so a looser bound than float32's
    for step, (a, b) in enumerate(zip(logs[PrefixShareDPOTrainer], logs[DPOTrainer]), 1):
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=2e-2, abs=2e-2), (step, key, a[key], b[key])
        assert a["num_tokens"] == b["num_tokens"]


# TRL's default precision (bf16=True: accelerate runs float32 weights under bfloat16 autocast), float16 weights as
# TRL's own test_train_model_dtype loads them, and the reference precomputed under no_grad by a model TRL loads
# (its first forward, hence the patch and its self-check, under torch.no_grad()). Each failed before the self-check
# followed the forward's precision and grad mode, and the engine ran its LM head under the forward's autocast:
# SelfCheckError (bf16), "expected m1 and m2 to have the same dtype" (float16), "element 0 of tensors does not
# require grad" (precompute).
PRECISION_CASES = {
    "bf16=True float32 weights": dict(args=dict(bf16=True)),
    "bf16=True float16 weights": dict(args=dict(bf16=True, model_init_kwargs={"dtype": "float16"})),
    "precompute_ref_log_probs": dict(args=dict(precompute_ref_log_probs=True, model_init_kwargs={"dtype": "float32"})),
    "bf16=True precompute_ref_log_probs": dict(args=dict(bf16=True, precompute_ref_log_probs=True)),
}


@pytest.mark.parametrize("case", list(PRECISION_CASES))
def test_trl_default_precision_and_no_grad_reference_match_trl(tokenizer, tmp_path, case):
    path = tmp_path / "tiny-llama"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    options = PRECISION_CASES[case]["args"]
    logs = {}
    for cls in (DPOTrainer, PrefixShareDPOTrainer):
        trainer = cls(
            model=str(path), args=config(tmp_path / cls.__name__, **options), train_dataset=dataset(ROWS, cls.__name__)
        )
        trainer.train()
        logs[cls] = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    assert is_patched(trainer.model)
    assert len(logs[DPOTrainer]) == len(logs[PrefixShareDPOTrainer]) == 3
    # float32: the bounds of every other comparison here; bfloat16 autocast or float16 weights: their rounding
    # (bfloat16's epsilon is 3.9e-3), as for the bfloat16 weights above
    low = options.get("bf16") or "dtype" in options.get("model_init_kwargs", {}) and options["model_init_kwargs"]["dtype"] != "float32"
    rel, abs_ = (2e-2, 2e-2) if low else (RTOL, ATOL)
    # float16 weights: AdamW's updates land on float16's grid (a step of lr 1e-3 is the size of a weight's rounding),
    # so a rounding difference in step 2 moves weights by whole grid steps and step 3 drifts in both directions
    # (seen: margins 0.417 vs 0.471 while steps 1 and 2 agree to 5e-4, step 1's grad_norm exactly): steps 1-2 only
    steps = 2 if options.get("model_init_kwargs", {}).get("dtype") == "float16" else 3
    for step, (a, b) in enumerate(zip(logs[PrefixShareDPOTrainer][:steps], logs[DPOTrainer][:steps]), 1):
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "entropy"):
            assert math.isfinite(a[key]) and a[key] == pytest.approx(b[key], rel=rel, abs=abs_), (step, key, a[key], b[key])
        assert a["num_tokens"] == b["num_tokens"]


# A template that renders tools, tool calls and an optional kwarg, in the toy tokenizer's characters
TOOL_TEMPLATE = (
    "{{ bos_token }}{% if style %}[{{ style }}]{% endif %}"
    "{% if tools %}<tools>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}[{{ c['function']['name'] }}({{ c['function']['arguments'] }})]"
    "{% endfor %}{% endif %}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
TOOLS = json.dumps([{"type": "function", "function": {"name": "add", "description": "adds", "parameters": {}}}])


def conversational_rows(rows):
    """The toy rows as conversations: a tool call and its result in every other prompt, tools and a template
    kwarg per row (TRL's tools / chat_template_kwargs columns)."""
    out = []
    for i, row in enumerate(rows):
        prompt = [{"role": "user", "content": row["prompt"], "tool_calls": None}]
        if i % 2:
            call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
            prompt += [
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "2", "tool_calls": None},
            ]
        out.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": row["chosen"], "tool_calls": None}],
                "rejected": [{"role": "assistant", "content": row["rejected"], "tool_calls": None}],
                "tools": TOOLS if i % 3 else None,
                "chat_template_kwargs": {"style": "terse" if i % 2 else ""},
            }
        )
    return out


def test_conversational_tool_call_data_with_chat_template_kwargs_matches_trl(tmp_path):
    """Conversations with tool calls, a tools column and chat_template_kwargs: TRL's own tokenization runs, the
    numbers are equal, and the tools, calls and kwargs really reached the prompts."""
    from prefixshare.data import toy_tokenizer

    tokenizer = toy_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    rows = conversational_rows(ROWS)
    logs, trainers = {}, {}
    for cls in (DPOTrainer, PrefixShareDPOTrainer):
        trainer = trainers[cls] = cls(
            model=model(tokenizer), ref_model=tiny_model("llama", vocab_size=len(tokenizer)),
            args=config(tmp_path / cls.__name__, max_length=256),
            train_dataset=datasets.Dataset.from_list(rows).add_column("run", [cls.__name__] * len(rows)),
            processing_class=tokenizer,
        )
        trainer.train()
        logs[cls] = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    prompt = tokenizer.decode(trainers[PrefixShareDPOTrainer].train_dataset[1]["prompt_ids"])
    assert "[terse]<tools>add;" in prompt and "[add(" in prompt and "<tool>2" in prompt
    assert trainers[PrefixShareDPOTrainer].train_dataset[1]["prompt_ids"] == trainers[DPOTrainer].train_dataset[1]["prompt_ids"]
    assert_logs_match(logs[PrefixShareDPOTrainer], logs[DPOTrainer], "conversational, tool calls, chat_template_kwargs")


# ---------------------------------------------------------------------------------------------- what raises
UNSUPPORTED = [
    (dict(loss_type=["robust"], label_smoothing=0.5), "label_smoothing"),
    (dict(loss_type=["exo_pair"], label_smoothing=1.0), "label_smoothing"),
    (dict(loss_type=["aot"], label_smoothing=1.5), "label_smoothing"),
    (dict(loss_type=["sigmoid", "sft"], use_weighting=True), "use_weighting"),
    (dict(loss_type=["hinge"], use_weighting=True), "use_weighting"),
    (dict(use_liger_kernel=True), "use_liger_kernel"),
    (dict(accelerator_config={"dispatch_batches": True}), "dispatch_batches"),
    (dict(torch_compile=True), "torch_compile"),
    (dict(include_for_metrics=["inputs"]), "include_for_metrics"),
    (dict(loss_type=["kto"]), r"Unknown loss type: kto\. Should be one of \['sigmoid'"),
]


@pytest.mark.parametrize("overrides, match", UNSUPPORTED, ids=[m[:20] + str(i) for i, (_, m) in enumerate(UNSUPPORTED)])
def test_unsupported_options_raise(tokenizer, tmp_path, overrides, match):
    with pytest.warns(FutureWarning) if "truncation_mode" in overrides else contextlib.nullcontext():
        args = config(tmp_path, **overrides)
    with pytest.raises(ValueError, match=match):
        PrefixShareDPOTrainer(model=model(tokenizer), args=args, train_dataset=dataset(ROWS, "x"), processing_class=tokenizer)


def test_use_weighting_with_sft_or_hinge_fails_in_trl_too(tokenizer, tmp_path):
    """The refusal above is not a gap: trl.DPOTrainer 1.16 crashes at the first step on these combinations."""
    for loss_type in (["sigmoid", "sft"], ["hinge"]):
        with pytest.raises(RuntimeError):
            train(DPOTrainer, tokenizer, tmp_path, loss_type=loss_type, use_weighting=True)


# What DPOTrainer.__init__ refuses itself reaches the user with TRL's own wording (and type).
TRL_REFUSES = [
    dict(loss_type=["exo_pair"]),  # label_smoothing 0
    dict(loss_type=["nca_pair"], f_divergence_type="forward_kl"),
    dict(loss_type=["aot"], use_weighting=True),
    dict(router_aux_loss_coef=0.01),  # on a dense model
    dict(sync_ref_model=True, precompute_ref_log_probs=True),
]


@pytest.mark.parametrize("overrides", TRL_REFUSES, ids=[str(sorted(o)) for o in TRL_REFUSES])
def test_what_trl_refuses_is_refused_with_trl_wording(tokenizer, tmp_path, overrides):
    errors = {}
    for cls in (DPOTrainer, PrefixShareDPOTrainer):
        with pytest.raises((ValueError, NotImplementedError)) as info:
            cls(model=model(tokenizer), ref_model=tiny_model("llama", vocab_size=len(tokenizer)), args=config(tmp_path, **overrides),
                train_dataset=dataset(ROWS, "x"), processing_class=tokenizer)
        errors[cls] = (type(info.value), str(info.value))
    assert errors[PrefixShareDPOTrainer] == errors[DPOTrainer]


def test_unsupported_trainer_arguments_raise(tokenizer, tmp_path):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    common = dict(args=config(tmp_path), processing_class=tokenizer)
    rows = dataset(ROWS, "x")
    with pytest.raises(ValueError, match="collator"):
        PrefixShareDPOTrainer(
            model(tokenizer), train_dataset=rows, data_collator=DataCollatorForPreference(pad_token_id=0), **common
        )
    # vision data with a text model: TRL's own error, word for word
    images = rows.add_column("images", [[]] * len(ROWS))
    with pytest.raises(ValueError) as theirs:
        DPOTrainer(model(tokenizer), train_dataset=images, **common)
    with pytest.raises(ValueError) as ours:
        PrefixShareDPOTrainer(model(tokenizer), train_dataset=images, **common)
    assert str(ours.value) == str(theirs.value) and "vision-related" in str(ours.value)
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="prompt-learning"):
        PrefixShareDPOTrainer(
            model(tokenizer),
            train_dataset=rows,
            peft_config=peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
            **common,
        )


def test_unsupported_architecture_raises(tokenizer, tmp_path):
    # Bloom computes attention itself (ALiBi), outside transformers' AttentionInterface (GPT-2 was refused here
    # before #14, by name; it is supported now)
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=len(tokenizer)))
    if getattr(bloom, "_supports_attention_backend", False):
        pytest.skip("Bloom routes attention through the attention interface in this transformers")
    with pytest.raises(UnsupportedModelError, match="AttentionInterface"):
        PrefixShareDPOTrainer(
            bloom, args=config(tmp_path), train_dataset=dataset(ROWS, "x"), processing_class=tokenizer,
            ref_model=BloomForCausalLM(bloom.config),
        )


@pytest.mark.parametrize("case", ["ref_model is model", "router_aux_loss_coef, dense model"])
def test_trl_validation_comes_before_patching(case, tokenizer, tmp_path):
    """Issue #21 (item 3): DPOTrainer's own errors, word for word, come first, as with plain TRL: the drop-in patches
    its models once DPOTrainer.__init__ has run. Bloom, which patch refuses, makes the order visible: before
    (de1f78d) the drop-in patched first and raised UnsupportedModelError instead. One of TRL's checks runs before
    Trainer.__init__ (the same object as model and reference), one after it (router_aux_loss_coef on a model
    without a router)."""
    from transformers import BloomConfig, BloomForCausalLM

    def bloom():
        return BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=len(tokenizer)))

    outcomes = {}
    for cls in (DPOTrainer, PrefixShareDPOTrainer):
        policy = bloom()
        if getattr(policy, "_supports_attention_backend", False):
            pytest.skip("Bloom routes attention through the attention interface in this transformers")
        options = {"router_aux_loss_coef": 0.5} if "router" in case else {}
        with pytest.raises(ValueError) as raised:
            cls(policy, ref_model=policy if case == "ref_model is model" else bloom(),
                args=config(tmp_path / cls.__name__, **options), train_dataset=dataset(ROWS, "x"),
                processing_class=tokenizer)  # fmt: skip
        outcomes[cls] = raised.value
    ours, theirs = outcomes[PrefixShareDPOTrainer], outcomes[DPOTrainer]
    assert type(ours) is type(theirs) and str(ours) == str(theirs)
    assert ("cannot be the same object" if case == "ref_model is model" else "not a Mixture-of-Experts") in str(ours)


def test_collated_batch_survives_accelerate_dispatching():
    """The collator's batches come unchanged through accelerate's single-process DataLoaderDispatcher (what an
    IterableDataset gets by default: concatenate the batches, slice rows), with packing.

    The trainer turns dispatching off; this covers the collator in a loop of one's own. On main the 0-d
    prefixshare_paired_tokens made it raise "RuntimeError: zero-dimensional tensor ... cannot be concatenated".
    """
    from accelerate.data_loader import DataLoaderDispatcher, prepare_data_loader
    from torch.utils.data import DataLoader, IterableDataset

    from prefixshare.integrations.trl import PAIRED_TOKENS_KEY

    examples = [
        {"prompt_ids": list(range(3, 3 + p)), "chosen_ids": [7] * c, "rejected_ids": [9] * r}
        for p, c, r in [(5, 3, 2), (2, 4, 4), (6, 1, 3), (3, 2, 5), (4, 4, 1), (2, 1, 1)]
    ]

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(examples)

    collator = PrefixShareDPOCollator(pad_token_id=0, max_tokens_per_row=24)
    plain = list(DataLoader(Stream(), batch_size=4, collate_fn=collator))
    loader = prepare_data_loader(
        DataLoader(Stream(), batch_size=4, collate_fn=collator), device=torch.device("cpu"), put_on_device=True
    )
    assert isinstance(loader, DataLoaderDispatcher)
    dispatched = list(loader)
    assert len(dispatched) == len(plain) == 2
    assert plain[0]["input_ids"].shape[0] < 4  # packed
    for got, want in zip(dispatched, plain):
        assert set(got) == set(want)
        for key in ("input_ids", "position_ids", PAIRED_TOKENS_KEY):
            assert torch.equal(got[key], want[key]), key
        assert got[PAIRED_TOKENS_KEY].shape == got["input_ids"].shape[:1]
        for field in ("unit_ids", "target_index", "predictor_index", "response_index", "response_lengths"):
            assert torch.equal(getattr(got[LAYOUT_KEY], field), getattr(want[LAYOUT_KEY], field)), field
    # TRL's paired-format token count: the prompt counted once per response
    assert sum(int(b[PAIRED_TOKENS_KEY].sum()) for b in plain) == sum(
        2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples
    )


def test_collator_rejects_prompts_that_fill_max_length():
    collator = PrefixShareDPOCollator(pad_token_id=0, max_length=4)
    with pytest.raises(ValueError, match="no response token would remain"):
        collator([{"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9], "rejected_ids": [10]}])


@pytest.mark.parametrize("K", [1, 3])
def test_collator_refuses_other_than_two_responses(K):
    """Before: K=3 collated and the loss silently read only the first two responses (K=1: an IndexError)."""
    collator = PrefixShareDPOCollator(pad_token_id=0)
    example = {"prompt_input_ids": [5, 6], "responses_input_ids": [[7 + k] for k in range(K)]}
    with pytest.raises(ValueError, match=f"pairs.*{K} responses"):
        collator([example])
