"""PrefixShareGRPOTrainer / PrefixShareRLOOTrainer against TRL's own GRPOTrainer / RLOOTrainer.

Each comparison trains a tiny Llama (prefixshare.testing, float32, CPU) for 3 optimizer steps with both trainers
from the same seed: generation (transformers' generate, sampling) is TRL's in both, so the completions are the
same (checked: the reward function records them), and every logged value (loss, grad_norm, rewards, kl,
entropy, clip ratios, completion lengths, ...) must agree within 1e-4 relative. Values that are zero in exact
arithmetic (the first step's on-policy GRPO loss, a KL of identical models) are float32 noise (~1e-8) on both
sides, so an absolute 1e-6 applies as well. These tests fail on the main this branch started from: the
trainers did not exist there.

The optimizer is plain SGD with a large learning rate (0.1): the policy moves enough in three steps that
ratios get clipped and the KL is far from zero, so the losses' clipping branches are exercised. Not AdamW:
it divides each gradient coordinate by its own running magnitude, so float32 rounding noise in directions whose
gradient is nearly zero becomes a full learning-rate step, and two correct implementations drift apart by far
more than their log-probs differ (seen with AdamW at lr 1e-2: 1e-4 relative on the step-3 loss, and the same
spread between two packings of prefixshare's own run; with SGD both stay at ~1e-7).
"""

from __future__ import annotations

import math

import pytest

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

from prefixshare import is_patched  # noqa: E402
from prefixshare.data import load_toy_preferences, toy_tokenizer  # noqa: E402
from prefixshare.integrations.trl import PrefixShareGRPOTrainer, PrefixShareRLOOTrainer  # noqa: E402
from prefixshare.testing import tiny_model, tiny_model_of  # noqa: E402

RTOL, ATOL = 1e-4, 1e-6
TIMING = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")
PROMPTS = [{"prompt": row["prompt"][-48:]} for row in load_toy_preferences()[:12]]
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo")

WORST: dict[str, float] = {}  # the worst relative difference seen per metric


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    yield
    for key, value in sorted(WORST.items(), key=lambda kv: -kv[1])[:6]:  # shown with pytest -s
        print(f"\nworst relative difference of {key} over the comparisons run: {value:.2e}", end="")


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    # GRPO/RLOO load their reference model (beta != 0, no PEFT) from the policy's name or path
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(path)
    return str(path)


class Recorder:
    """A reward (the number of distinct characters) that records every completion it scores."""

    __name__ = "distinct"

    def __init__(self):
        self.completions = []

    def __call__(self, completions, **kwargs):
        self.completions.append(list(completions))
        return [float(len(set(c))) for c in completions]


