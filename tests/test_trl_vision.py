"""The TRL drop-ins with images (issue #21): PrefixShareDPOTrainer, PrefixShareGRPOTrainer and PrefixShareRLOOTrainer
train a vision-language model with Qwen2-VL-style 3D rotary positions on data with images, with the numbers of
TRL's own trainers, step by step, each prompt's images encoded once per pair (DPO) or per group (GRPO/RLOO).

The model: a tiny Qwen2.5-VL (prefixshare.testing's config: 2 text layers, one vision block, patch 14, temporal
patch 2, merge 2) over a character-level tokenizer with Qwen's vision tokens added; the processor: transformers'
Qwen2.5-VL processor with its PIL image processor (torchvision is not installed here). Images: random 56x56 and
28x56 RGB pictures (4 and 2 image tokens).

One workaround, not a stand-in: transformers 5.25 cannot construct a Qwen-VL processor without torchvision (it
looks its video processor class up in a mapping that is empty then, and fails with an AttributeError even for
``video_processor=None``); the fixture lets the processor take ``video_processor=None``, as transformers does
when torchvision is installed and no video processor is wanted. No video goes through these tests.

On main before this change every test here failed: the drop-ins refused any processor ("does not support
vision-language models").
"""

from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
PIL = pytest.importorskip("PIL.Image")

from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

from prefixshare import UnsupportedModelError, is_patched  # noqa: E402
from prefixshare.data import toy_tokenizer  # noqa: E402
from prefixshare.integrations.trl import (  # noqa: E402
    PrefixShareDPOTrainer,
    PrefixShareDPOVisionCollator,
    PrefixShareGRPOTrainer,
    PrefixShareRLOOTrainer,
)
from prefixshare.testing import tiny_config_of  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

