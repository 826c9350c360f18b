"""Calls every cabattn operator on small CUDA inputs and checks it against the float64
reference, then feeds the kernels bad indices and checks they raise (and that a later call still
works). Small on purpose: scripts/gpu_check.sh runs it under compute-sanitizer (memcheck,
racecheck, synccheck, initcheck), where every kernel runs a hundred times slower.

Three cases (docs/operators.md, Correctness bar): block size 128, L = 200 (not a multiple of
the block), head dim 128, float16; block size 16, L = 200, head dim 64, bfloat16; and Gemma's
features (docs/operators.md, Model features): block size 64, L = 200, head dim 256, bfloat16,
4 query heads on 1 KV head, logits soft-capped at 1.0, attention_with_scores through a sliding
window of 50; all with GQA.

    python scripts/cuda_smoke.py [--case fp16-d128-b128|bf16-d64-b16|bf16-d256-b64-softcap ...]
    (exit code 1 when an operator disagrees or a bad input does not raise)
"""
import argparse
import sys

import torch

from cabattn import ops, reference

CASES = {  # name: (dtype, head_dim, block_size, length, q_heads, kv_heads, softcap, window)
    "fp16-d128-b128": (torch.float16, 128, 128, 200, 6, 2, 0.0, 0),
    "bf16-d64-b16": (torch.bfloat16, 64, 16, 200, 4, 1, 0.0, 0),
    "bf16-d256-b64-softcap": (torch.bfloat16, 256, 64, 200, 4, 1, 1.0, 50),
}


def relative_error(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def run_case(dtype, dim, block, length, q_heads, kv_heads, softcap, window):
    """Errors of every operator against the float64 reference (0/1 for the exact ones)."""
    dev, batch = "cuda", 2
    scale = reference.default_scale(dim)
    q = torch.randn(batch, q_heads, length, dim, device=dev, dtype=dtype)
    k = torch.randn(batch, kv_heads, length, dim, device=dev, dtype=dtype)
    v = torch.randn(batch, kv_heads, length, dim, device=dev, dtype=dtype)
    qd, kd, vd = q.double().cpu(), k.double().cpu(), v.double().cpu()
    errors = {}

    qc = ops.coarsen(q, block, ops.MAX_L2)
    kc = ops.coarsen(k, block, ops.MEAN)
    errors["coarsen"] = max(
        relative_error(qc, reference.coarsen(q.cpu(), block, ops.MAX_L2)),
        relative_error(kc, reference.coarsen(kd, block, ops.MEAN)))

    sblk, gblk = ops.block_scores(q, k, block, scale, softcap)
    want_s, want_g = reference.block_scores(qd, kd, block, scale, softcap)
    errors["block_scores"] = max(relative_error(sblk, want_s), relative_error(gblk, want_g))

    frc = ops.frc_scores(qc, kc, scale, 0.3)
    errors["frc_scores"] = relative_error(frc, reference.frc_scores(qc.cpu(), kc.cpu(), scale,
                                                                    0.3))

    m = reference.num_blocks(length, block)
    rows = torch.arange(m, dtype=torch.int32)
    budget = torch.clamp(rows + 1, max=3)
    n_recent = torch.clamp(budget - 1, max=1)
    n_sink = torch.zeros(m, dtype=torch.int32)
    n_score1 = torch.clamp(budget - 1 - n_recent, min=0)
    n_score2 = torch.zeros(m, dtype=torch.int32)
    counts = [t.to(dev) for t in (n_recent, n_sink, n_score1, n_score2)]
    count, index = ops.select_blocks(frc, None, *counts, 1, 3)
    want_count, want_index = reference.select_blocks(frc.cpu(), None, n_recent, n_sink,
                                                     n_score1, n_score2, 1, 3)
    errors["select_blocks"] = float(not (torch.equal(count.cpu(), want_count)
                                         and torch.equal(index.cpu(), want_index)))

    out, lse = ops.block_sparse_attention(q, k, v, count, index, block, scale, softcap)
    want_out, want_lse = reference.block_sparse_attention(qd, kd, vd, count.cpu(), index.cpu(),
                                                          block, scale, softcap)
    errors["block_sparse_attention"] = max(relative_error(out, want_out),
                                           relative_error(lse, want_lse))

    chunk = 24
    out, lse, mass = ops.attention_with_scores(q[:, :, -chunk:].contiguous(), k, v, scale,
                                               softcap, window)
    want_out, want_lse, want_mass = reference.attention_with_scores(
        qd[:, :, -chunk:], kd, vd, scale, softcap, window)
    errors["attention_with_scores"] = max(relative_error(out, want_out),
                                          relative_error(lse, want_lse),
                                          relative_error(mass, want_mass))

    keep = torch.sort(torch.randperm(length, device=dev)[:length // 2]).values
    keep = keep.expand(batch, kv_heads, -1).contiguous()
    compacted, expected = k.clone(), k.clone()
    ops.kv_compact_(compacted, keep)
    reference.kv_compact_(expected, keep)
    errors["kv_compact_"] = float(not torch.equal(compacted, expected))

    # Bad indices: each must raise, touch no memory out of bounds (memcheck watches) and leave
    # the process able to run the next call.
    bad_index = index.clone()
    bad_index[0, 0, -1, 0] = m + 5  # past the last block
    bad_index[1, 0, 1, 0] = -7
    bad_keep = keep.clone()
    bad_keep[0, 0, -1] = length + 3
    raised = 0
    calls = (lambda: ops.block_sparse_attention(q, k, v, count, bad_index, block, scale),
             lambda: ops.kv_compact_(k.clone(), bad_keep))
    for call in calls:
        try:
            call()
        except RuntimeError:
            raised += 1
    try:  # the same under deferred checks: nothing read back per call, one raise on leaving
        with ops.deferred_checks():
            for call in calls:
                call()
    except RuntimeError:
        raised += 1
    again = k.clone()
    ops.kv_compact_(again, keep)
    errors["bad indices raise"] = float(raised != 3 or not torch.equal(again, expected))
    torch.cuda.synchronize()
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), nargs="+", default=sorted(CASES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("cuda_smoke: no CUDA device present")
        return 1
    # Half inputs: about 1e-2 relative at most; the selection and copy ops must be exact.
    limits = {"select_blocks": 0.0, "kv_compact_": 0.0, "bad indices raise": 0.0}
    failed = False
    for name in args.case:
        torch.manual_seed(0)
        print(f"case {name}: dtype, head_dim, block_size, length, q_heads, kv_heads, softcap, "
              f"window = {CASES[name]}")
        for op, error in run_case(*CASES[name]).items():
            limit = limits.get(op, 2e-2)
            ok = error <= limit
            failed |= not ok
            print(f"  {op:24s} error {error:.2e} (limit {limit:.0e}) {'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
