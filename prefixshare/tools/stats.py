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

from ..collators import PairedCollator, PrefixShareCollator
from ..tokenization import tokenize_preference

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