RTOL, ATOL = 1e-4, 1e-5
VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
# a chat template in the toy tokenizer's characters that renders image parts as Qwen's image placeholder
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for part in m['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def processor():
    import transformers
    from transformers import processing_utils

    tokenizer = toy_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.chat_template = TEMPLATE
    check = processing_utils.ProcessorMixin.check_argument_for_proper_class

    def allow_no_video_processor(self, name, argument):  # see the module docstring
        if argument is None and "video" in name:
            return None
        return check(self, name, argument)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(processing_utils.ProcessorMixin, "check_argument_for_proper_class", allow_no_video_processor)
        made = transformers.Qwen2_5_VLProcessor(
            image_processor=transformers.Qwen2VLImageProcessorPil(), tokenizer=tokenizer, video_processor=None,
            chat_template=TEMPLATE,
        )  # fmt: skip
    return made


def vlm(processor, seed: int = 0):
    import transformers

    ids = {name: processor.tokenizer.convert_tokens_to_ids(token) for name, token in zip(
        ("vision_start_token_id", "image_token_id", "vision_end_token_id", "video_token_id"), VISION_TOKENS)}  # fmt: skip
    config = tiny_config_of("qwen2_5_vl", vocab_size=len(processor.tokenizer), **ids)
    config.text_config.vocab_size = len(processor.tokenizer)
    config.text_config.pad_token_id = processor.tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    model.generation_config.eos_token_id = [processor.tokenizer.eos_token_id] + processor.tokenizer.convert_tokens_to_ids(
        list(" eaot")
    )
    return model.train()


def picture(i: int):
    g = torch.Generator().manual_seed(100 + i)
    height, width = (56, 56) if i % 2 == 0 else (28, 56)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    return PIL.fromarray(pixels, "RGB")


def preference_rows(n: int = 8, images: bool = True):
    rows = []
    for i in range(n):
        row = dict(prompt=f"{'<|vision_start|><|image_pad|><|vision_end|>' if images else ''}What is {i}?",
                   chosen=f" It is {i}, a number." + " sure" * (i % 3), rejected=f" No idea{'!' * (i % 4)}")  # fmt: skip
        if images:
            row["images"] = [picture(i)]
        rows.append(row)
    return datasets.Dataset.from_list(rows)


def logged(trainer):
    trainer.train()
    return [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]


def assert_logs_match(ours, theirs, exact=("num_tokens", "rewards/accuracies", "step", "epoch", "learning_rate")):
    assert len(ours) == len(theirs) >= 2
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        assert set(a) == set(b), f"step {step}: metric names differ: {sorted(set(a) ^ set(b))}"
        for key, want in b.items():
            if "runtime" in key or "per_second" in key or key == "step_time":
                continue
            got = a[key]
            if key in exact or not isinstance(want, float):
                assert got == want, f"step {step} {key}: {got} != {want}"
            else:
                assert math.isfinite(got) and got == pytest.approx(want, rel=RTOL, abs=ATOL), f"step {step} {key}: {got} vs {want}"


# ---------------------------------------------------------------------------------------------- DPO
def dpo(cls, processor, tmp_path, data, **kwargs):
    args = DPOConfig(output_dir=str(tmp_path / cls.__name__), max_steps=3, per_device_train_batch_size=2,
                     learning_rate=1e-3, adam_epsilon=1e-6, logging_steps=1, save_strategy="no", report_to="none",
                     bf16=False, use_cpu=True, seed=0, max_length=None, disable_tqdm=True)  # fmt: skip
    return cls(model=vlm(processor), ref_model=vlm(processor).eval(), args=args, train_dataset=data,
               processing_class=processor, **kwargs)  # fmt: skip


@pytest.mark.parametrize("packed", [False, True], ids=["one-pair-per-row", "packed"])
def test_dpo_with_images_matches_trl(processor, tmp_path, packed):
    data = preference_rows()
    theirs = logged(dpo(DPOTrainer, processor, tmp_path, data))
    ours = dpo(PrefixShareDPOTrainer, processor, tmp_path, data,
               **({"prefixshare_max_tokens_per_row": 120} if packed else {}))  # fmt: skip
    assert isinstance(ours.data_collator, PrefixShareDPOVisionCollator)
    batch = ours.data_collator([data[i] for i in range(2)])
    # each pair's image once (TRL's collator encodes it once per response)
    grids = batch["image_grid_thw"]
    assert grids.shape[0] == 2 and batch["pixel_values"].shape[0] == int(grids.prod(-1).sum())
    assert (len(batch["input_ids"]) == 1) == packed
    assert_logs_match(logged(ours), theirs)
    assert is_patched(ours.model) and is_patched(ours.ref_model)


def test_dpo_text_only_data_with_a_processor_matches_trl(processor, tmp_path):
    """A vision-language model and its processor on text-only data: TRL tokenizes with the processor, the text
    collator takes the processor's tokenizer."""
    data = preference_rows(images=False)
    theirs = logged(dpo(DPOTrainer, processor, tmp_path, data))
    ours = dpo(PrefixShareDPOTrainer, processor, tmp_path, data)
    assert not isinstance(ours.data_collator, PrefixShareDPOVisionCollator)
    assert_logs_match(logged(ours), theirs)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(precompute_ref_log_probs=True), "precompute_ref_log_probs.*not supported for vision datasets"),
        (dict(max_length=32, truncation_mode="keep_end"), "truncation_mode='keep_end' is not supported for vision"),
    ],
)
def test_dpo_vision_errors_are_trls(processor, tmp_path, options, message):
    """TRL's own errors for vision data come first, word for word, as with plain TRL."""
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, **options)
    for cls in (DPOTrainer, PrefixShareDPOTrainer):
        with pytest.raises(ValueError, match=message):
            cls(model=vlm(processor), ref_model=vlm(processor), args=args, train_dataset=preference_rows(2),
                processing_class=processor)  # fmt: skip


def test_dpo_prompt_cut_through_its_images_is_refused(processor, tmp_path):
    """max_length shorter than a prompt with images: cutting it would leave pixels without their image tokens (TRL
    fails inside the model); the collator names the example instead."""
    trainer = dpo(PrefixShareDPOTrainer, processor, tmp_path, preference_rows(2))
    trainer.data_collator.text.collator.max_length = 8
    with pytest.raises(ValueError, match=r"example 0: .*(prompt|images)"):
        trainer.data_collator([trainer.train_dataset[0]])


