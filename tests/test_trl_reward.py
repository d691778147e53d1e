"""PrefixShareRewardTrainer against TRL's own RewardTrainer, and the prefix-shared reward forward against runs alone.

Trainer comparisons train a tiny sequence-classification Llama for 3 optimizer steps of 4 pairs with both trainers
and compare every logged value at every step, with the tolerance and AdamW epsilon of tests/test_trl.py (see its
docstring), at RewardConfig's default learning rate (1e-4). At 1e-3 every weight of the model moves by about the
learning rate per step whatever its gradient's size (AdamW), which turned float32 summation-order differences of
~3e-6 in the gradients into 1e-4 relative in the step-2 rewards of one case. Every test here fails on the main this started from: PrefixShareRewardTrainer, RewardCollator and
response_rewards did not exist (ImportError).
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import RewardConfig, RewardTrainer  # noqa: E402

import prefixshare  # noqa: E402
from prefixshare.layout import LAYOUT_KEY  # noqa: E402
from prefixshare.data import load_toy_preferences, toy_tokenizer  # noqa: E402
from prefixshare.integrations.trl import PrefixShareRewardCollator, PrefixShareRewardTrainer  # noqa: E402
from prefixshare.rewards import POSITIONS_KEY, RewardCollator, response_rewards  # noqa: E402
from prefixshare.testing import relative_error  # noqa: E402
from prefixshare.testing import ARCHITECTURE_NAMES, tiny_config  # noqa: E402

from test_trl import ATOL, RTOL, UNTIMED, assert_same, report_differences, uneven  # noqa: E402,F401  (the report fixture too)

ROWS = uneven(load_toy_preferences()[:12])
EVAL_ROWS = uneven(load_toy_preferences()[100:106])


def classifier(architecture="llama", vocab_size=100, seed=0, **overrides):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_config(architecture, **{"vocab_size": vocab_size, "num_labels": 1, **overrides})
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")


def scores_alone(model, examples):
    """Each sequence's score run alone through the model, and the gradients of every parameter for each."""
    want, want_grads = [], []
    for e in examples:
        for key in ("chosen_ids", "rejected_ids"):
            model.zero_grad()
            score = model(input_ids=torch.tensor([e[key]])).logits[0, 0]
            score.backward()
            want.append(score.item())
            want_grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return want, want_grads


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none", bf16=False, use_cpu=True, seed=0,
        disable_tqdm=True, adam_epsilon=1e-6,
    )  # fmt: skip
    values.update(overrides)
    return RewardConfig(**values)


def run(cls, tokenizer, tmp_path, rows=ROWS, *, evaluate=None, trainer_kwargs=None, model_config=None, **overrides):
    """Train 3 steps; return (per-step logs, eval metrics or None, trainer)."""
    trainer = cls(
        model=classifier(vocab_size=len(tokenizer), **(model_config or {})),
        args=config(tmp_path / cls.__name__, **overrides),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        **(trainer_kwargs or {}),
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    result = None
    if evaluate is not None:
        result = {k: v for k, v in trainer.evaluate(evaluate).items() if not any(w in k for w in UNTIMED)}
    return logs, result, trainer


def assert_logs_match(ours, theirs, case):
    assert len(ours) == len(theirs) == 3
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        assert_same(a, b, f"reward step {step}", f"reward: {case}")
    assert any(abs(a["margin"]) > 1e-3 for a in theirs)


@pytest.fixture
def tokenizer():
    return toy_tokenizer()


# ---------------------------------------------------------------------------------------------- the forward
@pytest.mark.parametrize("architecture", ARCHITECTURE_NAMES)
def test_rewards_equal_those_of_each_sequence_alone(architecture):
    """Scores and gradients of the prefix-shared forward equal the unpatched model's on each sequence alone, for
    every supported architecture, unpacked and packed, with: sequences ending in pad tokens (read before them, as
    the model's pooling), a pair with nothing in common, a pair of equal sequences."""
    examples = [
        {"chosen_ids": [1, 5, 6, 7, 8, 9, 2], "rejected_ids": [1, 5, 6, 11, 2]},
        {"chosen_ids": [1, 4, 4], "rejected_ids": [3, 4, 4, 4, 0, 0]},  # no common first token; trailing pads
        {"chosen_ids": [1, 5, 6, 12], "rejected_ids": [1, 5, 6, 12]},
        {"chosen_ids": [1, 7, 0, 8, 9, 10, 11, 12, 13], "rejected_ids": [1, 7, 0, 8, 0]},  # a pad inside
    ]
    model = classifier(architecture, vocab_size=32).eval()
    model.config.pad_token_id = 0
    want, want_grads = scores_alone(model, examples)
    want = torch.tensor(want).view(len(examples), 2)
    prefixshare.patch(model)
    for collator in (RewardCollator(0), RewardCollator(0, max_tokens_per_row=20), RewardCollator(0, padding_free=True)):
        batch = collator(examples)
        model.zero_grad()
        rewards = response_rewards(model, batch)
        assert rewards.shape == (len(examples), 2, 1)
        torch.testing.assert_close(rewards[..., 0].detach(), want, rtol=1e-5, atol=1e-6)
        rewards.sum().backward()
        for name, parameter in model.named_parameters():  # max error relative to the largest entry, as testing.py
            assert relative_error(parameter.grad, sum(g[name] for g in want_grads)) < 1e-5, name
    assert batch["input_ids"].shape[0] == 1  # padding_free: one row


def _layer_norm_classifier(kind, dtype, attention="eager"):
    import transformers as tf

    common = dict(vocab_size=32, pad_token_id=0, num_labels=1, initializer_range=0.1)
    torch.manual_seed(0)
    if kind == "gpt_neox issue #21":  # the report's sizes: head dim 2, so rotary_pct 0.25 rotates no feature
        config = tf.GPTNeoXConfig(hidden_size=8, num_attention_heads=4, intermediate_size=16, num_hidden_layers=2,
                                  rotary_pct=0.25, **common)  # fmt: skip
    elif kind == "gpt_neox":  # head dim 8: 2 rotary features
        config = tf.GPTNeoXConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=2,
                                  rotary_pct=0.25, **common)  # fmt: skip
    else:  # GPT-2: learned absolute positions, a final LayerNorm
        config = tf.GPT2Config(n_embd=16, n_head=2, n_layer=2, n_positions=64, **common)
    return tf.AutoModelForSequenceClassification.from_config(config, attn_implementation=attention, dtype=dtype).eval()


