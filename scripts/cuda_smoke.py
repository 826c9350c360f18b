"""Calls every cabattn operator once on small CUDA inputs and checks it against the float64
reference. Small on purpose: scripts/gpu_check.sh runs it under compute-sanitizer (memcheck,
racecheck), where every kernel runs a hundred times slower.

    python scripts/cuda_smoke.py        (exit code 1 when an operator disagrees)
"""
import sys

import torch

from cabattn import ops, reference


def relative_error(got, want):
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def main() -> int:
    if not torch.cuda.is_available():
        print("cuda_smoke: no CUDA device present")
        return 1
    torch.manual_seed(0)
    dev, dtype = "cuda", torch.bfloat16
    batch, q_heads, kv_heads, length, dim, block = 1, 4, 2, 80, 64, 16
    scale = reference.default_scale(dim)
    q = torch.randn(batch, q_heads, length, dim, device=dev, dtype=dtype)
    k = torch.randn(batch, kv_heads, length, dim, device=dev, dtype=dtype)
    v = torch.randn(batch, kv_heads, length, dim, device=dev, dtype=dtype)
    qd, kd, vd = q.double().cpu(), k.double().cpu(), v.double().cpu()
    errors = {}

    qc = ops.coarsen(q, block, ops.MAX_L2)
    kc = ops.coarsen(k, block, ops.MEAN)
    errors["coarsen"] = max(
        relative_error(qc.cpu(), reference.coarsen(q.cpu(), block, ops.MAX_L2)),
        relative_error(kc.cpu(), reference.coarsen(k.float().cpu(), block, ops.MEAN)))

    sblk, gblk = ops.block_scores(q, k, block, scale)
    want_s, want_g = reference.block_scores(qd, kd, block, scale)
    errors["block_scores"] = max(relative_error(sblk.cpu(), want_s),
                                 relative_error(gblk.cpu(), want_g))

    frc = ops.frc_scores(qc, kc, scale, 0.3)
    errors["frc_scores"] = relative_error(frc.cpu(),
                                          reference.frc_scores(qc.cpu(), kc.cpu(), scale, 0.3))

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

    out, lse = ops.block_sparse_attention(q, k, v, count, index, block, scale)
    want_out, want_lse = reference.block_sparse_attention(qd, kd, vd, count.cpu(), index.cpu(),
                                                          block, scale)
    errors["block_sparse_attention"] = max(relative_error(out.cpu(), want_out),
                                           relative_error(lse.cpu(), want_lse))

    chunk = 24
    out, lse, mass = ops.attention_with_scores(q[:, :, -chunk:].contiguous(), k, v, scale)
    want_out, want_lse, want_mass = reference.attention_with_scores(
        qd[:, :, -chunk:], kd, vd, scale)
    errors["attention_with_scores"] = max(relative_error(out.cpu(), want_out),
                                          relative_error(lse.cpu(), want_lse),
                                          relative_error(mass.cpu(), want_mass))

    keep = torch.sort(torch.randperm(length, device=dev)[:length // 2]).values
    keep = keep.expand(batch, kv_heads, -1).contiguous()
    compacted, expected = k.clone(), k.clone()
    ops.kv_compact_(compacted, keep)
    reference.kv_compact_(expected, keep)
    errors["kv_compact_"] = float(not torch.equal(compacted, expected))
    torch.cuda.synchronize()

    # bf16 inputs: about 1e-2 relative at most; the selection and copy ops must be exact.
    limits = {"select_blocks": 0.0, "kv_compact_": 0.0}
    failed = False
    for name, error in errors.items():
        limit = limits.get(name, 2e-2)
        ok = error <= limit
        failed |= not ok
        print(f"{name:24s} error {error:.2e} (limit {limit:.0e}) {'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