# ---------------------------------------------------------------------------------------------- GRPO / RLOO
class Recorder:
    """A reward (distinct characters) that records every completion it scores."""

    __name__ = "distinct"

    def __init__(self):
        self.completions = []

    def __call__(self, completions, **kwargs):
        self.completions.append([str(c) for c in completions])
        return [float(len(set(str(c)))) for c in completions]


def prompt_rows(n: int = 4):
    return datasets.Dataset.from_list([
        dict(prompt=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Say {i}"}]}],
             image=picture(i))
        for i in range(n)
    ])  # fmt: skip


def rl(cls, processor, tmp_path, **options):
    is_grpo = issubclass(cls, GRPOTrainer)
    values = dict(output_dir=str(tmp_path / cls.__name__), max_steps=2, per_device_train_batch_size=4,
                  num_generations=4, max_completion_length=6, optim="sgd", learning_rate=0.1, logging_steps=1,
                  save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0, disable_tqdm=True)  # fmt: skip
    values.update(options)
    reward = Recorder()
    trainer = cls(model=vlm(processor), reward_funcs=reward, args=(GRPOConfig if is_grpo else RLOOConfig)(**values),
                  train_dataset=prompt_rows(), processing_class=processor)  # fmt: skip
    return logged(trainer), reward.completions, trainer


@pytest.mark.parametrize(
    "base, ours",
    [(GRPOTrainer, PrefixShareGRPOTrainer), (RLOOTrainer, PrefixShareRLOOTrainer)],
    ids=["grpo", "rloo"],
)
def test_rl_with_images_matches_trl(processor, tmp_path, base, ours):
    """Same completions (same seed, TRL's generation), same logged values; the rows of a group share one prompt and
    its image, computed once (beta = 0: no reference model to load from a name)."""
    theirs, their_completions, _ = rl(base, processor, tmp_path, beta=0.0)
    mine, my_completions, trainer = rl(ours, processor, tmp_path, beta=0.0)
    assert my_completions == their_completions
    assert_logs_match(mine, theirs, exact=("step", "epoch", "learning_rate"))
    stats = trainer._prefixshare_token_counts
    assert stats["shared"] < stats["rows"]
    # every forward carried the images, each group's once: 4 rows per prompt, one image each
    assert stats["shared_images"] > 0 and stats["row_images"] == 4 * stats["shared_images"]
    assert is_patched(trainer.accelerator.unwrap_model(trainer.model))


def test_rl_images_of_another_form_are_refused(processor, tmp_path):
    """Images without grids (LLaVA's, Gemma's form) are refused by name, not dropped."""
    from prefixshare.integrations.trl_rl import _row_images

    with pytest.raises(ValueError, match=r"images given as \['pixel_values', 'token_type_ids'\]"):
        _row_images("T", 2, dict(pixel_values=torch.zeros(2, 3, 8, 8), token_type_ids=torch.zeros(2, 5)))
    grids = torch.tensor([[1, 2, 2], [1, 2, 4]])
    with pytest.raises(ValueError, match=r"num_images \[1, 0, 0\] does not match 3 rows and 2 image grids"):
        _row_images("T", 3, dict(pixel_values=torch.zeros(12, 4), image_grid_thw=grids, num_images=[1, 0, 0]))
    rows = _row_images("T", 3, dict(pixel_values=torch.arange(12.0)[:, None], image_grid_thw=grids, num_images=[1, 0, 1]))
    assert rows[1] is None and rows[0]["pixel_values"].shape[0] == 4 and rows[2]["pixel_values"][0, 0] == 4.0


def test_models_without_3d_positions_are_refused_with_images(processor):
    """A dataset with images and a model whose image tokens follow rules of their own (Gemma 3: both directions
    inside an image) is refused in the constructor, by structure."""
    from transformers import Gemma3ForConditionalGeneration

    from prefixshare.vision import check_images_supported

    gemma = Gemma3ForConditionalGeneration._from_config(tiny_config_of("gemma3"))
    with pytest.raises(UnsupportedModelError, match="PrefixShareGRPOTrainer: images in prefix-shared batches .* "
                       "Gemma3ForConditionalGeneration has none"):  # fmt: skip
        check_images_supported(gemma, "PrefixShareGRPOTrainer")
    check_images_supported(vlm(processor), "PrefixShareGRPOTrainer")  # Qwen2.5-VL: supported
