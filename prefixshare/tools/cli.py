"""The ``prefixshare`` command: ``prefixshare bench`` and ``prefixshare stats``."""

from __future__ import annotations

import argparse
import os
import sys


def _report(args, table: str, save, result, default_name: str, suffixes=(".json",)) -> int:
    """Print the table; with ``--out-dir``, ``save(result, *paths)`` writes the result to ``NAME + suffix`` for each
    of ``suffixes`` (``NAME``: ``--name`` or ``default_name``), the table goes to ``NAME.md`` under the command
    that produced it, and every path written is printed."""
    print(table)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        stem = os.path.join(args.out_dir, args.name or default_name)
        save(result, *(stem + suffix for suffix in suffixes))
        with open(stem + ".md", "w") as f:
            f.write(f"Produced by `prefixshare {' '.join(args.argv)}`.\n\n{table}\n")
        print("wrote " + ", ".join(stem + suffix for suffix in (*suffixes, ".md")))
    return 0


def _model_options(args, device: str):
    """``(dtype, shape)`` of the throughput benches: ``--dtype`` and ``--shape``, or bfloat16 and 1b on a GPU,
    float32 and tiny elsewhere."""
    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    return dtype, args.shape or ("1b" if device == "cuda" else "tiny")


def _bench(args) -> int:
    import torch

    from . import bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.memory:
        return _bench_memory(args, device)
    if args.groups:
        return _bench_groups(args, device)
    if args.self_check:
        return _bench_self_check(args, device)
    dtype, shape = _model_options(args, device)
    if args.length_scale is None:
        # the paper's lengths (a median of 1160 tokens for capybara) need minutes per cell and tens of GB on a CPU
        args.length_scale = 1.0 if device.startswith("cuda") else CPU_LENGTH_SCALE
        if not device.startswith("cuda"):
            print(f"prefixshare bench: on {device} the profiles' lengths are scaled by {CPU_LENGTH_SCALE} "
                  "(--length-scale 1.0 for the paper's)", file=sys.stderr)  # fmt: skip
    if args.time_budget is None and not device.startswith("cuda"):
        args.time_budget = CPU_TIME_BUDGET_S
    backends = args.backends.split(",") if args.backends else bench.available_backends(device)
    n = args.examples_per_step * (args.steps + 1)
    vocab = bench.MODEL_SHAPES[shape]["vocab_size"]
    # the paper's six profiles by default; with --data only the files, unless --profiles names some too
    names = args.profiles.split(",") if args.profiles else ([] if args.data else list(bench.PAPER_PROFILES))
    unknown = [name for name in names if name not in bench.PAPER_PROFILES]
    if unknown:
        raise SystemExit(f"unknown profile(s) {unknown}; choose from {', '.join(bench.PAPER_PROFILES)}")
    profiles = {
        name: bench.examples_from_lengths(bench.synthetic_lengths(name, n, seed=i, scale=args.length_scale), vocab, seed=i)
        for i, name in enumerate(names)
    }
    if args.data:
        tokenizer = _load_tokenizer(args.tokenizer)
        for path in args.data:
            profiles[os.path.basename(path)] = bench.examples_from_file(path, tokenizer, n, vocab)
    name = f"bench-{device.split(':')[0]}-{shape}{'-rm' if args.reward_model else ''}{'-lora' if args.lora else ''}"
    result = bench.run_bench(
        profiles, backends=backends, shape=shape, dtype=dtype, device=device, lora=args.lora,
        gradient_checkpointing=args.gradient_checkpointing,
        examples_per_step=args.examples_per_step, steps=args.steps, budget=args.budget,
        reward_model=args.reward_model, memory_limit_gb=args.memory_limit_gb, time_budget_s=args.time_budget,
        on_cell=_cell_log(args, name),
    )
    return _report(args, bench.format_table(result), bench.save, result, name, suffixes=(".json", ".png"))


def _bench_self_check(args, device: str) -> int:
    import torch

    from . import bench_selfcheck

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype or "float32"]
    shapes = [args.shape] if args.shape else ["test", "tiny"]
    backends = args.backends.split(",") if args.backends else ["eager", "sdpa", "flex_attention"]
    results = bench_selfcheck.measure(shapes, backends, dtype=dtype, device=device, repeats=args.repeats)
    table = bench_selfcheck.format_table(results, device)
    return _report(args, table, bench_selfcheck.save, results, f"selfcheck-{device}")


