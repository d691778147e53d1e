"""Images in prefix-shared batches: the 3D multimodal rotary positions of Qwen2-VL-style models.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL give every token three rotary positions (t, h, w): an image's tokens get its
grid (t, rows, columns from where the image starts), and text numbers on from the image's extent on all three
axes, so the text after a prompt with images does not start at the prompt's length. The model computes them
with ``get_rope_index(input_ids, mm_token_type_ids, image_grid_thw)`` when no ``position_ids`` are given.

In a prefix-shared batch every response must see the positions it would get after its prompt alone. So a
patched forward that carries images computes, for each unit, the model's own ``get_rope_index`` over the
prompt followed by its longest response (text), and gives the prompt those positions and every response the
positions of the text right after the prompt, restarting there for each response. A token's positions depend
only on the tokens before it (generation with a cache relies on that), so each response gets exactly the
positions of prompt+response alone. The result goes to the model as ``position_ids`` of shape ``[4, B, L]``:
row 0 the layout's 1-D logical positions (what the attention kernels and the masks read), rows 1-3 (t, h, w)
for the rotary embedding, the form transformers' multimodal text decoders take for packed sequences.

The images themselves need nothing else: the vision tower encodes each image on its own, and the model fills
the image tokens of ``input_ids`` in row-major order with the features of the concatenated images, which the
collators lay out in the physical order of the units (:class:`prefixshare.collators.PrefixShareBatch`). The
checks here make sure each unit's prompt holds exactly its images' tokens, and no response holds any.

Which models: decided by structure, not by name: a module with ``get_rope_index`` taking ``input_ids``,
``mm_token_type_ids`` and ``image_grid_thw``, a config with ``image_token_id`` and a vision config with
``spatial_merge_size``. Anything else (Gemma 3's images attend to each other both ways inside an image block),
and videos or audio in any model, is refused with what is unsupported.
"""

from __future__ import annotations

import inspect

import torch

from .architectures import UnsupportedModelError
from .structure import unwrap_model

IMAGE_INPUTS = ("pixel_values", "image_grid_thw")

# inputs of a vision or audio tower that prefix-shared batches do not take (videos have temporal positions and
# timestamps of their own; audio towers have their own positions): refused in every model
_OTHER_MEDIA = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "input_features", "image_sizes",
                "input_values", "audio_values")  # fmt: skip


def _rope_index_owner(model):
    """The module whose ``get_rope_index`` computes the model's 3D positions (with the image token id and the merge
    size in its config), or None if the model has none of that form."""
    for module in unwrap_model(model).modules():
        function = getattr(module, "get_rope_index", None)
        config = getattr(module, "config", None)
        if not callable(function) or config is None:
            continue
        parameters = inspect.signature(function).parameters
        merge = getattr(getattr(config, "vision_config", None), "spatial_merge_size", None)
        if {"input_ids", "mm_token_type_ids", "image_grid_thw"} <= set(parameters) and isinstance(
            getattr(config, "image_token_id", None), int
        ) and isinstance(merge, int):
            return module
    return None


def check_images_supported(model, who: str) -> None:
    """Raise :class:`UnsupportedModelError` naming ``who`` (e.g. a trainer) if ``model`` cannot take images in
    prefix-shared batches (no Qwen2-VL-style ``get_rope_index``: Gemma 3, LLaVA-style models ...): for a trainer
    given a dataset with images, so that it refuses in its constructor rather than at its first step."""
    if _rope_index_owner(model) is None:
        name = type(unwrap_model(model)).__name__
        raise UnsupportedModelError(
            f"{who}: images in prefix-shared batches are supported only in models that place image tokens by 3D "
            "multimodal rotary positions computed by a get_rope_index(input_ids, mm_token_type_ids, image_grid_thw) "
            f"(Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V), and {name} has none: its image tokens follow rules the "
            "layout does not apply (Gemma 3's image tokens attend to each other in both directions inside an image; "
            "LLaVA-style models are not verified). Train it with the plain trainer, or on text-only data"
        )


def _refuse(model, given: list[str], why: str) -> None:
    name = type(unwrap_model(model)).__name__
    raise UnsupportedModelError(
        f"prefixshare: a prefix-shared batch for {name} carries {', '.join(given)}: {why}. Train such examples in the "
        "paired format (PairedCollator without packing, through the unpatched forward), or keep the batches text-only."
    )


