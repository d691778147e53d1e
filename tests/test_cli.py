"""prefixshare stats and prefixshare bench: small runs on CPU."""

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

from prefixshare.tools import bench, cli
from prefixshare.data import load_preferences
from prefixshare.tools.stats import dataset_stats

SHARED = Path(os.environ.get("PREFIXSHARE_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def test_dataset_stats_counts_tokens_and_attention_pairs():
    examples = [dict(prompt_input_ids=[5] * 6, chosen_input_ids=[6] * 2, rejected_input_ids=[7] * 4)]
    s = dataset_stats(examples, max_tokens_per_row=12)
    assert (s.paired_tokens, s.shared_tokens) == (18, 12)
    # ideal linear speedup 2(p+c)/(p+2c) for one pair: here with unequal completions
    assert s.token_speedup == pytest.approx(18 / 12)
    # paired: 8*9/2 + 10*11/2; shared: prompt+chosen 36, rejected sees prompt 4*6 plus itself 10
    assert s.paired_attention == 36 + 55 and s.shared_attention == 36 + 24 + 10
    assert (s.paired_rows, s.shared_rows) == (2, 1)


def test_load_preference_file_formats(tmp_path):
    rows = [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "yo"},
         "rejected": {"from": "gpt", "value": "no"}},
    ]
    jsonl = tmp_path / "d.jsonl.gz"
    with gzip.open(jsonl, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    as_list = tmp_path / "d.json"
    as_list.write_text(json.dumps(rows))
    for path in (jsonl, as_list):
        loaded = load_preferences(str(path))
        assert loaded[0] == rows[0]
        assert loaded[1]["prompt"] == [{"role": "user", "content": "hi"}]
        assert loaded[1]["chosen"] == [{"role": "assistant", "content": "yo"}]
    (tmp_path / "bad.json").write_text(json.dumps([["not", "an", "object"]]))
    with pytest.raises(ValueError, match="example 0"):
        load_preferences(str(tmp_path / "bad.json"))


@pytest.mark.skipif(not (SHARED / "tokenizers").exists(), reason="needs ../shared (real tokenizer and data)")
def test_stats_on_real_data(capsys):
    cli.main([
        "stats", str(SHARED / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"), "--limit", "200",
        "--tokenizer", str(SHARED / "tokenizers" / "mistral-7b-v0.1-tokenizer.model"),
    ])
    captured = capsys.readouterr()
    out = captured.out
    assert "200 examples" in out and "predicted speedup" in out
    # what tokenizing noticed is a note on stderr, not a Python warning with its source line
    assert "prefixshare stats: note: " in captured.err and "UserWarning" not in captured.err
    speedup = float(out.split("predicted speedup: ")[1].split("x")[0])
    assert 1.3 < speedup < 1.8  # HH-RLHF: long prompts, short answers


def test_synthetic_profiles_match_their_medians():
    for name, (overall, ratio) in bench.PAPER_PROFILES.items():
        lengths = bench.synthetic_lengths(name, 400, seed=1)
        p = sorted(x[0] for x in lengths)[200]
        c = sorted(x[1] for x in lengths)[200]
        assert p + c == pytest.approx(overall, rel=0.15), name
        assert p / c == pytest.approx(ratio, rel=0.25), name


def test_bench_runs_side_by_side(tmp_path, capsys):
    cli.main([
        "bench", "--profiles", "tldr", "--backends", "sdpa,varlen", "--examples-per-step", "2", "--steps", "1",
        "--length-scale", "0.05", "--out-dir", str(tmp_path),
    ])
    out = capsys.readouterr().out
    for fmt in bench.FORMATS:
        assert f"{fmt} samples/s" in out
    data = json.loads((tmp_path / "bench-cpu-tiny.json").read_text())
    assert {m["format"] for m in data["measurements"]} == set(bench.FORMATS)
    assert {m["backend"] for m in data["measurements"]} == {"sdpa", "varlen"}
    assert (tmp_path / "bench-cpu-tiny.png").stat().st_size > 0


def test_bench_reward_model_format(tmp_path, capsys):
    """--reward-model: a sequence-classification model, every format; fails on main (no such option)."""
    cli.main([
        "bench", "--reward-model", "--profiles", "hh-rlhf", "--backends", "sdpa", "--examples-per-step", "2",
        "--steps", "1", "--length-scale", "0.1", "--out-dir", str(tmp_path),
    ])
    assert "model tiny reward model" in capsys.readouterr().out
    data = json.loads((tmp_path / "bench-cpu-tiny-rm.json").read_text())
    assert data["reward_model"] and {m["format"] for m in data["measurements"]} == set(bench.FORMATS)


def toy_data(folder, n):
    """(tokenizer directory, jsonl file of the first ``n`` shipped toy pairs), both written under ``folder``."""
    from prefixshare.data import load_toy_preferences, toy_tokenizer

    toy_tokenizer().save_pretrained(folder / "tokenizer")
    data = folder / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in load_toy_preferences()[:n]))
    return str(folder / "tokenizer"), str(data)