# CPU defaults of the throughput bench: lengths a quarter of the paper's, and a budget under which the documented
# command ends (with what it measured) on a 2-core machine
CPU_LENGTH_SCALE = 0.25
CPU_TIME_BUDGET_S = 480.0


def _phases(record: dict) -> str:
    """A measured cell in words: its throughput and where its time went."""
    text = f"{record['samples_per_s']:.2f} samples/s (step {record['step_s']:.3f} s, warm-up {record['warm_up_s']:.2f} s"
    if record.get("build_s") or record.get("patch_s"):
        text += f", model built in {record['build_s']:.2f} s, patched in {record['patch_s']:.2f} s"
    return text + ")"


def _cell_log(args, default_name: str):
    """``on_cell`` of the benches: one line per finished cell on stderr, and with ``--out-dir`` one JSON line per cell
    appended to ``NAME.jsonl`` as it finishes (a run stopped at any point keeps every cell it finished)."""
    import json

    path = None
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, (args.name or default_name) + ".jsonl")
        open(path, "w").close()

    def on_cell(kind: str, record: dict) -> None:
        what = {"measurement": _phases, "out_of_memory": lambda r: "out of memory",
                "skipped": lambda r: f"not run: {r['reason']}"}[kind](record)  # fmt: skip
        print(f"  {record['profile']} {record['backend']} {record['format']}: {what}", file=sys.stderr, flush=True)
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"kind": kind, **record}) + "\n")

    return on_cell


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{option} takes comma-separated positive integers, got {text!r}")
    return values


def _bench_memory(args, device: str) -> int:
    from . import bench_memory

    result = bench_memory.run_memory_bench(
        _ints(args.vocabs, "--vocabs") if args.vocabs else bench_memory.VOCABULARIES,
        _ints(args.tokens, "--tokens") if args.tokens else bench_memory.TOKENS,
        hidden_size=args.hidden_size, device=device, dtype=args.dtype or "float32", train_head=args.train_head,
        memory_limit_gb=8.0 if args.memory_limit_gb is None else args.memory_limit_gb, repeats=args.repeats, threads=args.threads, chunk_size=args.chunk_size,
    )  # fmt: skip
    name = f"memory-{result.device.split(':')[0]}"
    return _report(args, bench_memory.format_memory_table(result), bench_memory.save_memory, result, name)


