"""Preference data -> token ids, with the token boundaries of TRL's ``DPOTrainer`` (TRL 1.x).

:func:`tokenize_preference` turns a preference example (or a batch of them) into the
``prompt_input_ids``, ``chosen_input_ids`` and ``rejected_input_ids`` that
:class:`~prefixshare.PrefixShareCollator` takes, splitting prompt and completions exactly where TRL 1.16's
``DPOTrainer`` splits them, so that a model trained with either sees the same tokens::

    from prefixshare import tokenize_preference

    dataset = dataset.map(tokenize_preference, fn_kwargs={"tokenizer": tokenizer})                 # one row a call
    dataset = dataset.map(tokenize_preference, fn_kwargs={"tokenizer": tokenizer}, batched=True)   # or batches

What TRL does, and so what this does:

* **Formats.** *Standard*: ``prompt``, ``chosen`` and ``rejected`` are strings. *Conversational*: they are lists
  of ``{"role", "content"}`` messages, rendered with the tokenizer's chat template (the prompt alone with
  ``add_generation_prompt=True``; an example's ``tools`` and ``chat_template_kwargs`` fields are passed to the
  template). Without a ``prompt`` field the prompt is *implicit*: the longest common start of ``chosen`` and
  ``rejected`` (whole messages for conversations, characters for strings, stepping back over one space), as
  TRL's ``extract_prompt``. A ``prompt`` of ``None`` is refused, not taken as implicit (TRL extracts the prompt only when
  the field is absent); any other type (numbers, token ids, a single message outside a list, a
  message without a ``role``) raises ValueError naming the field, its type and, in a batch, the example's index.
* **EOS.** In the standard format the tokenizer's EOS token (as text) is appended to ``chosen`` and
  ``rejected`` unless they already end with it; chat templates add their own end-of-turn tokens.
* **BOS and special tokens.** Strings are tokenized with the tokenizer's defaults (``add_special_tokens=True``:
  a BOS in front where the tokenizer adds one); conversations through ``apply_chat_template``, whose template
  writes its own BOS.
* **Boundaries.** The prompt is tokenized alone, and again followed by each completion; the completion starts
  where these token sequences first differ (normally right after the prompt; earlier when tokens merge across
  the boundary or the template renders a prompt alone differently, which warns, as TRL does). The prompt's ids
  are therefore the same for chosen and rejected: computed once in a prefix-shared batch.
* **Truncation** (``max_length``): TRL 1.16 has one limit, ``DPOConfig.max_length`` (default 1024), applied to each
  prompt+completion sequence with ``truncation_mode="keep_start"``: the completions are cut to
  ``max_length - len(prompt)`` tokens. TRL drops examples whose prompt alone has ``max_length`` tokens or more;
  a single example cannot be dropped here, so such an example raises (filter on ``len(prompt_input_ids)``
  first). TRL truncates in its collator, at batch time; :class:`~prefixshare.PrefixShareCollator` does the same
  with ``max_length=..., truncation="truncate_responses"``, so truncating here is optional. (TRL 1.16 has no
  ``max_prompt_length`` / ``max_completion_length`` any more.)

Images (vision-language data) are not supported.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["tokenize_preference"]

OUTPUT_KEYS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


# ---------------------------------------------------------------------------------------------- format detection
TEXT_FIELDS = ("prompt", "chosen", "rejected")

EXPECTED = "a string (standard format) or a non-empty list of {'role', 'content'} messages (conversational format)"


def _is_single(example: Mapping) -> bool:
    """One example rather than a batch: a batch holds a list of strings or of conversations (lists) per field.

    Anything else (a number, None, a single message, a list of ids) is taken as one example, whose check then
    names the field and what it holds, instead of being iterated as a batch.
    """
    value = example["chosen"]
    if not isinstance(value, (list, tuple)):
        return True
    return len(value) > 0 and not isinstance(value[0], (str, list, tuple))


def _describe(value: Any) -> str:
    """A short account of a value for error messages: its type, and the types of a list's items."""
    if isinstance(value, (list, tuple)):
        if not value:
            return f"an empty {type(value).__name__}"
        return f"a {type(value).__name__} of {'/'.join(sorted({type(v).__name__ for v in value}))}"
    if value is None:
        return "None"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _text_format(value: Any, field: str) -> str:
    """``"standard"`` or ``"conversational"`` for one text field, or a ValueError naming the field and its type."""
    if isinstance(value, str):
        return "standard"
    if isinstance(value, (list, tuple)) and value and any(isinstance(m, Mapping) for m in value):
        for j, message in enumerate(value):
            # the template would render a missing role as an empty string, silently
            if not isinstance(message, Mapping) or "role" not in message:
                raise ValueError(
                    f"{field!r}[{j}] is {_describe(message)}; every message of a conversation must be a mapping "
                    "with a 'role' (and its 'content')"
                )
        return "conversational"
    hint = ""
    if value is None and field == "prompt":
        hint = " (leave the 'prompt' field out for an implicit prompt, the common start of chosen and rejected)"
    elif isinstance(value, Mapping):
        hint = " (one message goes in a list: [message])"
    elif isinstance(value, int) or (isinstance(value, (list, tuple)) and value and isinstance(value[0], int)):
        hint = f" (token ids? tokenize_preference takes text; give ids to the collators as {field}_input_ids)"
    elif isinstance(value, (list, tuple)) and value and isinstance(value[0], (str, list, tuple)):
        hint = " (a batch of examples? pass batched=True)"
    raise ValueError(f"{field!r} is {_describe(value)}; expected {EXPECTED}{hint}")


