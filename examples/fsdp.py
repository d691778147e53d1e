"""Prefix-shared DPO on several processes: FSDP2 or DDP, launched by torchrun or accelerate.

Every process (rank) takes its own token-budget batches, runs the prefix-shared forward of the policy
and of the reference model, and contributes to ONE loss: the mean over all pairs of all ranks::

    # 2 processes; nccl on CUDA, gloo on CPU
    torchrun --nproc_per_node 2 examples/fsdp.py --strategy fsdp2
    torchrun --nproc_per_node 8 examples/fsdp.py --strategy ddp --lora --model /path/to/hf_model_dir
    accelerate launch --multi_gpu --num_processes 8 examples/fsdp.py --strategy fsdp2 --model /path/to/dir

Without ``--model`` it trains a tiny random Llama (prefixshare.testing) on the toy preferences shipped in
prefixshare.data, so it runs anywhere, CPU included. See docs/distributed.md for what has been tested.

The recipe, top to bottom:

1. ``setup_distributed``: one process group (nccl on CUDA, gloo on CPU), from torchrun's environment.
2. ``load_examples``: token ids of the preference data.
3. ``build_models``: the policy and the frozen reference (or ``--lora``: one model, adapters disabled
   for the reference), both ``prefixshare.patch``-ed for prefix-shared batches.
4. ``parallelize``: FSDP2 (``fully_shard`` per decoder layer, then the root; the reference is sharded
   too) or DDP (the reference is a plain replica on every rank). ``--patch-after-wrap`` patches here,
   after wrapping, instead of in step 3: both work.
5. ``make_loader``: ``TokenBudgetBatchSampler(num_replicas=world, rank=rank)`` deals every rank its own
   batches, and every rank takes the same number of steps.
6. ``train``: the loop. The loss of a step is the mean over the pairs of ALL ranks, see below.

The loss normalization. Packing by token budget gives each rank a different number of pairs, so a
per-rank mean would weight a rank's few long pairs like another rank's many short ones. Each rank
therefore computes the SUM of its per-pair losses, the ranks all-reduce their pair counts
(``N = n_0 + ... + n_{R-1}``), and each rank back-propagates ``sum_r * R / N``. DDP and FSDP2 average
gradients over the R ranks, which divides by R again, so the reduced gradient is
``(grad sum_0 + ... + grad sum_{R-1}) / N``: exactly the gradient of the global mean loss.
tests/test_distributed.py checks this against a single process with the numbers.

That relies on the gradient reduction really averaging. A reported bug (pytorch issue 162338) had
gloo's ReduceOp.AVG sum instead; ``gloo_avg_averages`` checks it at start-up, and if it sums, FSDP2 is
told to reduce with SUM and divide by the world size itself (``set_force_sum_reduction_for_comms``).
DDP never depends on it: it divides by the world size before an all-reduce with SUM.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import prefixshare
from prefixshare import PrefixShareCollator
from prefixshare import response_logps
from prefixshare.losses import REFERENCE_FREE, preference_loss
from prefixshare.sampler import TokenBudgetBatchSampler


# ================================================================================================ arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--strategy", choices=("fsdp2", "ddp"), default="fsdp2")
    p.add_argument("--model", default=None, help="a local Hugging Face model directory (default: tiny random Llama)")
    p.add_argument("--data", default=None, help="a JSON-lines file of {prompt, chosen, rejected} (default: toy data)")
    p.add_argument("--max-examples", type=int, default=None, help="use only the first N examples")
    p.add_argument("--attn", default="sdpa", choices=("eager", "sdpa", "flex_attention"), help="prefix-shared backend")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the weights' dtype")
    p.add_argument(
        "--mixed-precision",
        action="store_true",
        help="FSDP2: float32 weights, bfloat16 compute, float32 gradient reduction (MixedPrecisionPolicy)",
    )
    p.add_argument("--lora", action="store_true", help="train LoRA adapters; the reference is the model with them off")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--loss", default="dpo", help="a name of prefixshare.losses.LOSSES")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 turns clipping off")
    p.add_argument("--max-steps", type=int, default=50, help="stop after this many optimizer steps")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-tokens-per-row", type=int, default=512)
    p.add_argument("--rows-per-batch", type=int, default=2, help="rows per batch, per rank")
    p.add_argument("--drop-last", action="store_true", help="drop an epoch's incomplete last round of batches")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--logit-chunk-size",
        type=int,
        default=None,
        help="rows of the LM head per chunk of prefixshare's log-prob engine (default: from the vocabulary size)",
    )
    p.add_argument(
        "--shard-lm-head",
        action="store_true",
        help="FSDP2: make the LM head an FSDP unit of its own (gathered on every chunk: see prefixshare.engine)",
    )
    p.add_argument("--patch-after-wrap", action="store_true", help="call prefixshare.patch after DDP/FSDP wrapping")
    p.add_argument(
        "--force-sum-reduction",
        action="store_true",
        help="FSDP2: reduce gradients with SUM and divide by the world size (automatic when gloo's AVG sums)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--output-dir", default=None, help="rank 0 saves the trained model here (save_pretrained)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    return p.parse_args(argv)


# ================================================================================================ 1. distributed
@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the process group described by torchrun's (or accelerate launch's) environment variables.

    If a process group already exists (a test or another launcher made one), use it. Without any
    launcher (plain ``python examples/fsdp.py``) this is a world of one process.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:  # torchrun / accelerate launch: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
            dist.init_process_group(backend)
        else:  # plain python: a world of one, still through the same code path
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def gloo_avg_averages() -> bool:
    """Does a reduce-scatter with ReduceOp.AVG average on this process group? (It is what FSDP2 uses.)

    Rank r contributes ``r + 1`` everywhere; the average is ``(R + 1) / 2``, a sum would be ``R (R + 1) / 2``.
    """
    world = dist.get_world_size()
    if world == 1:
        return True
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    inp = torch.full((world * 2,), float(dist.get_rank() + 1), device=device)
    out = torch.empty(2, device=device)
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # newer name
    reduce_scatter(out, inp, op=dist.ReduceOp.AVG)
    return torch.allclose(out.cpu(), torch.full((2,), (world + 1) / 2))


# ================================================================================================ 2. data
def load_examples(args, tokenizer):
    """Token ids of the preference pairs: ``--data`` or the toy set (random ids if neither is at hand)."""
    try:
        from prefixshare.data import load_preferences, load_toy_preferences, tokenize_preferences
    except ImportError:  # an older prefixshare without the toy data: random token ids
        if args.data or tokenizer is not None:
            raise
        from prefixshare.testing import random_examples

        return random_examples(args.max_examples or 512, vocab_size=96, seed=args.seed)
    else:
        rows = load_preferences(args.data) if args.data else load_toy_preferences()
        examples = tokenize_preferences(tokenizer, rows[: args.max_examples])
    return examples


def load_tokenizer(args):
    """The model's tokenizer, or the toy character tokenizer for the tiny model (None if not shipped)."""
    if args.model:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(args.model)
    try:
        from prefixshare.data import toy_tokenizer
    except ImportError:
        return None
    return toy_tokenizer()


