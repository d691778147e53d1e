"""examples/fsdp.py on 2 CPU processes (gloo): FSDP2 and DDP equal one process that sees both ranks' batches.

One ``torchrun --standalone --nproc_per_node 2`` of this file (module fixture, so torch and transformers
are imported once per rank) runs, in each rank:

* direct checks of what gloo's ReduceOp.AVG does on the installed torch (pytorch issue 162338 reported
  that it sums): all_reduce, reduce-scatter (what FSDP2 uses), and the gradients FSDP2 and DDP end with;
* ``train(args)`` of the example for several configurations, 3 SGD steps each;
* last, the example's ``main()``, the command line as users run it.

The single-process reference (in the pytest process) runs the same batches (rank r's batches of each
step, as the sharded sampler deals them) and back-propagates ``sum of per-pair losses / (pairs of both
ranks)`` per batch: the gradient of the global mean. Per-step losses and final parameters must match.

Tolerance (float32): rtol 1e-5, atol 1e-6. Both sides do the same float32 arithmetic on the same rows;
they differ only in where a few roundings happen (``loss * 2 / N`` then an average over 2 ranks versus
``loss / N`` accumulated; a clip norm from two shard norms versus one; the logged loss summed in another
order), i.e. a few ulps (~1e-7 relative). With torch 2.13 on CPU the parameters even come out bitwise
equal and the losses within 6e-8. SGD (not Adam) keeps ulps ulps: Adam divides by ``sqrt(v)`` and can
turn a rounding difference in a gradient that is ~0 by cancellation into an ``lr``-sized step. The steps
move parameters by up to ~1e-2, so a wrong scaling (a per-rank mean, or an AVG that sums) lands far
outside the tolerance; ``test_per_rank_mean_would_be_caught`` checks that it would be seen.
"""
from __future__ import annotations

import datetime
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fsdp.py"
WORLD = 2
DEADLINE_S = 300  # the whole torchrun; a hang (a collective waiting forever) fails instead of stalling CI
RTOL, ATOL = 1e-5, 1e-6

pytestmark = [
    pytest.mark.slow,  # about a minute: two fresh processes import torch and transformers
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="needs torch.distributed with gloo",
    ),
]

COMMON = [
    "--max-examples", "48", "--max-tokens-per-row", "256", "--rows-per-batch", "2",
    "--max-steps", "3", "--optimizer", "sgd", "--lr", "0.1", "--max-grad-norm", "1.0",
    "--attn", "sdpa", "--quiet",
]  # fmt: skip

# name -> extra arguments; every configuration trains the same model on the same batches
CONFIGS = {
    "fsdp2": ["--strategy", "fsdp2"],
    "ddp": ["--strategy", "ddp"],
    "fsdp2_patch_after_wrap": ["--strategy", "fsdp2", "--patch-after-wrap"],
    "ddp_patch_after_wrap": ["--strategy", "ddp", "--patch-after-wrap"],
    "fsdp2_force_sum": ["--strategy", "fsdp2", "--force-sum-reduction"],
    "fsdp2_lora": ["--strategy", "fsdp2", "--lora"],
    "ddp_lora_patch_after_wrap": ["--strategy", "ddp", "--lora", "--patch-after-wrap"],
    # the log-prob engine in several chunks: trainable head (recompute in backward; the reference's root
    # reshards after forward, so the engine gathers its LM head once), frozen head (LoRA), and an LM head
    # sharded as an FSDP unit of its own (gathered by its hooks on every chunk)
    "fsdp2_chunked": ["--strategy", "fsdp2", "--logit-chunk-size", "16"],
    "fsdp2_lora_chunked": ["--strategy", "fsdp2", "--lora", "--logit-chunk-size", "16"],
    "fsdp2_lm_head_unit": ["--strategy", "fsdp2", "--shard-lm-head", "--logit-chunk-size", "16"],
    "ddp_chunked": ["--strategy", "ddp", "--logit-chunk-size", "16"],
}
# arguments that change how the ranks shard or wrap, not the numbers: the single process ignores them
LAYOUT_ONLY = ("--patch-after-wrap", "--force-sum-reduction", "--shard-lm-head")
# runs that cannot equal the float32 reference exactly: bfloat16 compute
APPROXIMATE = {"fsdp2_mixed_precision": ["--strategy", "fsdp2", "--mixed-precision"]}


def load_example():
    """examples/fsdp.py as a module (examples/ is not a package); loaded once per process."""
    name = "prefixshare_example_fsdp"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