def train(cls, tokenizer, model_dir, tmp_path, *, lora=False, trainer_kwargs=None, model_config=None, **overrides):
    is_grpo = issubclass(cls, GRPOTrainer)
    values = dict(
        output_dir=str(tmp_path / cls.__name__),
        max_steps=3,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        optim="sgd",
        learning_rate=0.1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    if lora:
        values["learning_rate"] = 1.0  # LoRA's zero-initialized B and few parameters move slowly under SGD
    values.update(overrides)
    config = (GRPOConfig if is_grpo else RLOOConfig)(**values)
    model_config = dict(model_config or {})
    model_type = model_config.pop("model_type", "llama")
    if model_type == "llama":
        model = tiny_model("llama", vocab_size=len(tokenizer), **model_config)
    else:  # no reference model is loaded from model_dir: beta must be 0
        assert not values.get("beta"), "model_dir holds a Llama"
        model = tiny_model_of(model_type, vocab_size=len(tokenizer), **model_config)
    model.config._name_or_path = model_dir  # the same weights: where the trainer loads its reference from
    # A few common characters end a completion too, so that completions have different lengths, some end before
    # max_completion_length and some are truncated (mask_truncated_completions masks those)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id] + tokenizer.convert_tokens_to_ids(list(" eaot"))
    kwargs = dict(trainer_kwargs or {})
    if lora:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    reward = Recorder()
    trainer = cls(
        model=model.train(),
        reward_funcs=reward,
        args=config,
        train_dataset=datasets.Dataset.from_list(PROMPTS),
        processing_class=tokenizer,
        **kwargs,
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    return logs, reward.completions, trainer


def assert_same(ours, theirs):
    assert len(ours) == len(theirs) == 3
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        assert set(a) == set(b), f"step {step}: metric names differ: {sorted(set(a) ^ set(b))}"
        for key, want in b.items():
            if key in TIMING:
                continue
            got = a[key]
            if isinstance(want, float):
                assert math.isfinite(got) and got == pytest.approx(want, rel=RTOL, abs=ATOL), f"step {step} {key}: {got} vs {want}"
                if abs(want) > 1e-4:
                    WORST[key] = max(WORST.get(key, 0.0), abs(got - want) / abs(want))
            else:
                assert got == want, f"step {step} {key}: {got} != {want}"


def compare(base, ours, tokenizer, model_dir, tmp_path, trainer_kwargs=None, **options):
    theirs, their_completions, _ = train(base, tokenizer, model_dir, tmp_path, **options)
    mine, my_completions, trainer = train(ours, tokenizer, model_dir, tmp_path, trainer_kwargs=trainer_kwargs, **options)
    assert my_completions == their_completions  # same seed, same generation: same completions
    assert_same(mine, theirs)
    assert is_patched(trainer.accelerator.unwrap_model(trainer.model))
    stats = trainer._prefixshare_token_counts
    assert stats["shared"] < stats["rows"]  # the groups' prompts were computed once
    return mine, theirs, trainer


# ---------------------------------------------------------------------------------------------- GRPO
# Every loss type once; over the eight cases every pair of values of the four binary axes (importance sampling
# level, beta, num_iterations, mask_truncated_completions) occurs at least once. LoRA with beta > 0 takes the
# reference from the disabled adapters; beta > 0 without LoRA loads a reference model.
GRPO_CASES = {
    "grpo-token-beta0-it1": dict(loss_type="grpo"),
    "bnpo-seq-beta-it2-accum": dict(loss_type="bnpo", importance_sampling_level="sequence", beta=0.1, num_iterations=2,
                                    gradient_accumulation_steps=2, steps_per_generation=2),
    "dr_grpo-token-beta-it2-masktrunc-packed": dict(loss_type="dr_grpo", beta=0.1, num_iterations=2,
                                                    mask_truncated_completions=True,
                                                    trainer_kwargs={"prefixshare_max_tokens_per_row": 64}),
    "dapo-seq-beta0-it2-masktrunc-lora": dict(loss_type="dapo", importance_sampling_level="sequence", num_iterations=2,
                                              mask_truncated_completions=True, lora=True),
    "cispo-token-beta-it1-masktrunc": dict(loss_type="cispo", beta=0.1, mask_truncated_completions=True,
                                           top_entropy_quantile=0.5),
    "sapo-seq-beta-it1-lora": dict(loss_type="sapo", importance_sampling_level="sequence", beta=0.1, lora=True,
                                   cast_lm_head_to_fp32=True),
    "vespo-token-beta0-it2-padded": dict(loss_type="vespo", num_iterations=2, off_policy_mask_threshold=0.5,
                                         pad_to_multiple_of=16),
    "luspo-seq-beta0-it1-masktrunc": dict(loss_type="luspo", importance_sampling_level="sequence",
                                          mask_truncated_completions=True, temperature=0.8),
}  # fmt: skip


@pytest.mark.parametrize("case", GRPO_CASES)
def test_grpo_matches_trl(case, tokenizer, model_dir, tmp_path):
    mine, theirs, trainer = compare(GRPOTrainer, PrefixShareGRPOTrainer, tokenizer, model_dir, tmp_path, **GRPO_CASES[case])
    options = GRPO_CASES[case]
    if options.get("beta"):
        assert any(entry["kl"] > 1e-3 for entry in theirs)  # the policy moved away from the reference
    if options.get("loss_type") in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo") and options.get("num_iterations") == 2:
        assert any(entry["clip_ratio/region_mean"] > 0 for entry in theirs)  # clipping happened
    if options.get("mask_truncated_completions"):
        assert trainer._prefixshare_token_counts["empty_rows"] > 0  # some rows had nothing to score


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("num_iterations", [1, 2])
def test_grpo_full_grid_matches_trl(loss_type, level, beta, num_iterations, tokenizer, model_dir, tmp_path):
    compare(GRPOTrainer, PrefixShareGRPOTrainer, tokenizer, model_dir, tmp_path, loss_type=loss_type,
            importance_sampling_level=level, beta=beta, num_iterations=num_iterations)  # fmt: skip


# The entropy bonus back-propagates through the per-token entropies (the engine's entropy_grad). Full fine-tuning
# (the trainable LM head's recompute path) and LoRA (the frozen head's gradient-in-forward path); adaptive control
# only applies its coefficient once the previous step's entropy is at most entropy_target, so the target is set
# above a random model's entropy (~log V) for the bonus to act on steps 2 and 3.
ENTROPY_CASES = {
    "entropy_coef": dict(entropy_coef=0.01),
    "entropy_coef-temperature-topq-lora": dict(entropy_coef=0.01, temperature=0.8, top_entropy_quantile=0.5, beta=0.1,
                                               lora=True),
    "adaptive-it2": dict(use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=100.0, num_iterations=2),
}  # fmt: skip


@pytest.mark.parametrize("case", ENTROPY_CASES)
def test_grpo_entropy_bonus_matches_trl(case, tokenizer, model_dir, tmp_path):
    """entropy_coef / use_adaptive_entropy: the same loss and gradients as TRL's (its loss subtracts coef * the
    mean entropy, whose gradient trains the policy). Fails on the main this started from: ValueError in __init__
    (the entropy bonus was refused), and with entropies returned without their graph: the step-2 and -3 values
    differ (the bonus's gradient is missing)."""
    mine, theirs, trainer = compare(GRPOTrainer, PrefixShareGRPOTrainer, tokenizer, model_dir, tmp_path,
                                    **ENTROPY_CASES[case])  # fmt: skip
    assert trainer._prefixshare_entropy_grad
    assert all("entropy_coef" in entry for entry in mine)
    # the bonus is in the loss (policy_loss is the loss without it) on the steps it applies to
    assert any(abs(entry["loss"] - entry["policy_loss"]) > 1e-3 for entry in theirs)


# ---------------------------------------------------------------------------------------------- RLOO
RLOO_CASES = {
    "beta0-it1": dict(beta=0.0),
    "beta-it2-masktrunc-accum": dict(beta=0.05, num_iterations=2, mask_truncated_completions=True,
                                     gradient_accumulation_steps=2, steps_per_generation=2),
    "beta-lora-packed": dict(beta=0.05, lora=True, trainer_kwargs={"prefixshare_max_tokens_per_row": 64}),
}  # fmt: skip


@pytest.mark.parametrize("case", RLOO_CASES)
def test_rloo_matches_trl(case, tokenizer, model_dir, tmp_path):
    compare(RLOOTrainer, PrefixShareRLOOTrainer, tokenizer, model_dir, tmp_path, **RLOO_CASES[case])


# ---------------------------------------------------------------------------------------------- TRL's default precision
@pytest.mark.parametrize(
    "base, ours, options",
    [
        (GRPOTrainer, PrefixShareGRPOTrainer, dict(beta=0.1)),
        (RLOOTrainer, PrefixShareRLOOTrainer, dict(beta=0.05)),
    ],
    ids=["grpo-beta", "rloo-beta"],
)
def test_bf16_true_with_float32_weights_matches_trl(base, ours, options, tokenizer, model_dir, tmp_path):
    """TRL's configs default to bf16=True: accelerate runs the float32 policy and reference under bfloat16 autocast.
    Failed before the self-check followed the forward's precision (SelfCheckError at the first step). Both
    trainers compute in bfloat16 here, so they agree within its rounding (epsilon 3.9e-3), not float32's."""
    theirs, their_completions, _ = train(base, tokenizer, model_dir, tmp_path, bf16=True, **options)
    mine, my_completions, trainer = train(ours, tokenizer, model_dir, tmp_path, bf16=True, **options)
    assert my_completions == their_completions
    assert is_patched(trainer.accelerator.unwrap_model(trainer.model))
    assert len(mine) == len(theirs) == 3
    for step, (a, b) in enumerate(zip(mine, theirs), 1):
        assert set(a) == set(b)
        for key in ("loss", "kl", "entropy", "reward"):
            assert math.isfinite(a[key]) and a[key] == pytest.approx(b[key], rel=2e-2, abs=2e-2), (step, key, a[key], b[key])


# ---------------------------------------------------------------------------------------------- MoE
@pytest.mark.parametrize(
    "base, ours, options",
    [
        (GRPOTrainer, PrefixShareGRPOTrainer, dict(mask_truncated_completions=True)),
        (GRPOTrainer, PrefixShareGRPOTrainer, dict(num_iterations=2, trainer_kwargs={"prefixshare_max_tokens_per_row": 64})),
        (RLOOTrainer, PrefixShareRLOOTrainer, dict(mask_truncated_completions=True)),
    ],
    ids=["grpo-masktrunc", "grpo-it2-packed", "rloo-masktrunc"],
)
def test_moe_router_aux_loss_matches_trl(base, ours, options, tokenizer, model_dir, tmp_path):
    """A Mixture-of-Experts policy with router_aux_loss_coef != 0: the logged aux_loss and the loss are TRL's. TRL
    routes each prompt once per row (prompts of fully masked rows too); the drop-ins route it once per unit and
    count it once per row (groups.token_weights). Fails on the main this started from: ValueError in __init__."""
    mine, theirs, trainer = compare(
        base, ours, tokenizer, model_dir, tmp_path, router_aux_loss_coef=0.5,
        model_config=dict(model_type="qwen3_moe"), **options,
    )  # fmt: skip
    assert trainer.aux_loss_enabled and all(entry["aux_loss"] > 0 for entry in theirs)


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(use_liger_kernel=True), "does not support use_liger_kernel=True"),
    ],
)
def test_unsupported_options_raise(options, message, tokenizer, tmp_path):
    config = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **options)
    with pytest.raises(ValueError, match=message):
        PrefixShareGRPOTrainer(model=tiny_model("llama", vocab_size=len(tokenizer)), reward_funcs=Recorder(),
                               args=config, train_dataset=datasets.Dataset.from_list(PROMPTS),
                               processing_class=tokenizer)  # fmt: skip


