"""LoRA and QLoRA preference tuning with prefix sharing, on one GPU (or the CPU).

One model in memory: the reference log-probs come from the same peft model with its adapters disabled
(the frozen base weights are the reference), so no second copy of the model is needed.

    # offline: a tiny random llama and the shipped toy data (CPU is fine)
    python examples/lora_single_gpu.py
    python examples/lora_single_gpu.py --qlora          # the base in 4-bit NF4 (bitsandbytes)

    # a local Hugging Face model directory
    python examples/lora_single_gpu.py --model /path/to/model --qlora --steps 500 --batch-size 4

    # precompute the reference log-probs once, then train without any reference forward pass
    python examples/lora_single_gpu.py --reference precomputed

The metrics are those of examples/custom_loop.py: ``rewards/accuracies`` is the share of pairs whose
implicit reward is higher for the chosen response (0 at the first step, where policy = reference).
"""

from __future__ import annotations

import argparse
import itertools
import random
import tempfile
import time
from collections import defaultdict

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import prefixshare
from prefixshare.data import load_preferences, load_toy_preferences, tokenize_preferences, toy_tokenizer
from prefixshare.losses import LOSSES
from prefixshare.reference import WithReferenceLogps, precompute_reference_logps, with_reference_logps
from prefixshare.training import preference_step


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local Hugging Face model directory (default: a tiny random llama)")
    p.add_argument("--data", help="a JSON-lines file of {prompt, chosen, rejected} (default: the shipped toy data)")
    p.add_argument("--qlora", action="store_true", help="load the base model in 4-bit NF4 (bitsandbytes)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--reference", choices=("disable_adapters", "precomputed"), default="disable_adapters")
    p.add_argument("--loss", default="dpo", choices=sorted(LOSSES))
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: 2e-3 for the tiny model, 1e-5 for --model)")
    p.add_argument("--format", choices=("shared", "paired"), default="shared")
    p.add_argument("--packing", type=int, metavar="MAX_TOKENS_PER_ROW")
    p.add_argument("--backend", choices=("eager", "sdpa", "flex_attention"))
    p.add_argument("--max-length", type=int)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--threads", type=int, help="CPU threads (default: 1 for the tiny model on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_base_model(args, workdir):
    """The base model (4-bit with --qlora) and its tokenizer; the tiny default goes through a saved copy so
    that quantization happens in from_pretrained, exactly as for a real checkpoint."""
    # bfloat16 on a GPU; float32 on the CPU, where bfloat16 matmuls are slow
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    path = args.model
    if path:
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        from prefixshare.testing import tiny_model

        tokenizer = toy_tokenizer()
        path = f"{workdir}/tiny-llama"
        tiny_model("llama", attn_implementation="sdpa", seed=args.seed, vocab_size=len(tokenizer)).save_pretrained(path)
    quantization = None
    if args.qlora:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=quantization, device_map={"": args.device}
    )
    return model, tokenizer


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads or (args.device == "cpu" and not args.model):
        torch.set_num_threads(args.threads or 1)  # the tiny model's matrices are too small to split

    # 1. base model (4-bit for QLoRA), then the LoRA adapters ----------------------------------------------
    with tempfile.TemporaryDirectory() as workdir:
        model, tokenizer = load_base_model(args, workdir)
    if args.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    elif args.gradient_checkpointing:  # renamed activation_checkpointing_enable in transformers 5.x
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)

    # 2. the one line: prefix-shared attention (peft models are patched through to the base model) -----------
    prefixshare.patch(model, backend=args.backend)
    model.train()

    # 3. data ------------------------------------------------------------------------------------------------
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = load_preferences(args.data) if args.data else load_toy_preferences()
    train = tokenize_preferences(tokenizer, rows)
    random.Random(args.seed).shuffle(train)
    collator_class = prefixshare.PrefixShareCollator if args.format == "shared" else prefixshare.PairedCollator
    collator = collator_class(
        pad_token_id=pad_token_id,
        max_tokens_per_row=args.packing,
        max_length=args.max_length,
        truncation="keep_end_of_prompt" if args.max_length else None,
    )

    # 4. reference log-probs: the base model = the peft model with its adapters disabled -----------------------
    ref = "disable_adapters"
    if args.reference == "precomputed":
        # once, before training, over the examples the run will see; afterwards no reference forward at all
        train = train[: args.steps * args.batch_size]
        logps = precompute_reference_logps(model, train, collator, args.batch_size, ref="disable_adapters", progress=True)
        train = with_reference_logps(train, logps)
        collator = WithReferenceLogps(collator)  # batches carry "reference_logps"; preference_step keeps it off the model
        ref = "precomputed"

    loader = torch.utils.data.DataLoader(
        train,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=len(train) >= args.batch_size,
        collate_fn=collator,
        generator=torch.Generator().manual_seed(args.seed),
    )
    batches = itertools.chain.from_iterable(itertools.repeat(loader))

    # 5. optimizer over the adapters only ---------------------------------------------------------------------
    lr = args.lr if args.lr is not None else (1e-5 if args.model else 2e-3)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    print(
        f"{'QLoRA (4-bit NF4 base)' if args.qlora else 'LoRA'} r={args.lora_r} on {type(model.get_base_model()).__name__}: "
        f"{sum(p.numel() for p in trainable) / 1e6:.3f}M trainable parameters; backend {prefixshare.patched_backend(model)}, "
        f"device {args.device}, {args.format} format; loss {args.loss} (beta {args.beta}), lr {lr}, reference {ref}"
    )

    # 6. the training loop ----------------------------------------------------------------------------------
    history = defaultdict(list)
    start = time.perf_counter()
    progress = tqdm(range(1, args.steps + 1), desc=f"{args.loss} ({'qlora' if args.qlora else 'lora'})", dynamic_ncols=True)
    for step in progress:
        batch = next(batches).to(args.device)
        loss, metrics = preference_step(model, batch, ref=ref, loss=args.loss, beta=args.beta)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        history["loss"].append(loss.item())
        for name, value in metrics.items():
            history[name].append(value.item())
        progress.set_postfix(
            loss=f"{history['loss'][-1]:.3f}",
            acc=f"{history['rewards/accuracies'][-1]:.2f}",
            margin=f"{history['rewards/margins'][-1]:.3f}",
        )
        if step % args.log_every == 0 or step == args.steps:
            window = slice(-args.log_every, None)
            shown = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
            means = "  ".join(f"{k} {sum(history[k][window]) / len(history[k][window]):+.4f}" for k in shown)
            progress.write(f"step {step:4d}  {means}  (means over the last {len(history['loss'][window])} steps)")

    # 7. summary --------------------------------------------------------------------------------------------
    n = max(1, min(10, args.steps // 2))
    print(f"\nsummary: {args.steps} steps in {time.perf_counter() - start:.1f} s")
    for name in ("loss", "rewards/accuracies", "rewards/margins"):
        first, last = history[name][:n], history[name][-n:]
        print(f"  {name:20s} first {n} steps {sum(first) / n:+.4f}   last {n} steps {sum(last) / n:+.4f}")
    return {"history": dict(history)}


if __name__ == "__main__":
    main()
