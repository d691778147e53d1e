"""Images in prefix-shared batches (#14 item 2): models whose image tokens get 3D multimodal rotary positions
(t, h, w) -- Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and MoE), GLM-4V -- take prefix-shared batches with images in
the prompt, each unit's images encoded once, exactly: log-probs and gradients (vision tower included) equal to
each prompt+response run alone through the unpatched model, the model computing its own positions from
``mm_token_type_ids`` and the grids.

Tiny models: 2 text layers (hidden 64, vocabulary 96, weights of std 0.1), a one-block vision tower (patch 14,
temporal patch 2, merge 2: one image token per 2x2 patches), random pixel_values. Prompts hold images of grids
(1, 4, 4), (1, 2, 6) and (1, 6, 2): 4, 3 and 3 image tokens that advance the text positions by 2, 3 and 3, so
that a response restarting at the prompt's length instead of its position triple is off by a few positions.

On main (9e2b740, and 9768d32 where this branch started) every test here fails: a prefix-shared forward with
pixel_values raises UnsupportedModelError, and the collators drop the examples' pixel_values and
image_grid_thw silently (the bad-input tests get no error).
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import prefixshare
import prefixshare.vision
from prefixshare import (
    PairedCollator,
    PrefixShareCollator,
    UnsupportedModelError,
    patch,
)
from prefixshare.testing import tiny_config_of

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TOLERANCE = 1e-5
IMAGE, VIDEO, START, END = 90, 91, 92, 93  # special ids inside the tiny vocabulary (96)
GRIDS = ([(1, 4, 4)], [(1, 2, 6), (1, 4, 4)], [(1, 6, 2)], [])  # the images of examples 0, 1, 2, 3 (cycled)


def vision_language(model_type: str, attn_implementation: str = "eager"):
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers has no {model_type} here")
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    config = tiny_config_of(model_type, **ids)
    if hasattr(config.vision_config, "deepstack_visual_indexes"):  # Qwen3-VL: deepstack from the one vision block
        config.vision_config.deepstack_visual_indexes = [0]
    if not hasattr(config.vision_config, "out_hidden_size"):  # Qwen2-VL: the merger outputs vision hidden_size
        config.vision_config.hidden_size = config.text_config.hidden_size
    if model_type == "glm4v":  # GLM-4V's (t, h, w) sections fill its partial rotary dims (8 of head dim 16)
        config.text_config.rope_parameters["mrope_section"] = [4, 2, 2]
    model_class = getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type])
    torch.manual_seed(0)
    return model_class._from_config(config, attn_implementation=attn_implementation).eval()


def image_examples(model, n: int = 5, num_responses: int = 2, seed: int = 0) -> list[dict]:
    """``n`` examples whose prompts hold text and the images of :data:`GRIDS` (each image between its start and end
    tokens), with random ``pixel_values``; responses of random text. The fourth example has no image."""
    vision = model.config.vision_config
    features = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    merge = vision.spatial_merge_size
    g = torch.Generator().manual_seed(seed)

    def text(low, high):
        return torch.randint(3, 88, (int(torch.randint(low, high + 1, (1,), generator=g)),), generator=g).tolist()

    examples = []
    for i in range(n):
        grids = GRIDS[i % len(GRIDS)]
        prompt = []
        for t, h, w in grids:
            prompt += text(0, 3) + [START] + [IMAGE] * (t * h * w // merge**2) + [END]
        prompt += text(1, 5)
        example = dict(prompt_input_ids=prompt, responses_input_ids=[text(1, 8) for _ in range(num_responses)])
        if grids:
            example["image_grid_thw"] = torch.tensor(grids)
            example["pixel_values"] = torch.randn(sum(t * h * w for t, h, w in grids), features, generator=g)
        examples.append(example)
    return examples


def logps_alone(model, examples) -> torch.Tensor:
    """``[n, K]``: each prompt+response alone through the unpatched model, with the prompt's images and the
    ``mm_token_type_ids`` the processor gives, from which the model computes its own 3D positions. (Written out
    here rather than taken from prefixshare.testing, so that the reference does not depend on the library.)"""
    rows = []
    for example in examples:
        prompt = example["prompt_input_ids"]
        row = []
        for response in example["responses_input_ids"]:
            ids = torch.tensor([prompt + response])
            images = {}
            if "pixel_values" in example:
                images = dict(pixel_values=example["pixel_values"], image_grid_thw=example["image_grid_thw"],
                              mm_token_type_ids=(ids == IMAGE).int())  # fmt: skip
            logits = model(input_ids=ids, use_cache=False, **images).logits[0].float()
            targets = ids[0, len(prompt) :]
            row.append(logits[len(prompt) - 1 : -1].log_softmax(-1).gather(-1, targets[:, None]).sum())
        rows.append(torch.stack(row))
    return torch.stack(rows)


def compare(model_type, attn_implementation, *, num_responses=2, packed=False, collator_class=PrefixShareCollator):
    """Log-probs of the prefix-shared batch (through the engine) and the gradients of ``sum(w * logps)`` on every
    parameter against the runs alone: ``(log-prob error, gradient error, worst parameter)``, normwise relative."""
    from prefixshare.testing.exactness import (
        align_gradients,
        gradient_error,
        loss_weights,
        relative_error,
        trainable_grads,
    )

    reference = vision_language(model_type, attn_implementation)
    model = patch(copy.deepcopy(reference))
    examples = image_examples(reference, num_responses=num_responses, seed=num_responses)
    batch = collator_class(0, max_tokens_per_row=160 if packed else None)(examples)
    assert batch["pixel_values"].shape[0] > 0 and (len(batch["input_ids"]) < len(examples)) == packed
    want = logps_alone(reference, examples)
    got = prefixshare.response_logps(model, batch).logps
    weights = loss_weights(want.shape)
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    grads, reference_grads, one_sided = align_gradients(trainable_grads(model), trainable_grads(reference))
    assert not one_sided and any(name.startswith("model.visual.") for name in reference_grads)
    return (relative_error(got, want), *gradient_error(grads, reference_grads))


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("num_responses", [2, 4])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v"])
def test_images_in_the_prompt_are_exact(model_type, attn_implementation, num_responses, packed):
    """Log-probs and gradients of every parameter (the vision tower's too, each on its own scale) equal the runs
    alone."""
    logps_error, grad_error, worst = compare(
        model_type, attn_implementation, num_responses=num_responses, packed=packed
    )
    assert logps_error <= TOLERANCE and grad_error <= TOLERANCE, (logps_error, grad_error, worst)


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_paired_format_with_images_is_exact(packed):
    """The paired baseline repeats each example's images once per response (one unit per response)."""
    logps_error, grad_error, worst = compare("qwen2_5_vl", "sdpa", packed=packed, collator_class=PairedCollator)
    assert logps_error <= TOLERANCE and grad_error <= TOLERANCE, (logps_error, grad_error, worst)


def test_images_are_encoded_once_per_unit_in_physical_order():
    """The batch carries each unit's images once, in the order of the units in the rows (the order in which the
    model fills image tokens), also when packing reorders the units."""
    model = vision_language("qwen2_5_vl")
    examples = image_examples(model)
    batch = PrefixShareCollator(0, max_tokens_per_row=70)(examples)
    order = [pl.unit.example for pl in sorted(batch.layout.placements, key=lambda pl: (pl.row, pl.offset))]
    assert order != sorted(order)  # packing moved units: the order matters
    with_images = [i for i in order if "pixel_values" in examples[i]]
    assert torch.equal(batch["pixel_values"], torch.cat([examples[i]["pixel_values"] for i in with_images]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([examples[i]["image_grid_thw"] for i in with_images]))


def test_responses_restarting_at_the_prompt_length_are_caught(monkeypatch):
    """Control: responses given the prompt's LENGTH (1D restart, the text-only rule) instead of the position
    triple after the prompt's images. The comparison must show it well above the tolerance."""
    computed = prefixshare.vision.multimodal_inputs

    def length_restart(model, kwargs, layout):
        updated = computed(model, kwargs, layout)
        if updated is kwargs:  # text only (the self-check's batches)
            return kwargs
        positions = updated["position_ids"].clone()
        responses = (layout.segment_ids > 0).to(positions.device)
        positions[1:, responses] = positions[0, responses]  # t = h = w = the layout's 1D position
        return {**updated, "position_ids": positions}

    monkeypatch.setattr(sys.modules["prefixshare.patch"], "multimodal_inputs", length_restart)
    logps_error, grad_error, worst = compare("qwen2_5_vl", "eager")
    assert logps_error > 1e-3 and grad_error > 1e-2, (logps_error, grad_error, worst)  # measured: 1.4e-2 and 0.45


# ---------------------------------------------------------------------------------------------- refusals
def test_gemma3_images_stay_refused():
    """Gemma 3's image tokens attend to each other in both directions inside an image: not a causal layout, so
    its images are refused before the forward runs (text-only batches through it are exact: test_agnostic)."""
    model = patch(vision_language("gemma3"))
    batch = PrefixShareCollator(0)([dict(prompt_input_ids=[5, 6], chosen_input_ids=[7], rejected_input_ids=[8])])
    with pytest.raises(UnsupportedModelError, match=r"carries pixel_values: images in prefix-shared batches are "
                       r"supported only in models that place image tokens by 3D multimodal rotary positions.*"
                       r"Gemma 3's image tokens attend to each other in both directions"):  # fmt: skip
        model(**batch, pixel_values=torch.zeros(1, 3, 28, 28))


def test_videos_are_refused():
    model = patch(vision_language("qwen2_5_vl"))
    batch = PrefixShareCollator(0)(image_examples(model, n=1))
    refused = "pixel_values_videos, video_grid_thw: videos and audio are not supported"
    with pytest.raises(UnsupportedModelError, match=refused):
        model(**batch, pixel_values_videos=torch.zeros(4, 8), video_grid_thw=torch.tensor([[1, 2, 2]]))


# ---------------------------------------------------------------------------------------------- bad input
def test_image_tokens_in_a_response_are_refused():
    model = patch(vision_language("qwen2_5_vl"))
    examples = image_examples(model, n=3)
    examples[1]["responses_input_ids"][1] = [5, IMAGE, 6]
    batch = PrefixShareCollator(0)(examples)
    with pytest.raises(ValueError, match=r"example 1: response 1 holds image tokens \(id 90\); images are supported "
                       r"in the prompt only"):  # fmt: skip
        prefixshare.response_logps(model, batch)


def test_image_token_count_must_match_the_grid():
    model = patch(vision_language("qwen2_5_vl"))
    examples = image_examples(model, n=3)
    examples[2]["prompt_input_ids"] = [IMAGE] + examples[2]["prompt_input_ids"]  # one token more than its image
    batch = PrefixShareCollator(0)(examples)
    with pytest.raises(ValueError, match=r"example 2: its prompt holds 4 image tokens \(id 90\) but its "
                       r"image_grid_thw \[\[1, 6, 2\]\] gives 3"):  # fmt: skip
        model(**batch)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda ex: ex.pop("image_grid_thw"), "example 0: has pixel_values but no image_grid_thw"),
        (
            lambda ex: ex.update(pixel_values=ex["pixel_values"][:-1]),
            r"example 0: pixel_values has 15 patches \(rows\) but image_grid_thw \[\[1, 4, 4\]\] gives 16",
        ),
        (lambda ex: ex.update(image_grid_thw=torch.tensor([1, 4, 4])), r"example 0: image_grid_thw must be \[n_images"),
        (lambda ex: ex.update(image_grid_thw=torch.tensor([[1.0, 4, 4]])), "example 0: image_grid_thw must hold"),
        (lambda ex: ex.update(pixel_values=ex["pixel_values"].long()), "example 0: pixel_values must be a 2-D float"),
    ],
    ids=["grid-missing", "patch-count", "grid-shape", "grid-dtype", "pixels-dtype"],
)
def test_collator_checks_the_images(edit, message):
    examples = image_examples(vision_language("qwen2_5_vl"), n=2)
    edit(examples[0])
    with pytest.raises(ValueError, match=message):
        PrefixShareCollator(0)(examples)