def multimodal_inputs(model, kwargs: dict, layout) -> dict:
    """The forward's keyword arguments for a prefix-shared batch, with 3D positions when it carries images.

    Returns ``kwargs`` itself when the batch carries no image, video or audio input; otherwise a copy whose
    ``position_ids`` are ``[4, B, L]`` (see the module docstring) and with ``mm_token_type_ids`` (1 at image
    tokens) as the model's processor gives them.

    Raises:
        UnsupportedModelError: videos or audio (any model), or images in a model whose image tokens are not placed
            by 3D rotary positions alone (no ``get_rope_index`` of the Qwen2-VL form: Gemma 3, LLaVA-style ...).
        ValueError: naming the example: a prompt whose image tokens do not match its ``image_grid_thw``, image
            tokens in a response; or inputs that do not come from the collator (position_ids not ``[B, L]``,
            grids that do not match the layout's units, no ``input_ids``).
    """
    media = IMAGE_INPUTS + _OTHER_MEDIA
    given = [k for k, v in kwargs.items() if v is not None and (k.startswith("pixel_values") or k in media)]
    if not given:
        return kwargs
    other = [k for k in given if k not in IMAGE_INPUTS]
    if other:
        _refuse(model, given, "videos and audio are not supported in prefix-shared batches (only images, in models "
                "with Qwen2-VL-style 3D rotary positions)")
    owner = _rope_index_owner(model)
    if owner is None:
        _refuse(
            model,
            given,
            "images in prefix-shared batches are supported only in models that place image tokens by 3D multimodal "
            "rotary positions computed by a get_rope_index(input_ids, mm_token_type_ids, image_grid_thw) (Qwen2-VL, "
            "Qwen2.5-VL, Qwen3-VL), and this model has none; its image tokens follow rules of their own that the "
            "layout does not apply (Gemma 3's image tokens attend to each other in both directions inside an image)",
        )
    missing = [k for k in ("input_ids", *IMAGE_INPUTS) if kwargs.get(k) is None]
    if missing:
        raise ValueError(
            f"prefixshare: a prefix-shared batch with images needs {', '.join(missing)} as keyword arguments "
            "(model(**batch) passes them)"
        )
    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.dim() != 2:
        raise ValueError(
            "prefixshare: pass the batch's [B, L] position_ids with images (model(**batch) does); the 3D multimodal "
            "positions are computed from the layout and the images"
        )
    config = owner.config
    image_token = config.image_token_id
    input_ids = kwargs["input_ids"]
    ids = input_ids.detach().cpu()  # one device read; get_rope_index loops over token types in Python anyway
    grids = kwargs["image_grid_thw"].detach().cpu().long()
    if grids.dim() != 2 or grids.shape[1] != 3:
        raise ValueError(f"prefixshare: image_grid_thw must be [n_images, 3], got shape {tuple(grids.shape)}")
    placements = sorted(layout.placements, key=lambda pl: (pl.row, pl.offset))
    expected = sum(pl.unit.num_images for pl in placements)
    if expected != grids.shape[0]:
        raise ValueError(
            f"prefixshare: image_grid_thw has {grids.shape[0]} images but the batch's units hold {expected}; build "
            "the batch with the collator from examples that carry pixel_values and image_grid_thw"
        )
    merge = config.vision_config.spatial_merge_size
    B, L = layout.shape
    positions = torch.zeros((3, B, L), dtype=torch.long)
    is_image = ids == image_token
    cursor = 0
    for pl in placements:
        unit, start = pl.unit, pl.offset
        own = grids[cursor : cursor + unit.num_images]
        cursor += unit.num_images
        prompt_end = start + unit.prompt_length
        tokens = int(is_image[pl.row, start:prompt_end].sum())
        wanted = int((own.prod(-1) // merge**2).sum())
        if tokens != wanted:
            raise ValueError(
                f"prefixshare: example {unit.example}: its prompt holds {tokens} image tokens (id {image_token}) but "
                f"its image_grid_thw {own.tolist()} gives {wanted} (t * h * w / {merge}**2 per image); give the prompt "
                "ids with the image tokens expanded by the model's processor"
            )
        at = prompt_end
        for slot, n in zip(unit.response_slots, unit.response_lengths):
            if bool(is_image[pl.row, at : at + n].any()):
                raise ValueError(
                    f"prefixshare: example {unit.example}: response {slot} holds image tokens (id {image_token}); "
                    "images are supported in the prompt only (the responses of a unit share its images)"
                )
            at += n
        longest = max(range(len(unit.response_lengths)), key=unit.response_lengths.__getitem__)
        # the prompt followed by its longest response: every response's positions are a prefix of that run's
        first = prompt_end + sum(unit.response_lengths[:longest])
        response = ids[pl.row, first : first + unit.response_lengths[longest]]
        sequence = torch.cat([ids[pl.row, start:prompt_end], response])
        types = (sequence == image_token).int()
        computed, _ = owner.get_rope_index(
            input_ids=sequence[None], mm_token_type_ids=types[None], image_grid_thw=own if len(own) else None
        )
        computed = computed[:, 0].to(torch.long)  # [3, prompt + longest response]
        positions[:, pl.row, start:prompt_end] = computed[:, : unit.prompt_length]
        at = prompt_end
        for n in unit.response_lengths:
            positions[:, pl.row, at : at + n] = computed[:, unit.prompt_length : unit.prompt_length + n]
            at += n
    device = input_ids.device
    updated = dict(kwargs)
    updated["position_ids"] = torch.cat([position_ids[None].to(device), positions.to(device)])
    types = is_image.to(device=device, dtype=torch.int32)
    given_types = kwargs.get("mm_token_type_ids")
    if given_types is not None and not torch.equal(given_types.to(device=device, dtype=torch.int32), types):
        raise ValueError(
            "prefixshare: the batch's mm_token_type_ids do not mark exactly its image tokens (1 at image tokens, "
            "0 elsewhere); leave them out, prefixshare builds them from input_ids"
        )
    updated["mm_token_type_ids"] = types
    return updated
