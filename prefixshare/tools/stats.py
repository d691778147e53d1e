"""``prefixshare stats``: what prefix sharing saves on a preference dataset, before training on it.

Reads every format :func:`prefixshare.data.load_preferences` reads (json / jsonl, gzipped or not; standard,
conversational, implicit prompt, ShareGPT) and tokenizes with :func:`prefixshare.data.tokenize_preferences`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ..collators import PairedCollator, PrefixShareCollator


def _attention_pairs(n: int) -> float:
    """Query-key pairs of causal attention over ``n`` tokens."""
    return n * (n + 1) / 2


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
    pairs = _attention_pairs  # short: the formulas below read as written on paper
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
def prompt_ids_of_file(path: str, tokenizer, limit: int | None = None, progress: bool = False) -> list[list[int]]:
    """Tokenized prompts of a prompt dataset (:func:`load_prompts`) or of a preference dataset (its examples'
    prompts as :func:`prefixshare.data.tokenize_preferences` splits them, implicit prompts included: HH-RLHF, ShareGPT pairs).
    ``progress=True``: a progress bar while tokenizing (as ``prefixshare stats`` shows for preference data)."""
    from ..data import load_preferences, load_prompts, tokenize_preferences, tokenize_prompts

    try:
        rows = load_preferences(path, limit=limit)
    except ValueError:  # not preference pairs: a prompt dataset
        return tokenize_prompts(load_prompts(path, limit=limit), tokenizer, progress=progress)
    return [e["prompt_input_ids"] for e in tokenize_preferences(tokenizer, rows, progress=progress)]


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
    pairs = _attention_pairs  # short: the formulas below read as written on paper
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