@pytest.mark.parametrize("truncation", ["keep_end_of_prompt", "keep_end"])
def test_truncating_a_prompt_with_images_is_refused(truncation):
    examples = image_examples(vision_language("qwen2_5_vl"), n=1)
    with pytest.raises(ValueError, match=f"example 0: .*its prompt carries images, which truncation='{truncation}' "
                       "would cut from the start"):  # fmt: skip
        PrefixShareCollator(0, max_length=10, truncation=truncation)(examples)


def test_truncating_only_the_responses_keeps_the_images():
    model = vision_language("qwen2_5_vl")
    examples = image_examples(model, n=1)
    limit = len(examples[0]["prompt_input_ids"]) + 1
    batch = PrefixShareCollator(0, max_length=limit, truncation="truncate_responses")(examples)
    assert torch.equal(batch["pixel_values"], examples[0]["pixel_values"]) and batch.layout.response_lengths.max() == 1


def test_images_of_another_width_are_refused():
    examples = image_examples(vision_language("qwen2_5_vl"), n=2)
    examples[1]["pixel_values"] = examples[1]["pixel_values"][:, :588]
    with pytest.raises(ValueError, match="example 1: pixel_values rows have 588 features but example 0's have 1176"):
        PrefixShareCollator(0)(examples)


# ---------------------------------------------------------------------------------------------- online RL groups
def rl_rows(model, seed: int = 0):
    """TRL's row format of a GRPO batch with images: 4 prompts x 3 completions, shuffled; prompts 0 and 1 have the
    same token ids (the same text and image size) but other pixels, so they are two groups, not one."""
    examples = image_examples(model, n=3, num_responses=3, seed=seed)
    twin = dict(examples[0])
    twin["pixel_values"] = examples[0]["pixel_values"].flip(0) * 0.5  # other pixels, same grid, same tokens
    twin["responses_input_ids"] = [r[::-1] for r in examples[0]["responses_input_ids"]]
    examples.insert(1, twin)
    rows = [(e, r) for e in examples for r in e["responses_input_ids"]]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [rows[i] for i in order]
    images = [
        dict(pixel_values=e["pixel_values"], image_grid_thw=e["image_grid_thw"]) if "pixel_values" in e else None
        for e, _ in rows
    ]
    prompts = [e["prompt_input_ids"] for e, _ in rows]
    completions = [r for _, r in rows]
    alone = [dict(prompt_input_ids=p, responses_input_ids=[c], **({} if im is None else im))
             for p, c, im in zip(prompts, completions, images)]  # fmt: skip
    return prompts, completions, images, alone


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_completion_groups_with_images_are_exact(packed):
    """group_completions with each row's images: rows are grouped by prompt tokens AND images, each group's images
    are in its batch once, and the per-token log-probs (and the gradients, vision tower included) equal each
    prompt+completion alone through the unpatched model."""
    from prefixshare.testing.exactness import align_gradients, gradient_error, relative_error, trainable_grads

    reference = vision_language("qwen2_5_vl")
    model = patch(copy.deepcopy(reference))
    prompts, completions, images, alone = rl_rows(reference)
    groups = prefixshare.group_completions(prompts, completions, images=images, pad_token_id=0,
                                           max_tokens_per_row=120 if packed else None)  # fmt: skip
    assert groups.num_prompts == 4  # the two prompts of equal tokens and other pixels are two groups
    (batch,) = groups.batches
    assert batch["image_grid_thw"].shape[0] == sum(len(GRIDS[i % len(GRIDS)]) for i in (0, 0, 1, 2))
    out = prefixshare.completion_logps(model, groups)
    got = (out.logps * out.mask).sum(1)
    want = logps_alone(reference, alone)[:, 0]
    weights = torch.linspace(0.5, 1.5, len(want))
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    grads, reference_grads, one_sided = align_gradients(trainable_grads(model), trainable_grads(reference))
    grad_error, worst = gradient_error(grads, reference_grads)
    assert not one_sided and any(name.startswith("model.visual.") for name in reference_grads)
    assert relative_error(got, want) <= TOLERANCE and grad_error <= TOLERANCE, (relative_error(got, want), worst)


