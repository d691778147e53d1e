"""prefixshare bench --groups and prefixshare stats --group: the online RL (GRPO/RLOO) profiles, on CPU.

These fail on the main this branch started from: neither the group bench nor the group statistics existed.
"""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

import prefixshare
from prefixshare.tools import bench_groups, cli
from prefixshare.tools.stats import group_stats
from prefixshare.testing import tiny_model


def test_group_stats_counts_tokens_and_attention_pairs():
    s = group_stats([[1] * 10, [1] * 30], group_size=4, completion_length=5)
    assert s.rows_tokens == 4 * 15 + 4 * 35 and s.shared_tokens == (10 + 20) + (30 + 20)
    assert s.token_speedup == pytest.approx((4 * 15 + 4 * 35) / 80)  # G(p + c) / (p + Gc), summed

    def pairs(n):
        return n * (n + 1) / 2

    assert s.rows_attention == 4 * pairs(15) + 4 * pairs(35)
    assert s.shared_attention == pairs(15) + 3 * (5 * 10 + pairs(5)) + pairs(35) + 3 * (5 * 30 + pairs(5))
    assert group_stats([[1] * 7], 1, 9).token_speedup == 1.0  # one completion: nothing to share


def test_rows_layout_gives_the_numbers_of_the_shared_layout():
    """The bench's rows format (TRL's left-padded prompts, right-padded completions) and the prefix-shared groups
    compute the same per-token log-probs: the bench compares the cost of one computation in two layouts."""
    model = prefixshare.patch(tiny_model("llama"))
    lengths = bench_groups.group_lengths("multi-turn-chat", 3, 4, seed=1, scale=0.01)
    prompts, completions = bench_groups.group_ids(lengths, vocab_size=96)
    rows = bench_groups.rows_groups(prompts, completions, 4)
    layout = rows.batches[0]["prefixshare_layout"]
    assert layout.shape == (12, max(map(len, prompts)) + max(map(len, completions)))  # TRL's [rows, P + C]
    shared = prefixshare.group_completions(prompts, completions, num_generations=4)
    a, b = prefixshare.completion_logps(model, rows), prefixshare.completion_logps(model, shared)
    assert torch.equal(a.mask, b.mask)
    assert float((a.logps - b.logps).abs().max()) < 1e-5 * float(b.logps.abs().max())


def test_bench_groups_runs_side_by_side(tmp_path, capsys):
    cli.main([
        "bench", "--groups", "--group-profiles", "long-context-qa", "--group-sizes", "2,4", "--length-scale", "0.01",
        "--steps", "1", "--rounds", "1", "--out-dir", str(tmp_path), "--name", "g",
    ])  # fmt: skip
    table = capsys.readouterr().out
    assert "| long-context-qa |" in table and "rows completions/s (x)" in table
    data = json.loads((tmp_path / "g.json").read_text())
    cells = {(m["group_size"], m["mode"], m["format"]): m for m in data["measurements"]}
    assert set(cells) == {(G, mode, f) for G in (2, 4) for mode in bench_groups.MODES for f in bench_groups.GROUP_FORMATS}
    for G in (2, 4):  # the ideal is the ratio of the real tokens the two layouts held
        rows, shared = cells[(G, "train", "rows")], cells[(G, "train", "shared")]
        assert data["ideal"][f"long-context-qa/G{G}"] == pytest.approx(rows["tokens_real"] / shared["tokens_real"])
        assert rows["rows"] == 2 * G and shared["rows"] == 2  # one row per completion vs one per group
    assert data["ideal"]["long-context-qa/G4"] > data["ideal"]["long-context-qa/G2"] > 1.5
    assert (tmp_path / "g.md").read_text().startswith("Produced by `prefixshare bench --groups")


def test_stats_group_on_prompt_and_preference_files(tmp_path, capsys):
    from prefixshare.data import toy_tokenizer

    tokenizer_dir = tmp_path / "tok"
    toy_tokenizer().save_pretrained(tokenizer_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": "x" * n}) for n in (9, 19, 29)) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    cli.main(["stats", str(prompts), "--tokenizer", str(tokenizer_dir), "--group", "8", "--completion-length", "10"])
    out = capsys.readouterr().out
    # BOS + 9, 19, 29 characters, and the chat prompt as plain text: "\n\nHuman: hi\n\nAssistant:" + BOS = 24
    expected = group_stats([[0] * 10, [0] * 20, [0] * 30, [0] * 24], 8, 10)
    assert "4 prompts, median 22 tokens; G = 8 completions of 10 tokens" in out
    assert f"group ideal: {expected.token_speedup:.2f}x" in out
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "abc", "chosen": "d", "rejected": "e"}) + "\n")
    cli.main(["stats", str(pairs), "--tokenizer", str(tokenizer_dir), "--group", "2", "--completion-length", "3"])
    assert "1 prompts, median 4 tokens" in capsys.readouterr().out  # the pair's prompt: BOS + "abc"


class _Terminal(io.StringIO):
    """stderr as a terminal: the tokenizing bars show only where stderr is one (tqdm's ``disable=None``)."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("group", [False, True], ids=["stats", "stats --group"])
def test_stats_shows_a_tokenizing_progress_bar_on_a_terminal(group, tmp_path, monkeypatch):
    """Issue #13: a progress bar on every long command. ``stats --group`` had none on the main this started
    from (its tokenize call took no ``progress``): that case fails there; plain ``stats`` is the control."""
    from prefixshare.data import toy_tokenizer

    toy_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "abc", "chosen": "d", "rejected": "e"}) + "\n")
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    argv = ["stats", str(tmp_path / "pairs.jsonl"), "--tokenizer", str(tmp_path / "tok")]
    cli.main(argv + (["--group", "2", "--completion-length", "3"] if group else []))
    assert "tokenizing: 100%" in err.getvalue()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--groups", "--group-profiles", "math"], "unknown group profile(s) ['math']"),
        (["bench", "--groups", "--modes", "train,eval"], "--modes takes a comma-separated subset of train, logprob"),
        (["bench", "--groups", "--profiles", "tldr"], "choose them with --group-profiles"),
        (["bench", "--groups", "--group-sizes", "0"], "--group-sizes takes comma-separated positive integers"),
    ],
)
def test_bench_groups_rejects_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert message in capsys.readouterr().err


def test_stats_group_needs_both_options(tmp_path, capsys):
    from prefixshare.data import toy_tokenizer

    toy_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(SystemExit):
        cli.main(["stats", str(tmp_path / "p.jsonl"), "--tokenizer", str(tmp_path / "tok"), "--group", "4"])
    assert "--group G and --completion-length C go together" in capsys.readouterr().err
    (tmp_path / "q.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(SystemExit):
        cli.main(["stats", str(tmp_path / "q.jsonl"), "--tokenizer", str(tmp_path / "tok"), "--group", "4",
                  "--completion-length", "2"])  # fmt: skip
    assert "example 0 has no 'prompt', 'messages' or 'conversations' field" in capsys.readouterr().err