def _bench_groups(args, device: str) -> int:
    import torch

    from . import bench, bench_groups

    if args.data or args.profiles:
        raise ValueError("--groups runs the RL group profiles: choose them with --group-profiles, not --profiles/--data")
    names = args.group_profiles.split(",") if args.group_profiles else list(bench_groups.GROUP_PROFILES)
    unknown = [name for name in names if name not in bench_groups.GROUP_PROFILES]
    if unknown:
        raise ValueError(f"unknown group profile(s) {unknown}; choose from {', '.join(bench_groups.GROUP_PROFILES)}")
    modes = args.modes.split(",") if args.modes else list(bench_groups.MODES)
    if not modes or set(modes) - set(bench_groups.MODES):
        raise ValueError(f"--modes takes a comma-separated subset of {', '.join(bench_groups.MODES)}, got {args.modes!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, shape = _model_options(args, device)
    # dense-mask kernels on CPU: sdpa (eager materializes every score; varlen's CPU kernel is a reference loop)
    backends = args.backends.split(",") if args.backends else (
        bench.available_backends(device) if device.startswith("cuda") else ["sdpa"]
    )
    result = bench_groups.run_group_bench(
        names, _ints(args.group_sizes, "--group-sizes") if args.group_sizes else bench_groups.GROUP_SIZES,
        backends=backends, modes=modes, shape=shape, dtype=dtype, device=device, lora=args.lora,
        prompts_per_step=args.prompts_per_step, steps=args.steps, rounds=args.rounds, length_scale=1.0 if args.length_scale is None else args.length_scale,
        budget=args.budget,
    )  # fmt: skip
    name = f"bench-groups-{result.device.split(':')[0]}-{shape}"
    return _report(args, bench_groups.format_group_table(result), bench_groups.save_group, result, name)


def _load_tokenizer(path: str):
    if path is None:
        raise SystemExit("--tokenizer PATH is needed to tokenize text data")
    if path.endswith(".model"):  # a bare SentencePiece model, e.g. Mistral's
        return sentencepiece_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def sentencepiece_tokenizer(model_file: str):
    """A fast Llama-style tokenizer from a bare SentencePiece ``.model`` (needs sentencepiece and protobuf)."""
    import shutil
    import tempfile

    from transformers import LlamaTokenizerFast

    with tempfile.TemporaryDirectory() as folder:
        # from_pretrained converts a folder's tokenizer.model; the vocab_file= route gives an empty vocabulary in 5.x
        shutil.copy(model_file, os.path.join(folder, "tokenizer.model"))
        return LlamaTokenizerFast.from_pretrained(folder)


def _stats(args) -> int:
    import warnings

    # a command prints what it noticed as a note, not as a Python warning with a source line
    with warnings.catch_warnings(record=True) as noticed:
        warnings.simplefilter("always", UserWarning)
        code = _stats_report(args)
    for warning in noticed:
        print(f"prefixshare stats: note: {warning.message}", file=sys.stderr)
    return code


def _stats_report(args) -> int:
    from ..data import load_preferences, tokenize_preferences
    from .stats import dataset_stats, format_stats

    tokenizer = _load_tokenizer(args.tokenizer)
    if args.group is not None or args.completion_length is not None:
        from .stats import format_group_stats, group_stats, prompt_ids_of_file

        if args.group is None or args.completion_length is None:
            raise ValueError("--group G and --completion-length C go together (the group ideal needs both)")
        if args.group < 1 or args.completion_length < 1:
            raise ValueError(f"--group and --completion-length must be positive, got {args.group}, {args.completion_length}")
        prompts = prompt_ids_of_file(args.data, tokenizer, limit=args.limit, progress=True)
        print(format_group_stats(args.data, group_stats(prompts, args.group, args.completion_length)))
        return 0
    examples = tokenize_preferences(tokenizer, load_preferences(args.data, limit=args.limit), progress=True)
    print(format_stats(args.data, dataset_stats(examples, max_tokens_per_row=args.max_tokens_per_row)))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="prefixshare", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="paired vs prefix-shared formats, side by side, forward+backward")
    b.add_argument("--profiles", help="comma-separated dataset profiles of the paper (synthetic lengths): "
                   "capybara,hh-rlhf,metamath-dpo,tldr,tulu-helpsteer,ultrafeedback (default: all six, none with --data)")
    b.add_argument("--data", nargs="+", help="real preference data files (json/jsonl[.gz]); needs --tokenizer")
    b.add_argument("--tokenizer", help="tokenizer directory or SentencePiece .model file")
    b.add_argument("--backends", help="comma-separated: eager,sdpa,varlen,flex_attention (default: sdpa on CPU; "
                   "sdpa,flex_attention and, where a CUDA varlen kernel is installed, varlen on GPU)")
    b.add_argument("--shape", choices=["test", "tiny", "1b", "8b"],
                   help="model shape (default: tiny on CPU, 1b on GPU; test: the test suite's tiny Llama, --self-check only)")
    b.add_argument("--dtype", choices=["float32", "bfloat16"])
    b.add_argument("--device")
    b.add_argument("--lora", action="store_true", help="train LoRA adapters (r=16 on attention projections)")
    b.add_argument("--reward-model", action="store_true",
                   help="a sequence-classification reward model (score head, TRL's RewardTrainer) instead of a causal LM")
    b.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer in backward (what an 8b model needs to fit one GPU)")
    b.add_argument("--examples-per-step", type=int, default=8)
    b.add_argument("--steps", type=int, default=3, help="timed steps per cell (after one warm-up step)")
    b.add_argument("--length-scale", type=float, help="scale the synthetic profiles' lengths (default: 1.0 on a GPU, "
                   f"{CPU_LENGTH_SCALE} elsewhere)")
    b.add_argument("--time-budget", type=float, help="seconds after which no further cell starts; the cells left are "
                   f"listed as not run (default: none on a GPU, {CPU_TIME_BUDGET_S:.0f} elsewhere)")
    b.add_argument("--budget", type=int, help="max_tokens_per_row of the packed formats")
    b.add_argument("--out-dir", help="write JSON, PNG and a markdown table here")
    g = b.add_argument_group(
        "groups mode", "--groups: online RL (GRPO/RLOO) batches, prompts with G completions each: TRL's rows vs "
        "prefix-shared groups, the policy's forward+backward and the no-grad log-prob forward"
    )
    g.add_argument("--groups", action="store_true", help="run the group profiles instead of the preference profiles")
    g.add_argument("--group-profiles", help="comma-separated: math-reasoning,long-context-qa,multi-turn-chat (default: all)")
    g.add_argument("--group-sizes", help="comma-separated G (default: 4,8,16)")
    g.add_argument("--prompts-per-step", type=int, default=2, help="groups per step (default: 2)")
    g.add_argument("--modes", help="comma-separated: train,logprob (default: both)")
    g.add_argument("--rounds", type=int, default=3, help="timing rounds per cell; each format keeps its fastest (default: 3)")
    b.add_argument("--name", help="file name stem in --out-dir (default: bench-DEVICE-SHAPE[-rm][-lora], memory-DEVICE)")
    m = b.add_argument_group(
        "memory mode", "--memory: peak memory of the log-prob stage (hidden states -> log-probs, forward+backward) "
        "for paired-native, shared [T,V] and shared fused, each cell in its own process"
    )
    m.add_argument("--memory", action="store_true", help="run the memory mode instead of the throughput bench")
    m.add_argument("--vocabs", help="comma-separated vocabulary sizes (default: 32000,128256,262144)")
    m.add_argument("--tokens", help="comma-separated numbers of response tokens T (default: 512,2048)")
    m.add_argument("--hidden-size", type=int, default=256, help="hidden size of the LM head (default: 256)")
    m.add_argument("--train-head", action="store_true", help="a trainable LM head (default: frozen, as with LoRA)")
    m.add_argument("--memory-limit-gb", type=float,
                   help="skip cells whose predicted peak exceeds this (default: 8 with --memory, 80%% of the memory "
                   "available at the start otherwise)")
    m.add_argument("--repeats", type=int, default=2, help="runs per cell; the time is the best (default: 2)")
    m.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the cells' processes (--groups: torch's intra-op "
                   "threads; 1 keeps a busy shared machine from stalling OpenMP barriers)")
    m.add_argument("--chunk-size", type=int, help="the engine's rows per chunk (default: from the vocabulary size)")
    c = b.add_argument_group(
        "self-check mode", "--self-check: what patch()'s self-check costs (time, forwards, backward passes, graphs "
        "compiled), per model shape (default: test,tiny) and backend (default: eager,sdpa,flex_attention); "
        "--repeats rounds after a warm-up"
    )
    c.add_argument("--self-check", action="store_true", help="run the self-check cost mode")
    b.set_defaults(run=_bench)

    s = sub.add_parser("stats", help="token counts per format and the predicted speedup of a preference dataset "
                       "(or of a prompt dataset for GRPO/RLOO: --group G --completion-length C)")
    s.add_argument("data", help="json or jsonl(.gz): standard (prompt/chosen/rejected strings) or chat format")
    s.add_argument("--tokenizer", required=True, help="tokenizer directory or SentencePiece .model file")
    s.add_argument("--limit", type=int, help="read at most this many examples")
    s.add_argument("--max-tokens-per-row", type=int, help="also report packed rows for this budget")
    s.add_argument("--group", type=int, metavar="G", help="online RL: G completions per prompt (with --completion-length; "
                   "the file then needs prompts only)")
    s.add_argument("--completion-length", type=int, metavar="C", help="online RL: tokens per completion")
    s.set_defaults(run=_stats)

    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:  # bad input or a missing file: the message, not a traceback
        parser.exit(2, f"prefixshare {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