# float64 with sdpa: eager attention (prefixshare's, and GPT-NeoX's own) takes its softmax in float32, so a float64
# model on eager is float32-accurate there, outside the self-check's float64 tolerance; sdpa stays in float64
@pytest.mark.parametrize(
    "dtype, attention", [(torch.float32, "eager"), (torch.float64, "sdpa")], ids=["fp32-eager", "fp64-sdpa"]
)
@pytest.mark.parametrize("kind", ["gpt_neox issue #21", "gpt_neox", "gpt2"])
def test_layer_norm_reward_models_patch_and_equal_each_sequence_alone(kind, dtype, attention):
    """Issue #21: a reward model whose decoder ends in a LayerNorm with one gain for every feature (GPT-NeoX, GPT-2
    as initialized) was refused by the self-check, its gradients "differing by 1.2" in float32 and float64 alike.
    The probe weighted each token's last hidden state by one number, i.e. compared the gradient of the sum of its
    features, which that LayerNorm makes a constant: zero gradient, rounding noise compared with rounding noise.
    patch() accepts them now, and their prefix-shared rewards equal each sequence alone, values and gradients."""
    examples = [
        {"chosen_ids": [1, 5, 6, 7, 8, 9, 2], "rejected_ids": [1, 5, 6, 11, 2]},
        {"chosen_ids": [1, 4, 4], "rejected_ids": [3, 4, 4, 4, 0, 0]},  # no common first token; trailing pads
        {"chosen_ids": [1, 7, 0, 8, 9, 10, 11, 12, 13], "rejected_ids": [1, 7, 0, 8, 0]},  # a pad inside
    ]
    from prefixshare.selfcheck import SelfCheckError
    from prefixshare.testing.matrix import leaky_layout

    with leaky_layout(), pytest.raises(SelfCheckError):  # the negative control: the probe still sees a leak here
        prefixshare.patch(_layer_norm_classifier(kind, dtype, attention))
    model = _layer_norm_classifier(kind, dtype, attention)
    want, want_grads = scores_alone(model, examples)
    want = torch.tensor(want, dtype=dtype).view(len(examples), 2)
    prefixshare.patch(model)  # (the self-check runs here)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    for collator in (RewardCollator(0), RewardCollator(0, max_tokens_per_row=20)):
        model.zero_grad()
        rewards = response_rewards(model, collator(examples))
        torch.testing.assert_close(rewards[..., 0].detach(), want, rtol=tolerance, atol=tolerance)
        (rewards[..., 0] * torch.tensor([[1.0, -0.5]], dtype=dtype)).sum().backward()
        for name, parameter in model.named_parameters():
            reference = sum(g[name] * (1.0 if i % 2 == 0 else -0.5) for i, g in enumerate(want_grads))
            error = (parameter.grad - reference).abs().max() / reference.abs().max()  # (in the model's dtype)
            assert error < tolerance, name