# ---------------------------------------------------------------------------------------------- in the ranks
def gloo_reduction_numbers(rank: int, world: int) -> dict:
    """What AVG does here, as numbers (rank r contributes r + 1, so the mean is 1.5 and a sum 3 on 2 ranks)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    x = torch.full((3,), float(rank + 1))
    dist.all_reduce(x, op=dist.ReduceOp.AVG)
    out["all_reduce_avg"] = x.tolist()

    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    y = torch.empty(2)
    reduce_scatter(y, torch.full((2 * world,), float(rank + 1)), op=dist.ReduceOp.AVG)
    out["reduce_scatter_avg"] = y.tolist()

    # gradients: each rank a different input; the reduced gradient should be the mean of the ranks' gradients
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.Tanh(), torch.nn.Linear(8, 2))

    inputs = torch.randn(world, 5, 4, generator=torch.Generator().manual_seed(1))
    local = net()
    per_rank = []
    for r in range(world):
        local.zero_grad()
        local(inputs[r]).pow(2).sum().backward()
        per_rank.append({n: p.grad.clone() for n, p in local.named_parameters()})
    mean = {n: sum(g[n] for g in per_rank) / world for n in per_rank[0]}
    total = {n: sum(g[n] for g in per_rank) for n in per_rank[0]}

    def compare(grads):
        return {
            "max_err_vs_mean": max(float((grads[n] - mean[n]).abs().max()) for n in mean),
            "max_err_vs_sum": max(float((grads[n] - total[n]).abs().max()) for n in mean),
        }

    mesh = init_device_mesh("cpu", (world,))
    for force_sum in (False, True):
        model = net()
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        if force_sum:
            for m in model.modules():
                if hasattr(m, "set_force_sum_reduction_for_comms"):
                    m.set_force_sum_reduction_for_comms(True)
        model(inputs[rank]).pow(2).sum().backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        out["fsdp2_force_sum" if force_sum else "fsdp2"] = compare(grads)

    model = DDP(net())
    model(inputs[rank]).pow(2).sum().backward()
    out["ddp"] = compare({n: p.grad for n, p in model.module.named_parameters()})

    out["example_probe"] = load_example().gloo_avg_averages()
    return out


def _worker(result_dir: str) -> None:
    """One rank, started by torchrun (``python tests/test_distributed.py --worker DIR``)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    # the example's setup_distributed() would make this group from torchrun's environment as well; made
    # here with a timeout, so that a collective that waits forever fails the run instead
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    example = load_example()
    results = {"gloo": gloo_reduction_numbers(rank, dist.get_world_size()), "runs": {}}
    for name, extra in {**CONFIGS, **APPROXIMATE}.items():
        start = time.perf_counter()
        result = example.train(example.parse_args(COMMON + extra))
        results["runs"][name] = {
            "losses": result.losses,
            "pairs": result.pairs,
            "state_dict": result.state_dict,
            "seconds": time.perf_counter() - start,
        }
    torch.save(results, Path(result_dir) / f"rank{rank}.pt")
    # last, the command-line entry point as users run it: logs on rank 0, destroys the process group
    example.main([a for a in COMMON if a != "--quiet"] + ["--strategy", "fsdp2", "--max-steps", "2"])


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    """Both ranks' results, from one torchrun of this file; ``[0]["stdout"]`` holds what the ranks printed."""
    result_dir = tmp_path_factory.mktemp("distributed")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
        __file__, "--worker", str(result_dir),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    # a session of its own, so that a timeout ends torchrun's workers too, not only torchrun
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun with {WORLD} ranks did not finish in {DEADLINE_S}s (a hang?)\n{stderr[-3000:]}")
    assert process.returncode == 0, stdout[-3000:] + stderr[-5000:]
    results = [torch.load(result_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    results[0].update(stdout=stdout, wall_seconds=time.perf_counter() - start)
    return results


# ---------------------------------------------------------------------------------------------- reference
def single_process(extra: list[str], weighting: str = "global"):
    """The same steps in this process: per step, rank 0's and rank 1's batches, one optimizer step.

    ``weighting="global"``: each batch's loss sum / pairs of both batches (what the example must equal).
    ``weighting="per_rank"``: the mean of the two per-batch means (the naive data-parallel loss).
    """
    from torch.utils.data import DataLoader

    example = load_example()
    args = example.parse_args(COMMON + [e for e in extra if e not in LAYOUT_ONLY])
    torch.manual_seed(args.seed)
    tokenizer = example.load_tokenizer(args)
    examples = example.load_examples(args, tokenizer)
    policy, reference = example.build_models(args, tokenizer)
    optimizer = example.make_optimizer(args, policy)
    collator = example.make_collator(args, tokenizer)
    loaders = [
        iter(DataLoader(examples, batch_sampler=example.make_sampler(args, examples, collator, WORLD, r), collate_fn=collator))
        for r in range(WORLD)
    ]
    losses, pairs = [], []
    for _ in range(args.max_steps):
        batches = [next(loader) for loader in loaders]
        counts = [b.layout.num_examples for b in batches]
        total = 0.0
        for batch, n in zip(batches, counts):
            loss_sum, _ = example.pair_loss_sum(args, policy, reference, batch)
            divisor = sum(counts) if weighting == "global" else n * WORLD
            (loss_sum / divisor).backward()
            total += loss_sum.item()
        example.clip_gradients(args, policy)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / sum(counts))
        pairs.append(counts)
    return losses, pairs, {k: v.detach().clone() for k, v in policy.state_dict().items()}


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(extra, weighting="global"):
        key = (tuple(e for e in extra if e not in LAYOUT_ONLY), weighting)
        if key not in cache:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # tiny matrices: threads only contend for the CI's few cores
            try:
                cache[key] = single_process(list(key[0]), weighting)
            finally:
                torch.set_num_threads(threads)
        return cache[key]

    return get


# ---------------------------------------------------------------------------------------------- tests
def test_gloo_avg_really_averages(distributed):
    """pytorch issue 162338 reported gloo's AVG summing. Test the numbers on the installed torch."""
    for rank_result in distributed:
        gloo = rank_result["gloo"]
        assert gloo["all_reduce_avg"] == [1.5, 1.5, 1.5], gloo
        assert gloo["reduce_scatter_avg"] == [1.5, 1.5], gloo
        for how in ("fsdp2", "fsdp2_force_sum", "ddp"):
            assert gloo[how]["max_err_vs_mean"] < 1e-6, (how, gloo[how])
            assert gloo[how]["max_err_vs_sum"] > 1e-2, (how, gloo[how])  # the check can tell a sum from a mean
        assert gloo["example_probe"] is True


def test_ranks_get_different_pair_counts(distributed):
    """Token-budget packing gives the ranks different numbers of pairs: the case a per-rank mean gets wrong."""
    pairs = distributed[0]["runs"]["fsdp2"]["pairs"]
    assert len(pairs) == 3 and all(len(p) == WORLD for p in pairs)
    assert any(p[0] != p[1] for p in pairs), pairs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_distributed_equals_single_process(distributed, references, name):
    ref_losses, ref_pairs, ref_state = references(CONFIGS[name])
    runs = [r["runs"][name] for r in distributed]
    assert runs[0]["pairs"] == ref_pairs  # the same batches on both sides
    for run in runs:  # every rank logs the same global loss
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)

    state = runs[0]["state_dict"]
    assert runs[1]["state_dict"] is None or name.startswith("ddp")
    assert state.keys() == ref_state.keys()
    initial = single_initial_state(CONFIGS[name])
    moved = 0
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=RTOL, atol=ATOL, msg=lambda m: f"{key}: {m}")
        moved += int(not torch.equal(value, initial[key]))
    assert moved > 0  # training changed something