def test_bench_on_a_data_file(tmp_path, capsys):
    tokenizer_dir, data = toy_data(tmp_path, 4)
    cli.main([
        "bench", "--data", data, "--tokenizer", tokenizer_dir, "--backends", "sdpa", "--lora",
        "--gradient-checkpointing", "--examples-per-step", "2", "--steps", "1", "--out-dir", str(tmp_path),
        "--name", "real",
    ])
    assert "| pairs.jsonl | sdpa |" in capsys.readouterr().out  # only the file: no synthetic profile
    result = json.loads((tmp_path / "real.json").read_text())
    assert {m["profile"] for m in result["measurements"]} == {"pairs.jsonl"}
    assert result["lora"] and result["gradient_checkpointing"]
    # the ideal speedup is that of exactly the 4 examples the bench ran
    assert result["ideal"]["pairs.jsonl"] > 1.0


def test_bench_rejects_bad_input(tmp_path, capsys):
    tokenizer_dir, data = toy_data(tmp_path, 3)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--data", data, "--tokenizer", tokenizer_dir, "--examples-per-step", "2"])
    assert exit_info.value.code == 2
    assert "3 examples, the bench needs 8" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown profile"):
        cli.main(["bench", "--profiles", "tldr,hh_rlhf"])


def test_bench_reports_a_format_that_runs_out_of_memory_and_goes_on(monkeypatch, tmp_path):
    time_format = bench.time_format

    def out_of_memory_for_paired(model, collator, batches, device, native=False, **options):
        if isinstance(collator, bench.PairedCollator) and not native and collator.max_tokens_per_row is None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return time_format(model, collator, batches, device, native=native, **options)

    monkeypatch.setattr(bench, "time_format", out_of_memory_for_paired)
    examples = bench.examples_from_lengths(bench.synthetic_lengths("tldr", 4, scale=0.05), vocab_size=8192)
    result = bench.run_bench({"tldr": examples}, backends=["sdpa"], examples_per_step=2, steps=1, progress=False)
    assert result.out_of_memory == [
        dict(profile="tldr", backend="sdpa", format="paired", error="CUDA out of memory. Tried to allocate 2.00 GiB")
    ]
    assert {m.format for m in result.measurements} == set(bench.FORMATS) - {"paired"}
    row = next(line for line in bench.format_table(result).splitlines() if line.startswith("| tldr | sdpa |"))
    assert "| out of memory |" in row
    # the ratios are over the best paired format that ran
    ratios = result.ratios()[("tldr", "sdpa")]
    assert max(ratios["paired-native"], ratios["paired-packed"]) == 1.0 and "paired" not in ratios
    bench.save(result, str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["out_of_memory"][0]["format"] == "paired"


@pytest.mark.slow  # about 25 s: three fresh processes import torch and transformers
def test_bench_memory_mode(tmp_path, capsys):
    """The memory mode's plumbing at tiny sizes: every format in its own process, a table, JSON, a skipped cell.

    Even at this size the formats separate: the fused engine holds one [64, V] block, the [T, V] path
    all T rows, paired-native every position of both paired rows. Fails on main (no --memory).
    """
    from prefixshare.tools import bench_memory

    cli.main([
        "bench", "--memory", "--vocabs", "8192", "--tokens", "1024", "--hidden-size", "32", "--chunk-size", "64",
        "--repeats", "1", "--threads", "1", "--out-dir", str(tmp_path), "--name", "mem",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert "| 8192 | 1024 |" in out and "shared fused MB" in out
    result = json.loads((tmp_path / "mem.json").read_text())
    cells = {c["format"]: c for c in result["cells"]}
    assert set(cells) == set(bench_memory.MEMORY_FORMATS)
    native, tv, fused = (cells[f]["peak_mb"] for f in bench_memory.MEMORY_FORMATS)
    assert fused < tv / 4 and tv < native, (native, tv, fused)
    # [T, V] logits alone are 32 MiB here; the fused peak stays within 1.5x of one [64, V] block plus the hidden states
    assert tv > 32 and fused < 1.5 * (64 * 8192 * 4 / 2**20 + cells["shared fused"]["hidden_mb"]) + 1, fused
    assert (tmp_path / "mem.md").read_text().startswith("Produced by `prefixshare bench --memory")

    cli.main(["bench", "--memory", "--vocabs", "8192", "--tokens", "1024", "--memory-limit-gb", "0.001"])
    assert capsys.readouterr().out.count("skipped [s]") == 3
    with pytest.raises(SystemExit):
        cli.main(["bench", "--memory", "--vocabs", "32k"])
    assert "--vocabs takes comma-separated positive integers" in capsys.readouterr().err


def test_python_dash_m_prefixshare_runs_the_cli():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "prefixshare", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "bench" in result.stdout and "stats" in result.stdout


def test_bench_self_check_mode_counts_what_the_probe_runs(tmp_path, capsys):
    code = cli.main(["bench", "--self-check", "--shape", "test", "--backends", "sdpa,flex_attention", "--repeats", "1",
                     "--out-dir", str(tmp_path)])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "| test | 0.09M | sdpa | float32 |" in out
    rows = json.loads((tmp_path / "selfcheck-cpu.json").read_text())
    by_backend = {r["backend"]: r for r in rows}
    # 6 runs alone + 2 prefix-shared (no grad), then 1 prefix-shared + 6 alone with grad; FlexAttention on CPU has
    # no backward, so its probe stops after the forwards
    assert (by_backend["sdpa"]["forwards"], by_backend["sdpa"]["backwards"]) == (15, 7)
    assert (by_backend["flex_attention"]["forwards"], by_backend["flex_attention"]["backwards"]) == (9, 0)
    assert by_backend["flex_attention"]["compiled_graphs"] >= 0 and by_backend["sdpa"]["compiled_graphs"] is None


def test_bench_memory_prediction_covers_a_cells_peak(tmp_path):
    """The prediction that decides which cells run (bench.predicted_peak_bytes) against the peak resident memory of a
    process that runs one cell: the eager paired-native cell, the largest of a profile (the default bench was killed
    by the kernel at 21.9 GB on it, with no warning)."""
    import subprocess
    import sys

    script = """
import resource, sys, torch
torch.set_num_threads(1)
from prefixshare.tools import bench
ex = bench.examples_from_lengths(bench.synthetic_lengths("capybara", 8, seed=0, scale=0.25), 8192)
batches = [ex[:4], ex[4:]]
longest = max(len(e["prompt_input_ids"]) + len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in ex)
collator = bench.collators_for(longest)["paired-native"]
predicted = max(bench.predicted_peak_bytes("tiny", collator(b), "paired-native", "eager", torch.float32) for b in batches)
model = bench.build_model("tiny", "eager", torch.float32, "cpu", False)
bench.time_format(model, collator, batches, "cpu", native=True)
print(predicted / (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ratio = float(out.stdout.split()[-1])
    assert 1.0 <= ratio <= 3.0, ratio  # never below the real peak; not so far above that it skips cells that fit


def test_bench_skips_what_would_not_fit_and_logs_each_cell(tmp_path, capsys):
    # a limit between the predictions of the smallest cell (shared-packed) and the largest (paired-native, whose
    # [B, L, V] logits dominate) of this profile
    examples = bench.examples_from_lengths(bench.synthetic_lengths("ultrafeedback", 4, seed=0, scale=0.25), 8192)
    predicted = {
        fmt: max(bench.predicted_peak_bytes("tiny", bench.collators_for(10**6)[fmt](examples[i : i + 2]), fmt, "sdpa",
                                            torch.float32) for i in (0, 2))
        for fmt in ("paired-native", "shared-packed")
    }  # fmt: skip
    assert predicted["paired-native"] > predicted["shared-packed"]
    limit = (predicted["paired-native"] + predicted["shared-packed"]) / 2 / 2**30
    code = cli.main(["bench", "--profiles", "ultrafeedback", "--backends", "sdpa", "--examples-per-step", "2",
                     "--steps", "1", "--memory-limit-gb", f"{limit:.4f}", "--out-dir", str(tmp_path), "--name", "b"])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert len(lines) == len(bench.FORMATS)  # one line per cell, written as each finished
    kinds = {line["format"]: line["kind"] for line in lines}
    assert kinds["paired-native"] == "skipped" and kinds["shared-packed"] == "measurement", kinds
    assert "predicted peak" in captured.out and "not run" in captured.out
    assert "ultrafeedback sdpa paired-native: not run: predicted peak" in captured.err


def test_bench_stops_at_its_time_budget(tmp_path, capsys):
    code = cli.main(["bench", "--profiles", "hh-rlhf", "--backends", "sdpa", "--examples-per-step", "2", "--steps", "1",
                     "--time-budget", "0", "--out-dir", str(tmp_path), "--name", "b"])  # fmt: skip
    assert code == 0
    lines = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["skipped"] * len(bench.FORMATS)
    assert "time budget of 0 s spent" in capsys.readouterr().out


def test_bench_splits_each_cells_time_into_phases(tmp_path, capsys):
    code = cli.main(["bench", "--profiles", "hh-rlhf", "--backends", "sdpa", "--examples-per-step", "2", "--steps", "1",
                     "--out-dir", str(tmp_path), "--name", "b"])  # fmt: skip
    assert code == 0
    cells = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert all(c["kind"] == "measurement" and c["warm_up_s"] > 0 and c["step_s"] > 0 for c in cells)
    first, *rest = cells  # the first cell of the backend built and patched its model
    assert first["build_s"] > 0 and first["patch_s"] > 0 and all(c["build_s"] == c["patch_s"] == 0 for c in rest)
    assert "model built in" in capsys.readouterr().err
    saved = json.loads((tmp_path / "b.json").read_text())["measurements"]
    assert [m["warm_up_s"] for m in saved] == [c["warm_up_s"] for c in cells]