def test_collator_shares_the_common_prefix_and_names_bad_examples():
    collator = RewardCollator(pad_token_id=0)
    batch = collator([{"chosen_ids": [1, 5, 6, 7], "rejected_ids": [1, 5, 6, 8, 9], "margin": 0.5}])
    unit = batch[LAYOUT_KEY].placements[0].unit
    assert (unit.prompt_length, unit.response_lengths) == (3, (1, 2))
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 8, 9]]
    assert batch[POSITIONS_KEY].tolist() == [[3, 5]] and batch["margin"].tolist() == [0.5]
    with pytest.raises(ValueError, match=r"example 1: rejected_ids has 1 token; a prefix-shared batch needs at least 2"):
        collator([{"chosen_ids": [1, 2], "rejected_ids": [1, 3]}, {"chosen_ids": [1, 2], "rejected_ids": [1]}])
    with pytest.raises(ValueError, match=r"example 0: missing 'rejected_ids'"):
        collator([{"chosen_ids": [1, 2]}])
    with pytest.raises(ValueError, match=r"example 0: chosen_ids\[1\] is 'a'"):
        collator([{"chosen_ids": [1, "a"], "rejected_ids": [1, 2]}])


def test_response_rewards_refuses_a_model_without_score_head():
    from prefixshare.testing import tiny_model

    model = prefixshare.patch(tiny_model("llama"))
    batch = RewardCollator(0)([{"chosen_ids": [1, 5, 6], "rejected_ids": [1, 5, 7]}])
    with pytest.raises(ValueError, match=r"needs a sequence-classification model with a `score` head"):
        response_rewards(model, batch)


# ---------------------------------------------------------------------------------------------- equality with TRL
def explicit_prompt(rows):
    return [{**row, "margin": 0.1 * (i % 4)} for i, row in enumerate(rows)]