# ---------------------------------------------------------------------------------------------- implicit prompt
def _split_implicit_prompt(chosen, rejected):
    """(prompt, chosen, rejected) from two completions that both start with the prompt (TRL's extract_prompt rule).

    The prompt ends at the first position where they differ, moved back by one if the character before it is a
    space (so the completions keep their leading space). When one is a prefix of the other, TRL's rule leaves the
    last compared position to the completions; this does the same.
    """
    n = min(len(chosen), len(rejected))
    if n == 0:
        raise ValueError("chosen and rejected must not be empty when the prompt is implicit (no 'prompt' field)")
    split = next((i for i in range(n) if chosen[i] != rejected[i]), None)
    if split is None:
        split = n - 1
    elif split == 0:
        raise ValueError(
            "chosen and rejected have no common beginning, so no implicit prompt can be extracted; "
            "give the prompt in a 'prompt' field"
        )
    elif chosen[split - 1] == " ":
        split -= 1
    return chosen[:split], chosen[split:], rejected[split:]


# ---------------------------------------------------------------------------------------------- tokenizer calls
def _flat_ids(ids) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    ids = list(ids)
    if ids and isinstance(ids[0], (list, tuple)):  # a batch of one
        if len(ids) != 1:
            raise ValueError(f"expected the token ids of one sequence, got a batch of {len(ids)}")
        ids = list(ids[0])
    return [int(t) for t in ids]


def _text_ids(tokenizer, text: str) -> list[int]:
    return _flat_ids(tokenizer(text=text)["input_ids"])


def _chat_ids(tokenizer, messages, **template_kwargs) -> list[int]:
    encoded = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True, **template_kwargs)
    return _flat_ids(encoded["input_ids"])


def _template_kwargs(example: Mapping) -> dict:
    tools = example.get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools)
    extra = example.get("chat_template_kwargs") or {}
    if not isinstance(extra, Mapping):
        raise ValueError(f"chat_template_kwargs must be a mapping, got {type(extra).__name__}")
    return {"tools": tools, **extra}


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------------------------------------- one example
def _tokenize_one(example: Mapping, tokenizer, max_length: int | None) -> dict[str, list[int]]:
    if "image" in example or "images" in example:
        raise ValueError("tokenize_preference does not support vision-language examples (an 'image(s)' field)")
    for key in ("chosen", "rejected"):
        if key not in example:
            raise ValueError(f"a preference example needs a {key!r} field")
    # An absent prompt is implicit; a prompt of None is refused (a missing value, not a request to extract one).
    fields = [key for key in TEXT_FIELDS if key in example]
    formats = {key: _text_format(example[key], key) for key in fields}
    if len(set(formats.values())) > 1:
        raise ValueError(
            "prompt, chosen and rejected must all be strings (standard format) or all be lists of "
            "{'role', 'content'} messages (conversational format); got "
            + ", ".join(f"{key}: {'a string' if formats[key] == 'standard' else 'messages'}" for key in fields)
        )
    chosen, rejected, prompt = example["chosen"], example["rejected"], example.get("prompt")
    conversational = formats["chosen"] == "conversational"
    if prompt is None:
        if conversational:
            chosen, rejected = list(chosen), list(rejected)
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected)

    if conversational:
        template_kwargs = _template_kwargs(example)
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True, **template_kwargs)
        chosen_full = _chat_ids(tokenizer, list(prompt) + list(chosen), **template_kwargs)
        rejected_full = _chat_ids(tokenizer, list(prompt) + list(rejected), **template_kwargs)
    else:
        eos = tokenizer.eos_token
        if not eos:
            raise ValueError(
                "the tokenizer has no eos_token; the standard format appends it to chosen and rejected (as TRL does)"
            )
        if not chosen.endswith(eos):
            chosen = chosen + eos
        if not rejected.endswith(eos):
            rejected = rejected + eos
        prompt_ids = _text_ids(tokenizer, prompt)
        chosen_full = _text_ids(tokenizer, prompt + chosen)
        rejected_full = _text_ids(tokenizer, prompt + rejected)

    # The completion starts where the prompt's tokens and prompt+completion's tokens part.
    prompt_length = min(common_prefix_length(prompt_ids, chosen_full), common_prefix_length(prompt_ids, rejected_full))
    if prompt_length < len(prompt_ids):
        warnings.warn(
            "tokenize_preference: the tokenized prompt is not a prefix of the tokenized prompt+completion (tokens "
            "merge across the boundary, or the chat template renders the prompt alone differently); the completion "
            f"starts where they part, and the prompt's last tokens {prompt_ids[prompt_length:]} are left out, as TRL "
            "does. End prompts on a token boundary to avoid it.",
            stacklevel=3,
        )
    out = {
        "prompt_input_ids": prompt_ids[:prompt_length],
        "chosen_input_ids": chosen_full[prompt_length:],
        "rejected_input_ids": rejected_full[prompt_length:],
    }
    if max_length is not None:
        if prompt_length >= max_length:
            raise ValueError(
                f"the prompt has {prompt_length} tokens, max_length={max_length} leaves no completion token "
                "(TRL's DPOTrainer drops such examples: filter them out, e.g. on len(prompt_input_ids) < max_length)"
            )
        keep = max_length - prompt_length
        out["chosen_input_ids"] = out["chosen_input_ids"][:keep]
        out["rejected_input_ids"] = out["rejected_input_ids"][:keep]
    return out