def test_fsdp2_mixed_precision_runs_close(distributed, references):
    """bfloat16 compute, float32 reduction: only a smoke test, losses near the float32 ones."""
    ref_losses, ref_pairs, _ = references(CONFIGS["fsdp2"])
    run = distributed[0]["runs"]["fsdp2_mixed_precision"]
    assert run["pairs"] == ref_pairs
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref_losses), rtol=0, atol=1e-2)


def test_per_rank_mean_would_be_caught(distributed, references):
    """The naive loss (each rank's mean, averaged over ranks) ends far outside the tolerance."""
    _, _, naive = references(CONFIGS["fsdp2"], weighting="per_rank")
    _, _, exact = references(CONFIGS["fsdp2"])
    state = distributed[0]["runs"]["fsdp2"]["state_dict"]
    worst_naive = max(float((state[k] - naive[k]).abs().max()) for k in naive)
    worst_exact = max(float((state[k] - exact[k]).abs().max()) for k in exact)
    assert worst_exact < ATOL * 10
    assert worst_naive > 100 * ATOL, worst_naive


_INITIAL = {}


def single_initial_state(extra):
    key = "--lora" in extra
    if key not in _INITIAL:
        example = load_example()
        args = example.parse_args(COMMON + [e for e in extra if e not in LAYOUT_ONLY])
        policy, _ = example.build_models(args, example.load_tokenizer(args))
        _INITIAL[key] = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    return _INITIAL[key]


def test_command_line_logs_on_rank_0(distributed):
    """The example's main() under torchrun (the fixture's last call): progress lines from rank 0 only."""
    stdout = distributed[0]["stdout"]
    assert stdout.count("step 1: loss=") == 1, stdout[-2000:]
    assert "2 steps on 2 ranks (fsdp2)" in stdout


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
