#!/usr/bin/env python
"""The compatibility matrix: does prefix sharing give the same numbers as the plain model?

The command line over :mod:`prefixshare.testing.matrix`, which holds the logic: the deep matrix (every
architecture x backend x adapter x packing x dtype cell of seven tiny architectures, ``matrix.deep``), the
breadth matrix (every causal LM of the installed transformers, ``matrix.breadth``) and compat/MATRIX.md
(``matrix.report``). This script parses the arguments, shows the progress (a bar on stderr where it is a
terminal, one line per group of cells or model type) and writes the report.

Usage::

    python compat/run_matrix.py --out compat/MATRIX.md            # every cell this machine can run
    python compat/run_matrix.py --quick                            # a representative subset, table to stdout
    python compat/run_matrix.py --arch gemma2 --backend eager,flex_attention --json cells.json
    python compat/run_matrix.py --breadth-only --model-type llama,qwen3_moe   # some rows of the breadth section

The exit status is 1 when a cell that ran failed, so CI can call the script directly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

try:
    import prefixshare  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefixshare.testing import matrix
from prefixshare.tools.machine import describe_machine


def _choices(values, allowed, what):
    if not values:
        return tuple(allowed)
    chosen = [v.strip() for value in values for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return tuple(v for v in allowed if v in chosen)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="write the Markdown table here (default: print it)")
    parser.add_argument("--json", help="also write every cell as JSON here")
    parser.add_argument("--arch", action="append", help=f"architectures, comma separated ({', '.join(matrix.ARCHITECTURES)})")
    parser.add_argument("--backend", action="append", help=f"backends ({', '.join(matrix.BACKENDS)})")
    parser.add_argument("--adapter", action="append", help=f"adapters ({', '.join(matrix.ADAPTERS)})")
    parser.add_argument("--packing", action="append", help=f"packings ({', '.join(matrix.PACKINGS)})")
    parser.add_argument("--dtype", action="append", help=f"dtypes ({', '.join(matrix.DTYPES)})")
    parser.add_argument("--quick", action="store_true", help="a representative subset: " + str(matrix.QUICK))
    parser.add_argument(
        "--breadth", action="store_true",
        help="also check every causal-LM model type of the installed transformers (the breadth section)",
    )
    parser.add_argument("--breadth-only", action="store_true", help="only the breadth section")
    parser.add_argument("--model-type", action="append", help="breadth: these model types only (comma separated)")
    parser.add_argument("--device", default=matrix.default_device(), help="cpu or cuda[:n] (default: %(default)s)")
    parser.add_argument("--examples", type=int, default=3, help="examples per batch (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s; 0 = torch's default)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # peft 0.21 calls a transformers 5 method deprecated for v6: not what this script checks
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    architectures = _choices(args.arch, matrix.ARCHITECTURES, "architecture")
    packings = _choices(args.packing, matrix.PACKINGS, "packing")
    if args.quick:
        # --quick narrows what --arch / --packing chose (everything when they are not given)
        architectures = tuple(a for a in architectures if a in matrix.QUICK["architectures"])
        packings = tuple(p for p in packings if p in matrix.QUICK["packings"])
    settings = matrix.Settings(device=args.device, num_examples=args.examples, seed=args.seed, threads=args.threads or None)
    torch.manual_seed(args.seed)

    start = time.perf_counter()
    print(f"prefixshare compatibility matrix on {args.device}", file=sys.stderr)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    cells = [] if args.breadth_only else matrix.run_matrix(
        architectures,
        _choices(args.backend, matrix.BACKENDS, "backend"),
        _choices(args.adapter, matrix.ADAPTERS, "adapter"),
        packings,
        _choices(args.dtype, matrix.DTYPES, "dtype"),
        settings,
        log=log,
        progress=True,
    )
    seconds = time.perf_counter() - start
    breadth, breadth_seconds = [], 0.0
    if args.breadth or args.breadth_only:
        model_types = [t.strip() for v in args.model_type or [] for t in v.split(",") if t.strip()] or None
        breadth_start = time.perf_counter()
        breadth_settings = matrix.Settings(device=args.device, seed=args.seed)
        breadth = matrix.run_enumeration(model_types, breadth_settings, log=log, progress=True)
        breadth_seconds = time.perf_counter() - breadth_start

    command = " ".join(["python", "compat/run_matrix.py", *(argv if argv is not None else sys.argv[1:])])
    machine = describe_machine(args.device)
    markdown = matrix.render_report(
        cells, breadth, command=command, device=args.device, machine=machine, seconds=seconds,
        breadth_seconds=breadth_seconds, examples=matrix.make_examples(settings), packings=packings,
    )
    if args.out:
        Path(args.out).write_text(markdown + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(markdown)
    if args.json:
        payload = matrix.json_report(cells, breadth, command=command, machine=machine, seconds=seconds)
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    failed = [c for c in cells if c.state in (matrix.FAIL, matrix.ERROR)]
    failed += [r for r in breadth if r.status in (matrix.FAIL, matrix.ERROR)]
    print(f"{len(cells)} cells, {len(breadth)} model types in {time.perf_counter() - start:.0f} s; {len(failed)} failed",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
