"""``prefixshare stats``: what prefix sharing saves on a preference dataset, before training on it.

Reads json / jsonl (optionally gzipped) in the formats users have: standard (``prompt``/``chosen``/``rejected``
strings), conversational (lists of ``{"role", "content"}`` messages), implicit-prompt pairs such as HH-RLHF
(``chosen``/``rejected`` holding the whole dialogue), and ShareGPT-style ``conversations`` with
``chosen``/``rejected`` turns (LLaMA-Factory). Tokenizes with :func:`prefixshare.tokenize_preference`.
"""

from __future__ import annotations

import gzip
import json
import statistics
import warnings
from dataclasses import dataclass

from .collators import PairedCollator, PrefixShareCollator
from .tokenization import tokenize_preference

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _open(path):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _sharegpt(example: dict, index: int) -> dict:
    def message(turn):
        role = turn.get("from", turn.get("role"))
        if role not in _ROLES:
            raise ValueError(f"example {index}: unknown speaker {role!r} in conversations")
        return {"role": _ROLES[role], "content": turn.get("value", turn.get("content"))}

    return {
        "prompt": [message(t) for t in example["conversations"]],
        "chosen": [message(example["chosen"])],
        "rejected": [message(example["rejected"])],
    }


def load_preference_file(path: str, limit: int | None = None) -> list[dict]:
    """Examples of a json (a list) or jsonl file, ShareGPT-style rows turned into conversations."""
    with _open(path) as f:
        text = f.read()
    stripped = text.lstrip()
    rows = json.loads(text) if stripped.startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: example {i} is a {type(row).__name__}, expected an object")
        out.append(_sharegpt(row, i) if "conversations" in row else row)
    return out


def _plain_text(messages) -> str:
    """A conversation as plain text, for tokenizers without a chat template (HH-RLHF's own convention)."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in messages)


def tokenize_all(examples: list[dict], tokenizer) -> list[dict]:
    """Token ids of every example; conversations become plain text if the tokenizer has no chat template."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    out = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, example in enumerate(examples):
            out.append(_tokenize_one(example, i, tokenizer, has_template))
    if caught:
        # one line for the dataset instead of one per example
        first = str(caught[0].message)
        warnings.warn(f"{len(caught)} of {len(examples)} examples warned while tokenizing; the first: {first}", stacklevel=2)
    return out