# ---------------------------------------------------------------------------------------------- public
def tokenize_preference(
    example: Mapping,
    tokenizer,
    *,
    max_length: int | None = None,
    batched: bool | None = None,
) -> dict[str, list]:
    """Token ids of a preference example, split into prompt and completions as TRL's ``DPOTrainer`` splits them.

    Args:
        example: a mapping with ``chosen`` and ``rejected`` (and usually ``prompt``), strings (standard format)
            or lists of messages (conversational format; optional ``tools`` and ``chat_template_kwargs``
            fields go to the chat template). Or a batch: the same keys mapping to lists of such values, as
            ``datasets.Dataset.map(..., batched=True)`` passes them.
        tokenizer: a Hugging Face tokenizer (with a chat template for conversational data).
        max_length: if set, truncate as TRL does with ``DPOConfig.max_length`` (``truncation_mode="keep_start"``):
            each completion is cut so that prompt + completion has at most ``max_length`` tokens. An example
            whose prompt alone has ``max_length`` tokens or more raises ValueError (TRL drops those).
        batched: ``True`` if ``example`` is a batch, ``False`` if it is one example, ``None`` (default) to tell
            from the values (a batch holds lists of strings or of conversations).

    Returns:
        ``{"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}``: lists of ints for one example, lists
        of such lists for a batch. These are the keys :class:`~prefixshare.PrefixShareCollator` reads.

    See the module docstring for the rules (EOS, BOS, implicit prompts, boundaries). The ids equal the
    ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` columns TRL 1.16's ``DPOTrainer`` builds from the same
    example and tokenizer.
    """
    if not isinstance(example, Mapping):
        raise TypeError(f"example must be a mapping (a dataset row or batch), got {type(example).__name__}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
    if "chosen" not in example:
        raise ValueError("a preference example needs a 'chosen' field")
    if batched is None:
        batched = not _is_single(example)
    if not batched:
        return _tokenize_one(example, tokenizer, max_length)

    for key in TEXT_FIELDS:
        # a string here would be repeated for every example (one example forced batched: once per character)
        if key in example and not isinstance(example[key], (list, tuple)):
            raise ValueError(
                f"a batch needs a list with one entry per example in {key!r}, got {_describe(example[key])}"
                + (" (one example? leave batched unset or pass batched=False)" if _is_single(example) else "")
            )
    size = len(example["chosen"])
    for key, values in example.items():
        if isinstance(values, (list, tuple)) and len(values) != size:
            raise ValueError(f"batch field {key!r} has {len(values)} entries but 'chosen' has {size}")
    out: dict[str, list] = {key: [] for key in OUTPUT_KEYS}
    for i in range(size):
        # other fields (tools, chat_template_kwargs) may be one value for the whole batch
        row = {key: values[i] if isinstance(values, (list, tuple)) else values for key, values in example.items()}
        try:
            ids = _tokenize_one(row, tokenizer, max_length)
        except ValueError as error:
            raise ValueError(f"example {i} of the batch: {error}") from error
        for key in OUTPUT_KEYS:
            out[key].append(ids[key])
    return out
