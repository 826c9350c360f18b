"""Both kernel paths on a randomly initialised Llama of realistic shape: for every registered
method under each protocol, the per-token losses on the compiled kernels, on the reference path
at the same precision, and on the reference path at the exact precision; a cell passes when the
kernels' losses meet the correctness bar of docs/operators.md (2x the reference path's error
+ 16 float32 units), as in the self-check's model check (cabattn.selfcheck.compare_paths).

    python scripts/compare_paths.py                   # GPU: 8 layers, 32/8 heads of 128, bf16,
                                                      # L 4096, exact = float32
    python scripts/compare_paths.py --tiny --device cpu --methods h2o cab_v4   # the CI shape

Needs torch, transformers and cabattn only (no Ray, gguf or datasets): scripts/gpu_check.sh
runs it on the GPU machine, which has nothing else. Exit status 1 when a cell fails.
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cabattn import methods, selfcheck  # noqa: E402

REALISTIC = dict(layers=8, heads=32, kv_heads=8, head_dim=128, vocab=32000, length=4096)
TINY = dict(layers=2, heads=4, kv_heads=1, head_dim=64, vocab=512, length=256)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help=f"the self-check's shape {TINY} instead of {REALISTIC}")
    parser.add_argument("--length", type=int, help="tokens per window (default: the shape's)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16",
                                                                "float32"])
    parser.add_argument("--exact-dtype", choices=["float32", "float64"],
                        help="the reference path's exact run (default: float64 on the CPU, "
                             "float32 on CUDA, where float64 is slow)")
    parser.add_argument("--methods", nargs="+", default=methods.available())
    parser.add_argument("--protocols", nargs="+", default=["mask", "kv"],
                        choices=["mask", "kv"])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--kv-chunk", type=int, default=256)
    args = parser.parse_args(argv)
    shape = dict(TINY if args.tiny else REALISTIC)
    length = args.length or shape.pop("length")
    shape.pop("length", None)
    exact_dtype = getattr(torch, args.exact_dtype or (
        "float64" if args.device == "cpu" else "float32"))

    exact = selfcheck.random_llama(positions=length, **shape).to(args.device, exact_dtype)
    model = copy.deepcopy(exact).to(getattr(torch, args.dtype))
    ids = torch.randint(shape["vocab"], (1, length),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    print(f"random Llama {shape}, L {length}, {args.dtype} on {args.device} "
          f"({selfcheck.describe_device(args.device) if args.device != 'cpu' else 'CPU'}), "
          f"exact {str(exact_dtype).removeprefix('torch.')}, s = {args.sparsity}, "
          f"torch {torch.__version__}", flush=True)
    failed = 0
    for protocol in args.protocols:
        options = {"kv_chunk": args.kv_chunk} if protocol == "kv" else {}
        for name in args.methods:
            try:
                methods.get_method(name).check_protocol(protocol)
            except ValueError as err:
                print(f"{protocol:<4} {name:<14} n/a ({err})", flush=True)
                continue
            start = time.perf_counter()
            comparison = selfcheck.compare_paths(model, exact, ids, name, protocol,
                                                 args.sparsity, **options)
            failed += comparison.problem is not None
            print(f"{comparison.line()}  ({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"{failed} cells FAILED" if failed else "every cell within the bar")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