def test_trl_error_comes_before_the_liger_refusal(tokenizer, tmp_path):
    """Issue #21 item 3: with use_liger_kernel=True and a LoRA adapter on lm_head, TRL's own error (the adapter on
    lm_head is never trained through its fused LM head) comes first, as with plain TRL; before, the drop-in refused
    use_liger_kernel first. Without the adapter the drop-in's refusal still comes from the constructor."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])
    for cls in (GRPOTrainer, PrefixShareGRPOTrainer):
        config = GRPOConfig(output_dir=str(tmp_path / cls.__name__), use_cpu=True, report_to="none",
                            use_liger_kernel=True, per_device_train_batch_size=4, num_generations=4)  # fmt: skip
        with pytest.raises(ValueError, match="Applying a PEFT adapter to `lm_head` is not supported"):
            cls(model=tiny_model("llama", vocab_size=len(tokenizer)), reward_funcs=Recorder(), args=config,
                train_dataset=datasets.Dataset.from_list(PROMPTS), processing_class=tokenizer, peft_config=lora)  # fmt: skip


def test_prompt_learning_and_bad_budget_raise(tokenizer, tmp_path):
    from peft import PromptTuningConfig

    config = RLOOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    common = dict(reward_funcs=Recorder(), args=config, train_dataset=datasets.Dataset.from_list(PROMPTS),
                  processing_class=tokenizer)  # fmt: skip
    with pytest.raises(ValueError, match="does not support prompt-learning PEFT"):
        PrefixShareRLOOTrainer(model=tiny_model("llama", vocab_size=len(tokenizer)),
                               peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), **common)
    with pytest.raises(ValueError, match="prefixshare_max_tokens_per_row must be a positive integer"):
        PrefixShareRLOOTrainer(model=tiny_model("llama", vocab_size=len(tokenizer)), prefixshare_max_tokens_per_row=0,
                               **common)  # fmt: skip


@pytest.mark.parametrize("cls, base", [(PrefixShareGRPOTrainer, GRPOTrainer), (PrefixShareRLOOTrainer, RLOOTrainer)],
                         ids=["grpo", "rloo"])  # fmt: skip
def test_trl_validation_comes_before_patching(cls, base, tokenizer, tmp_path):
    """Issue #21 (item 3): TRL's own errors, word for word, come first, as with plain TRL: the drop-ins patch their
    models once TRL's __init__ has run. Bloom, which patch refuses, makes the order visible: before (de1f78d) the
    drop-ins patched first and raised UnsupportedModelError instead of TRL's reward_weights error. With a valid
    config the refusal still comes from the constructor, before training."""
    from transformers import BloomConfig, BloomForCausalLM

    from prefixshare import UnsupportedModelError

    def bloom():
        return BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=len(tokenizer)))

    if getattr(bloom(), "_supports_attention_backend", False):
        pytest.skip("Bloom routes attention through the attention interface in this transformers")
    config_class = GRPOConfig if base is GRPOTrainer else RLOOConfig

    def make(trainer, **options):
        args = config_class(output_dir=str(tmp_path / trainer.__name__), use_cpu=True, report_to="none",
                            per_device_train_batch_size=4, num_generations=4, beta=0.0, **options)  # fmt: skip
        # (beta 0: no reference model for TRL to load from the policy's name)
        return trainer(model=bloom(), reward_funcs=Recorder(), args=args,
                       train_dataset=datasets.Dataset.from_list(PROMPTS), processing_class=tokenizer)  # fmt: skip

    outcomes = {}
    for trainer in (base, cls):
        with pytest.raises(ValueError) as raised:
            make(trainer, reward_weights=[1.0, 2.0])  # two weights, one reward function
        outcomes[trainer] = raised.value
    assert type(outcomes[cls]) is type(outcomes[base]) and str(outcomes[cls]) == str(outcomes[base])
    assert "Number of reward weights (2) must match number of reward functions (1)" in str(outcomes[cls])
    with pytest.raises(UnsupportedModelError, match="AttentionInterface"):
        make(cls)