def _tokenize_one(example: dict, i: int, tokenizer, has_template: bool) -> dict:
    if not has_template and isinstance(example.get("chosen"), list):
        example = {
            "prompt": _plain_text(example.get("prompt", [])) + "\n\nAssistant:",
            "chosen": " " + example["chosen"][-1]["content"],
            "rejected": " " + example["rejected"][-1]["content"],
        }
    try:
        ids = tokenize_preference(example, tokenizer)
    except ValueError as error:
        raise ValueError(f"example {i}: {error}") from error
    return {k: ids[k] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")}


@dataclass
class DatasetStats:
    examples: int
    median_prompt: float
    median_chosen: float
    median_rejected: float
    paired_tokens: int
    shared_tokens: int
    paired_attention: float
    shared_attention: float
    paired_rows: int | None = None
    shared_rows: int | None = None

    @property
    def token_speedup(self) -> float:
        """Ideal speedup of the linear layers (token count): paired over shared."""
        return self.paired_tokens / self.shared_tokens

    @property
    def attention_speedup(self) -> float:
        """Ideal speedup of causal attention (query-key pairs computed): paired over shared."""
        return self.paired_attention / self.shared_attention


def dataset_stats(examples: list[dict], max_tokens_per_row: int | None = None) -> DatasetStats:
    """Token and attention-pair counts of both formats (padding-free) and packed row counts for a budget."""
    p = [len(e["prompt_input_ids"]) for e in examples]
    c = [len(e["chosen_input_ids"]) for e in examples]
    r = [len(e["rejected_input_ids"]) for e in examples]

    def pairs(n):  # query-key pairs of causal attention over n tokens
        return n * (n + 1) / 2

    stats = DatasetStats(
        examples=len(examples),
        median_prompt=statistics.median(p),
        median_chosen=statistics.median(c),
        median_rejected=statistics.median(r),
        paired_tokens=sum(2 * pi + ci + ri for pi, ci, ri in zip(p, c, r)),
        shared_tokens=sum(pi + ci + ri for pi, ci, ri in zip(p, c, r)),
        paired_attention=sum(pairs(pi + ci) + pairs(pi + ri) for pi, ci, ri in zip(p, c, r)),
        shared_attention=sum(pairs(pi + ci) + ri * pi + pairs(ri) for pi, ci, ri in zip(p, c, r)),
    )
    if max_tokens_per_row:
        stats.paired_rows = PairedCollator(0, max_tokens_per_row=max_tokens_per_row)(examples).layout.shape[0]
        stats.shared_rows = PrefixShareCollator(0, max_tokens_per_row=max_tokens_per_row)(examples).layout.shape[0]
    return stats


def format_stats(name: str, s: DatasetStats) -> str:
    lines = [
        f"{name}: {s.examples} examples",
        f"  median tokens: prompt {s.median_prompt:g}, chosen {s.median_chosen:g}, rejected {s.median_rejected:g}",
        f"  tokens (no padding): paired {s.paired_tokens:,}, prefix-shared {s.shared_tokens:,}",
        f"  predicted speedup: {s.token_speedup:.2f}x on linear layers (tokens), "
        f"{s.attention_speedup:.2f}x on attention (query-key pairs)",
    ]
    if s.paired_rows is not None:
        lines.append(f"  packed rows: paired {s.paired_rows}, prefix-shared {s.shared_rows}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- online RL groups
def load_prompts(path: str, limit: int | None = None) -> list:
    """The prompts of a json / jsonl(.gz) file, for ``prefixshare stats --group``: each example's ``prompt`` (a
    string or a list of messages), or the messages of ``messages`` / ShareGPT ``conversations`` before the last
    assistant turn. Errors name the example."""
    with _open(path) as f:
        text = f.read()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    prompts = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: example {i} is a {type(row).__name__}, expected an object")
        if "prompt" in row:
            prompts.append(row["prompt"])
            continue
        turns = row.get("messages", row.get("conversations"))
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{path}: example {i} has no 'prompt', 'messages' or 'conversations' field")
        messages = [_sharegpt({"conversations": [t], "chosen": t, "rejected": t}, i)["prompt"][0] for t in turns]
        while messages and messages[-1]["role"] == "assistant":  # the answer is what the policy generates
            messages.pop()
        if not messages:
            raise ValueError(f"{path}: example {i} holds assistant turns only; no prompt")
        prompts.append(messages)
    return prompts


def tokenize_prompts(prompts: list, tokenizer) -> list[list[int]]:
    """Token ids of each prompt as a GRPO/RLOO trainer builds them: a string with the tokenizer's special tokens,
    messages with the chat template and the generation prompt (plain text without a template)."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            out.append(list(tokenizer(prompt)["input_ids"]))
        elif isinstance(prompt, list) and has_template:
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
        elif isinstance(prompt, list):
            out.append(list(tokenizer(_plain_text(prompt) + "\n\nAssistant:")["input_ids"]))
        else:
            raise ValueError(f"example {i}: the prompt is a {type(prompt).__name__}; expected a string or a list of messages")
    return out


def prompt_ids_of_file(path: str, tokenizer, limit: int | None = None) -> list[list[int]]:
    """Tokenized prompts of a prompt dataset (:func:`load_prompts`) or of a preference dataset (its examples'
    prompts as :func:`tokenize_all` splits them, implicit prompts included: HH-RLHF, ShareGPT pairs)."""
    rows = load_preference_file(path, limit=limit)
    if rows and all("chosen" in row and "rejected" in row for row in rows):
        return [e["prompt_input_ids"] for e in tokenize_all(rows, tokenizer)]
    return tokenize_prompts(load_prompts(path, limit=limit), tokenizer)


@dataclass
class GroupStats:
    """Token and attention-pair counts of ``G`` completions of ``C`` tokens per prompt: TRL's rows (the prompt
    in every row, padding-free) vs prefix-shared units (the prompt once per group)."""

    prompts: int
    median_prompt: float
    group_size: int
    completion_length: int
    rows_tokens: int
    shared_tokens: int
    rows_attention: float
    shared_attention: float

    @property
    def token_speedup(self) -> float:
        """The ideal speedup of the linear layers: ``sum G(p + C) / sum (p + G C)``."""
        return self.rows_tokens / self.shared_tokens

    @property
    def attention_speedup(self) -> float:
        return self.rows_attention / self.shared_attention


def group_stats(prompt_ids: list[list[int]], group_size: int, completion_length: int) -> GroupStats:
    """:class:`GroupStats` of tokenized prompts for ``group_size`` completions of ``completion_length`` tokens."""
    if not prompt_ids:
        raise ValueError("no prompts")
    G, C = group_size, completion_length
    p = [len(ids) for ids in prompt_ids]

    def pairs(n):  # query-key pairs of causal attention over n tokens
        return n * (n + 1) / 2

    return GroupStats(
        prompts=len(p),
        median_prompt=statistics.median(p),
        group_size=G,
        completion_length=C,
        rows_tokens=sum(G * (pi + C) for pi in p),
        shared_tokens=sum(pi + G * C for pi in p),
        rows_attention=sum(G * pairs(pi + C) for pi in p),
        shared_attention=sum(pairs(pi + C) + (G - 1) * (C * pi + pairs(C)) for pi in p),
    )


def format_group_stats(name: str, s: GroupStats) -> str:
    return "\n".join([
        f"{name}: {s.prompts} prompts, median {s.median_prompt:g} tokens; G = {s.group_size} completions of "
        f"{s.completion_length} tokens each",
        f"  tokens, all prompts with G completions each: rows (TRL) {s.rows_tokens:,}, prefix-shared groups "
        f"{s.shared_tokens:,}",
        f"  group ideal: {s.token_speedup:.2f}x on linear layers (tokens, G(p + c) / (p + Gc)), "
        f"{s.attention_speedup:.2f}x on attention (query-key pairs)",
    ])  # fmt: skip