def implicit_prompt(rows):
    return [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def conversational(rows):
    return [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in rows
    ]


CASES = {
    # and another EOS token (appended to every sequence: the model reads its score there)
    "explicit prompt, margin, centering, eos_token": dict(
        rows=explicit_prompt(ROWS), center_rewards_coefficient=0.01, eos_token="<unk>"
    ),
    # and max_length: the pairs with a sequence longer are dropped (by TRL's _prepare_dataset)
    "implicit prompt, max_length": dict(rows=implicit_prompt(ROWS), max_length=86, pad_to_multiple_of=8),
    "conversational, chat_template_path": dict(rows=conversational(ROWS), chat=True),
    "pad token = EOS": dict(rows=ROWS, pad_is_eos=True),
    "packed rows": dict(rows=ROWS, trainer_kwargs={"prefixshare_max_tokens_per_row": 300}),
    # issue #21: RewardTrainer copies the tokenizer's pad token into the model's config; before (de1f78d) the drop-in
    # patched, and so self-checked, the model before that: "Cannot handle batch sizes > 1 if no padding token"
    "model config without pad_token_id": dict(rows=ROWS, model_config={"pad_token_id": None}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reward_trainer_matches_trl(tmp_path, case):
    """Three steps and an evaluation, every logged value equal to trl.RewardTrainer's within 1e-4 / 1e-5.

    "pad token = EOS": a tokenizer without a pad token, so TRL pads with EOS, every sequence ends in it and the model
    reads its score at the token before; the collator must read at the same one."""
    options = dict(CASES[case])
    rows = options.pop("rows")
    tokenizer = toy_tokenizer()
    if options.pop("chat", False):  # the template from a .jinja file (RewardConfig.chat_template_path)
        (tmp_path / "template.jinja").write_text(CHAT_TEMPLATE)
        options["chat_template_path"] = str(tmp_path / "template.jinja")
    pad_is_eos = options.pop("pad_is_eos", False)
    if pad_is_eos:
        tokenizer.pad_token = None
    kwargs = options.pop("trainer_kwargs", {})
    eval_rows = datasets.Dataset.from_list(rows[:6])
    theirs, their_eval, _ = run(RewardTrainer, tokenizer, tmp_path, rows, evaluate=eval_rows, **options)
    if pad_is_eos:
        tokenizer.pad_token = None  # the first trainer set it
    ours, our_eval, trainer = run(
        PrefixShareRewardTrainer, tokenizer, tmp_path, rows, evaluate=eval_rows, trainer_kwargs=kwargs, **options
    )
    assert_logs_match(ours, theirs, case)
    assert_same(our_eval, their_eval, "evaluate()", f"reward: {case}, evaluate()")
    if "max_length" in case:
        assert 0 < len(trainer.train_dataset) < len(rows)  # some pairs really were dropped
    assert isinstance(trainer.data_collator, PrefixShareRewardCollator) and prefixshare.is_patched(trainer.model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert (batch["input_ids"].shape[0] < 4) if kwargs else (batch["input_ids"].shape[0] == 4)  # packed, or a row per pair
    if pad_is_eos:
        assert trainer.processing_class.pad_token_id == tokenizer.eos_token_id
    assert trainer.model.config.pad_token_id == trainer.processing_class.pad_token_id


def test_lora_reward_model_matches_trl(tokenizer, tmp_path):
    """LoRA (task_type SEQ_CLS: peft trains the score head through modules_to_save), equal to TRL's."""
    from peft import LoraConfig

    def lora():
        return LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])

    theirs, _, _ = run(RewardTrainer, tokenizer, tmp_path, trainer_kwargs={"peft_config": lora()}, learning_rate=1e-2)
    ours, _, trainer = run(
        PrefixShareRewardTrainer, tokenizer, tmp_path, trainer_kwargs={"peft_config": lora()}, learning_rate=1e-2
    )
    assert_logs_match(ours, theirs, "LoRA")
    assert any("score" in n and p.requires_grad for n, p in trainer.model.named_parameters())


def test_streaming_eval_and_compute_metrics_match_trl(tokenizer, tmp_path):
    """evaluate() on a streaming set, and compute_metrics given the same EvalPrediction (the [2n, 1] rewards,
    chosen rows then rejected rows, of 6 pairs in batches of 4)."""
    seen, results = {}, {}
    data = datasets.Dataset.from_list(EVAL_ROWS)
    for cls in (RewardTrainer, PrefixShareRewardTrainer):

        def compute_metrics(prediction, name=cls.__name__):
            seen[name] = prediction
            return {"top": float(prediction.predictions.max())}

        trainer = cls(
            model=classifier(vocab_size=len(tokenizer)), args=config(tmp_path / cls.__name__),
            train_dataset=datasets.Dataset.from_list(ROWS), processing_class=tokenizer, compute_metrics=compute_metrics,
        )  # fmt: skip
        for streaming in (False, True):
            result = trainer.evaluate(data.to_iterable_dataset() if streaming else data)
            results[cls, streaming] = {k: v for k, v in result.items() if not any(w in k for w in UNTIMED)}
    for streaming in (False, True):
        assert_same(results[PrefixShareRewardTrainer, streaming], results[RewardTrainer, streaming], f"{streaming=}",
                    "reward: evaluate(), streaming and compute_metrics")  # fmt: skip
    ours, theirs = seen["PrefixShareRewardTrainer"], seen["RewardTrainer"]
    assert ours.predictions.shape == theirs.predictions.shape
    torch.testing.assert_close(torch.as_tensor(ours.predictions), torch.as_tensor(theirs.predictions), rtol=RTOL, atol=ATOL)


def test_model_given_by_name_matches_trl(tokenizer, tmp_path):
    """model="path": TRL loads AutoModelForSequenceClassification with num_labels=1 and model_init_kwargs; the
    model is patched after loading."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny-llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    logs = {}
    for cls in (RewardTrainer, PrefixShareRewardTrainer):
        trainer = cls(
            model=str(path), args=config(tmp_path / cls.__name__, model_init_kwargs={"attn_implementation": "eager"}),
            train_dataset=datasets.Dataset.from_list(ROWS),
        )  # fmt: skip
        trainer.train()
        logs[cls] = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    assert prefixshare.is_patched(trainer.model)
    assert_logs_match(logs[PrefixShareRewardTrainer], logs[RewardTrainer], "model by name")


def test_unsupported_reward_options_raise(tokenizer, tmp_path):
    from trl.trainer.reward_trainer import DataCollatorForPreference

    common = dict(train_dataset=datasets.Dataset.from_list(ROWS), processing_class=tokenizer)
    with pytest.raises(ValueError, match="collator"):
        PrefixShareRewardTrainer(
            classifier(), args=config(tmp_path), data_collator=DataCollatorForPreference(pad_token_id=0), **common
        )
    with pytest.raises(ValueError, match="dispatch_batches"):
        PrefixShareRewardTrainer(
            classifier(), args=config(tmp_path, accelerator_config={"dispatch_batches": True}), **common
        )


def _bloom_classifier(vocab_size, num_labels=1):
    # Bloom computes attention itself (ALiBi), outside transformers' AttentionInterface: patch refuses it
    from transformers import BloomConfig, BloomForSequenceClassification

    torch.manual_seed(0)
    model = BloomForSequenceClassification(
        BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=vocab_size, num_labels=num_labels, pad_token_id=0)
    )
    if getattr(model, "_supports_attention_backend", False):
        pytest.skip("Bloom routes attention through the attention interface in this transformers")
    return model


@pytest.mark.parametrize("model_kind", ["no pad token id", "unsupported architecture"])
def test_trl_validation_comes_before_patching(model_kind, tokenizer, tmp_path):
    """Issue #21 (item 3): TRL's own errors come first, word for word, as with plain TRL: the drop-in patches (and
    self-checks) the model after RewardTrainer.__init__ has validated it. Before (de1f78d) it patched first, so a
    model of num_labels=2 got prefixshare's error instead of TRL's: the self-check's "Cannot handle batch sizes > 1
    if no padding token is defined" (a config without pad_token_id, which TRL fills in later), or the
    architecture's refusal. An architecture patch refuses still fails at construction, before training."""
    def make(num_labels):
        if model_kind == "unsupported architecture":
            return _bloom_classifier(len(tokenizer), num_labels)
        return classifier(vocab_size=len(tokenizer), num_labels=num_labels, pad_token_id=None)

    common = dict(args=config(tmp_path), train_dataset=datasets.Dataset.from_list(ROWS), processing_class=tokenizer)
    with pytest.raises(ValueError) as theirs:
        RewardTrainer(make(2), **common)
    with pytest.raises(ValueError) as ours:
        PrefixShareRewardTrainer(make(2), **common)
    assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)
    assert "require `num_labels=1`" in str(ours.value)
    if model_kind == "unsupported architecture":
        with pytest.raises(prefixshare.UnsupportedModelError, match="AttentionInterface"):
            PrefixShareRewardTrainer(make(1), **common)
    else:
        trainer = PrefixShareRewardTrainer(make(1), **common)  # TRL set the pad token id, then the model was patched
        assert prefixshare.is_patched(trainer.model) and trainer.model.config.pad_token_id == tokenizer.pad_token_id