def test_completion_groups_without_their_images_would_merge():
    """Control: without ``images`` the two prompts of equal tokens are one group (the other prompt's pixels would be
    used): images are what keeps them apart."""
    model = vision_language("qwen2_5_vl")
    prompts, completions, images, _ = rl_rows(model)
    assert prefixshare.group_completions(prompts, completions, pad_token_id=0).num_prompts == 3
    assert prefixshare.group_completions(prompts, completions, images=images, pad_token_id=0).num_prompts == 4


@pytest.mark.parametrize(
    "images, message",
    [
        ([None], r"images has 1 entries but prompt_ids has 12 rows"),
        ("rows", r"prompt row 0: pixel_values must be \[n_patches, D\] floating with n_patches"),
        ("keys", r"prompt row 0: images has \['pixel_attention_mask'\]"),
    ],
)
def test_completion_groups_check_the_images(images, message):
    model = vision_language("qwen2_5_vl")
    prompts, completions, given, _ = rl_rows(model)
    first = next(i for i, im in enumerate(given) if im is not None)
    prompts, completions, given = prompts[first:], completions[first:], given[first:]
    if images == "rows":
        images = [dict(pixel_values=given[0]["pixel_values"][:-1], image_grid_thw=given[0]["image_grid_thw"])]
        images += given[1:]
    elif images == "keys":
        images = [dict(given[0], pixel_attention_mask=None)] + given[1:]
    else:
        prompts, completions = prompts[:12], completions[:12]
    with pytest.raises(ValueError, match=message):
        prefixshare.group_completions(prompts, completions, images=images, pad_token_id=0)
