"""Under ops.deferred_checks, the kernels flag bad index inputs into a device word instead of
reading a flag back after each call: a forward has no host synchronisation of theirs, so it can
be captured in a CUDA graph, and a replay gives the loss of an eager forward (GPU only).

The captured forward is a 2-layer random Llama whose attention selects its key blocks on the
device (coarsen -> frc_scores -> select_blocks with fixed per-row counts, as cab_v3 plans them)
and attends with block_sparse_attention: the protocols' own planning reads per-row budgets back
to size the layout, which a graph cannot capture, so the test plans the counts once, up front.
"""
import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from cabattn import ops, reference, selfcheck

pytestmark = pytest.mark.gpu  # CUDA graphs need a CUDA device (pyproject.toml: markers)

BLOCK, LENGTH, KEEP = 16, 256, 4  # 16 blocks, each row keeps its diagonal + 3 by curvature


def _device_planned_attention(module, query, key, value, attention_mask, scaling=None,
                              **kwargs):
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    blocks = reference.num_blocks(q.shape[2], BLOCK)
    rows = torch.arange(blocks, device=q.device, dtype=torch.int32)
    rule = torch.clamp(torch.clamp(rows + 1, max=KEEP) - 1, min=0)  # strict: earlier blocks
    zero = torch.zeros_like(rule)
    frc = ops.frc_scores(ops.coarsen(q, BLOCK), ops.coarsen(k, BLOCK), scaling, 0.3)
    count, index = ops.select_blocks(None, frc, zero, zero, zero, rule, 1, KEEP)
    out, _ = ops.block_sparse_attention(q, k, v, count, index, BLOCK, scaling)
    return out.transpose(1, 2).contiguous(), None


def test_a_forward_captured_in_a_cuda_graph_replays_with_the_eager_loss():
    AttentionInterface.register("cabattn_graph_test", _device_planned_attention)
    # sdpa's mask function: None for a plain causal batch, with no host read of its own
    AttentionMaskInterface.register("cabattn_graph_test", sdpa_mask)
    model = selfcheck.random_llama(positions=LENGTH).to("cuda", torch.bfloat16)
    model.set_attn_implementation("cabattn_graph_test")
    g = torch.Generator().manual_seed(0)
    first, second = (torch.randint(model.config.vocab_size, (1, LENGTH), generator=g).cuda()
                     for _ in range(2))

    def loss(ids):
        return model(ids, labels=ids, use_cache=False).loss

    with torch.inference_mode():
        eager = [loss(first).item(), loss(second).item()]
        static = first.clone()
        warmup = torch.cuda.Stream()
        warmup.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warmup), ops.deferred_checks():
            for _ in range(2):
                loss(static)
        torch.cuda.current_stream().wait_stream(warmup)
        graph = torch.cuda.CUDAGraph()
        with ops.deferred_checks():  # read back once, after the capture and the replays
            with torch.cuda.graph(graph):
                captured = loss(static)
            graph.replay()
            replayed_first = captured.item()
            static.copy_(second)
            graph.replay()
            replayed_second = captured.item()
    assert replayed_first == pytest.approx(eager[0], rel=1e-6, abs=0)
    assert replayed_second == pytest.approx(eager[1], rel=1e-6, abs=0)
    assert eager[0] != eager[1]