def test_pad_token_id_missing_from_the_config(tokenizer):
    """patch() on a reward model whose config has no pad_token_id: the probe reads the decoder's hidden states, which
    the pad token does not change, so the model is accepted (before: "self-check failed ... Cannot handle batch
    sizes > 1 if no padding token is defined", a correct model refused). response_rewards then says what to set:
    the model's pooling reads the last token that is not config.pad_token_id, the collator the last that is not its
    own pad id, and the two must be the same token."""
    model = classifier(vocab_size=32, pad_token_id=None)
    prefixshare.patch(model)
    examples = [
        {"chosen_ids": [1, 5, 6, 7], "rejected_ids": [1, 5, 8]},
        {"chosen_ids": [1, 9, 3], "rejected_ids": [1, 9, 4, 4]},
    ]
    with pytest.raises(ValueError, match=r"no config.pad_token_id; set model.config.pad_token_id to the pad_token_id"):
        response_rewards(model, RewardCollator(0)(examples))
    model.config.pad_token_id = 0
    keys = ("chosen_ids", "rejected_ids")
    want = torch.tensor([[model(input_ids=torch.tensor([e[k]])).logits[0, 0].item() for k in keys] for e in examples])
    torch.testing.assert_close(response_rewards(model, RewardCollator(0)(examples))[..., 0].detach(), want)


def test_a_collator_pad_id_other_than_the_models_is_refused(tokenizer):
    """RewardCollator(pad_token_id=0) with a model whose config.pad_token_id is 2 and sequences ending in 2: the reward
    was read at another token than the model alone reads it (0.4 vs 0.25 on the chosen response), silently."""
    model = prefixshare.patch(classifier(vocab_size=32, pad_token_id=2))
    examples = [{"chosen_ids": [1, 5, 6, 2], "rejected_ids": [1, 5, 8]}, {"chosen_ids": [1, 9, 3], "rejected_ids": [1, 9, 4, 2]}]
    with pytest.raises(ValueError, match=r"collated with pad_token_id=0, but .*config.pad_token_id is 2"):
        response_rewards(model, RewardCollator(0)(examples))
    keys = ("chosen_ids", "rejected_ids")
    want = torch.tensor([[model(input_ids=torch.tensor([e[k]])).logits[0, 0].item() for k in keys] for e in examples])
    torch.testing.assert_close(response_rewards(model, RewardCollator(2)(examples))[..., 0].detach(), want)