def pad_token_id(tokenizer) -> int:
    if tokenizer is None:
        return 0
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ================================================================================================ 3. models
def build_models(args, tokenizer):
    """``(policy, reference)`` on the CPU, identical on every rank; ``reference`` is None with ``--lora``."""
    dtype = getattr(torch, args.dtype)
    if args.model:
        from transformers import AutoModelForCausalLM

        policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn)
    else:
        from prefixshare.testing import tiny_model

        vocab = len(tokenizer) if tokenizer is not None else 96
        attn = "sdpa" if args.attn == "sdpa" else "eager"
        policy = tiny_model("llama", attn_implementation=attn, dtype=dtype, seed=args.seed, vocab_size=vocab)
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if args.lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(args.seed)  # the adapters' random init must be the same on every rank (FSDP2 does not broadcast)
        config = LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        policy, reference = get_peft_model(policy, config), None
    elif args.loss in REFERENCE_FREE:
        reference = None
    else:
        reference = copy.deepcopy(policy)
        reference.requires_grad_(False)
        reference.eval()

    policy.train()
    if not args.patch_after_wrap:
        prefixshare.patch(policy, backend=args.attn)
        if reference is not None:
            prefixshare.patch(reference, backend=args.attn)
    return policy, reference


# ================================================================================================ 4. parallelize
def decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks, found by the class names transformers marks as not-to-split."""
    inner = _hf_model(model)
    names = set(getattr(inner, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"found no decoder layers in {type(inner).__name__} (its _no_split_modules is {names})")
    return layers


def _hf_model(model):
    """The transformers model inside a peft model (FSDP2 keeps the class; DDP is unwrapped by the caller)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def parallelize(args, policy, reference, d: Dist):
    """Wrap the policy (and shard the reference) for ``args.strategy``; returns ``(policy, reference)``."""
    if args.strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(d.device.type, (d.world,))
        options = {"mesh": mesh}
        if args.mixed_precision:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in decoder_layers(policy):
            fully_shard(layer, **options)
        if args.shard_lm_head:
            fully_shard(_hf_model(policy).get_output_embeddings(), **options)
        fully_shard(policy, **options)  # the root: embeddings, final norm, LM head
        if reference is not None:  # sharded the same way; it only runs forward (no_grad, eval)
            for layer in decoder_layers(reference):
                fully_shard(layer, **options)
            # a root keeps its parameters gathered after forward, for the backward to come; the reference
            # has none, so let its root reshard too (else its embeddings and LM head stay whole)
            fully_shard(reference, reshard_after_forward=True, **options)
        force_sum = args.force_sum_reduction
        if d.device.type == "cpu" and not force_sum and not gloo_avg_averages():
            force_sum = True  # pytorch issue 162338: gloo's AVG summed; let FSDP2 divide by itself
            if d.is_main:
                print("gloo ReduceOp.AVG sums on this torch: FSDP2 reduces with SUM and divides by the world size")
        if force_sum:
            if not hasattr(policy, "set_force_sum_reduction_for_comms"):
                raise RuntimeError("this torch's FSDP2 has no set_force_sum_reduction_for_comms; upgrade torch")
            for module in policy.modules():
                if hasattr(module, "set_force_sum_reduction_for_comms"):  # every fully_shard-ed module
                    module.set_force_sum_reduction_for_comms(True)
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        policy.to(d.device)
        policy = DDP(policy, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
        if reference is not None:
            reference.to(d.device)  # a full replica on every rank: it needs no gradient synchronization

    if args.patch_after_wrap:  # prefixshare.patch sees through DDP, FSDP and peft wrappers
        prefixshare.patch(policy, backend=args.attn)
        if reference is not None:
            prefixshare.patch(reference, backend=args.attn)
    return policy, reference


def _unwrap_ddp(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ================================================================================================ 5. batches
def make_collator(args, tokenizer) -> PrefixShareCollator:
    return PrefixShareCollator(pad_token_id=pad_token_id(tokenizer), max_tokens_per_row=args.max_tokens_per_row)


def make_sampler(args, examples, collator, num_replicas: int, rank: int) -> TokenBudgetBatchSampler:
    """Every rank plans the same global batches from the same seed and takes batches rank, rank + R, ..."""
    return TokenBudgetBatchSampler.from_dataset(
        examples,
        collator,
        rows_per_batch=args.rows_per_batch,
        seed=args.seed,
        num_replicas=num_replicas,
        rank=rank,
        drop_last=args.drop_last,
    )


# ================================================================================================ 6. the loss
def pair_loss_sum(args, policy, reference, batch):
    """``(sum of per-pair losses, metrics as sums over the pairs)`` of one batch on this rank.

    ``response_logps`` is the prefix-shared forward through prefixshare's log-prob engine (the LM head runs
    in chunks on the positions that predict response tokens, never building their ``[T, V]`` logits);
    ``prefixshare.split_logps(model(**batch).logits, batch)`` gives the same numbers.
    """
    ref_chosen = ref_rejected = None
    if args.loss not in REFERENCE_FREE:  # the reference first: nothing of it is kept for the backward
        with torch.no_grad():
            if reference is not None:
                ref_out = response_logps(reference, batch, chunk_size=args.logit_chunk_size)
            else:  # LoRA: the reference is the base model, i.e. the policy with its adapters off
                peft_model = _unwrap_ddp(policy)  # no DDP for a forward without backward
                with peft_model.disable_adapter():
                    ref_out = response_logps(peft_model, batch, chunk_size=args.logit_chunk_size)
        ref_chosen, ref_rejected = ref_out.logps[:, 0], ref_out.logps[:, 1]
    policy_out = response_logps(policy, batch, chunk_size=args.logit_chunk_size)
    loss_sum, metrics = preference_loss(
        args.loss,
        policy_chosen_logps=policy_out.logps[:, 0],
        policy_rejected_logps=policy_out.logps[:, 1],
        reference_chosen_logps=ref_chosen,
        reference_rejected_logps=ref_rejected,
        chosen_num_tokens=policy_out.num_tokens[:, 0],
        rejected_num_tokens=policy_out.num_tokens[:, 1],
        beta=args.beta,
        reduction="sum",
    )
    n = policy_out.logps.shape[0]
    return loss_sum, {name: value * n for name, value in metrics.items()}


def make_optimizer(args, policy):
    params = [p for p in policy.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def clip_gradients(args, policy) -> float | None:
    if not args.max_grad_norm:
        return None
    norm = torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.grad is not None], args.max_grad_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2


# ================================================================================================ 7. training
@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # the global mean loss of every step (same on all ranks)
    pairs: list[list[int]] = field(default_factory=list)  # pairs per rank of every step
    metrics: list[dict[str, float]] = field(default_factory=list)
    state_dict: dict[str, torch.Tensor] | None = None  # full, on the CPU; rank 0 only under FSDP2
    seconds: float = 0.0


def train(args) -> TrainResult:
    d = setup_distributed()
    torch.manual_seed(args.seed)

    tokenizer = load_tokenizer(args)
    examples = load_examples(args, tokenizer)
    policy, reference = build_models(args, tokenizer)
    policy, reference = parallelize(args, policy, reference, d)
    optimizer = make_optimizer(args, policy)

    collator = make_collator(args, tokenizer)
    sampler = make_sampler(args, examples, collator, num_replicas=d.world, rank=d.rank)
    loader = DataLoader(examples, batch_sampler=sampler, collate_fn=collator)
    total_steps = min(args.max_steps, sum(len(sampler) for _ in range(args.epochs)))  # len() may vary by epoch
    progress = _progress(total_steps, enabled=d.is_main and not args.quiet, desc=args.loss)

    result = TrainResult()
    start = time.perf_counter()
    step = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            if step >= args.max_steps:
                break
            batch = batch.to(d.device)

            # the global number of pairs, known before the forward: every rank's gradient is scaled by it
            n_local = torch.tensor([batch.layout.num_examples], device=d.device)
            counts = [torch.zeros_like(n_local) for _ in range(d.world)]
            dist.all_gather(counts, n_local)
            pairs = [int(c) for c in counts]
            n_global = sum(pairs)

            loss_sum, metric_sums = pair_loss_sum(args, policy, reference, batch)
            # DDP/FSDP2 divide the summed gradients by the world size; multiplying by it here makes the
            # reduced gradient that of (sum over all ranks' pairs) / n_global, the global mean
            (loss_sum * (d.world / n_global)).backward()
            grad_norm = clip_gradients(args, policy)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            # logging: global means over all pairs of all ranks
            names = sorted(metric_sums)
            stats = torch.stack([loss_sum.detach().float()] + [metric_sums[k].float() for k in names]).to(d.device)
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            stats = (stats / n_global).tolist()
            metrics = {"loss": stats[0], **dict(zip(names, stats[1:])), "pairs": n_global}
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            result.losses.append(stats[0])
            result.pairs.append(pairs)
            result.metrics.append(metrics)
            step += 1
            if d.is_main and not args.quiet:
                progress.update(1)
                progress.set_postfix(loss=f"{stats[0]:.4f}", acc=f"{metrics.get('rewards/accuracies', float('nan')):.2f}")
                if step % args.log_every == 0:
                    _log(progress, step, metrics)
    progress.close()
    result.seconds = time.perf_counter() - start

    result.state_dict = full_state_dict(policy, d)
    if args.output_dir:
        save(args, policy, tokenizer, result.state_dict, d)
    return result


def full_state_dict(policy, d: Dist) -> dict[str, torch.Tensor] | None:
    """The unsharded parameters and buffers on the CPU (on rank 0; None elsewhere under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(policy, options=options)
    return state if d.is_main else None


def save(args, policy, tokenizer, state_dict, d: Dist) -> None:
    if d.is_main:
        model = _hf_model(_unwrap_ddp(policy)) if not args.lora else _unwrap_ddp(policy)
        model.save_pretrained(args.output_dir, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(args.output_dir)
    dist.barrier()


def _progress(total: int, enabled: bool, desc: str = "train"):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if enabled and tqdm is not None:
        return tqdm(total=total, desc=desc, dynamic_ncols=True)
    return _NoProgress()


class _NoProgress:
    def update(self, n):
        pass

    def set_postfix(self, **kwargs):
        pass

    def write(self, line):
        print(line, flush=True)

    def close(self):
        pass


def _log(progress, step: int, metrics: dict) -> None:
    shown = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm", "pairs")
    parts = [f"{k}={metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in shown if k in metrics]
    progress.write(f"step {step}: " + " ".join(parts))


def main(argv=None) -> None:
    args = parse_args(argv)
    result = train(args)
    if dist.get_rank() == 0 and not args.quiet and result.losses:
        print(
            f"{len(result.losses)} steps on {dist.get_world_size()} ranks ({args.strategy}) in {result.seconds:.1f}s; "
            f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
