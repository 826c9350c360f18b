"""The reference path (kernels="reference", cabattn.reference_path): its operators meet the
correctness bar (docs/operators.md) on the self-check's shapes, and every method under both
protocols gives the kernels' per-token losses and density on a tiny model (docs/selfcheck.md,
"The reference path")."""
import copy

import pytest
import torch

import cabattn
from cabattn import methods, ops, reference, reference_path, selfcheck

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_reference_path_meets_the_bar_on_every_self_check_shape():
    """Selection in plain PyTorch and attention in FlexAttention, held to the CUDA kernels' bar
    (half outputs against the half-precision reference, as FlexAttention rounds like them)."""
    with ops.use_kernels("reference"):
        verdict = selfcheck.run_checks("cpu", selfcheck.operator_checks(half_reference=True))
    assert verdict.passed, verdict.failures
    assert verdict.checks == len(selfcheck.operator_checks())


def test_sdpa_stands_in_where_flex_attention_is_missing(monkeypatch):
    monkeypatch.setattr(reference_path, "_flex", None)
    q, k, v = (torch.randn(2, h, 150, 64, dtype=torch.float64) for h in (4, 1, 1))
    assert reference_path.attention_backend(q) == "sdpa"
    count = torch.tensor([1, 2, 2, 3, 2, 2, 4, 1, 3, 2], dtype=torch.int32).expand(2, 4, 10)
    index = torch.full((2, 4, 10, 4), -1, dtype=torch.int32)
    for row, c in enumerate(count[0, 0].tolist()):  # the diagonal and the c - 1 blocks before
        index[..., row, :c] = torch.arange(row - c + 1, row + 1, dtype=torch.int32)
    count, index = count.contiguous(), index.contiguous()
    with ops.use_kernels("reference"):
        out, lse = ops.block_sparse_attention(q, k, v, count, index, 16, 0.125)
    want_out, want_lse = reference.block_sparse_attention(q, k, v, count, index, 16, 0.125)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse.float())


def test_an_unknown_kernel_path_is_named_before_the_model_is_touched():
    model = selfcheck.random_llama()
    with pytest.raises(ValueError, match="kernels 'triton' is not valid; valid choices: "
                                         "extension, reference"):
        with cabattn.apply(model, "h2o", 0.5, kernels="triton"):
            pass
    assert model.config._attn_implementation != "cabattn_mask"


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer random Llama (4/1 heads of 64) in float32, its float64 copy, 256 tokens."""
    model = selfcheck.random_llama()
    ids = torch.randint(model.config.vocab_size, (1, 256),
                        generator=torch.Generator().manual_seed(3))
    return model, copy.deepcopy(model).double(), ids


def _density(model, ids, kernels, method, protocol, options):
    with torch.no_grad(), cabattn.apply(model, method, 0.75, protocol=protocol,
                                        kernels=kernels, **options) as stats:
        model(ids, labels=ids)
    assert stats.record()["kernels"] == kernels
    return stats.density


@pytest.mark.parametrize("protocol,options", [("mask", {"block_size": 32}),
                                              ("kv", {"kv_chunk": 16, "block_size": 32})])
@pytest.mark.parametrize("method", methods.available())
def test_every_method_gives_the_kernels_loss_on_the_reference_path(tiny, method, protocol,
                                                                   options):
    model, exact, ids = tiny
    try:
        methods.get_method(method).check_protocol(protocol)
    except ValueError as err:  # no rule for this protocol: both paths refuse alike
        for kernels in ops.KERNEL_PATHS:
            with pytest.raises(ValueError, match=str(err)[:40]):
                _density(model, ids, kernels, method, protocol, options)
        return
    comparison = selfcheck.compare_paths(model, exact, ids, method, protocol, 0.75, **options)
    assert comparison.problem is None, comparison.line()
    assert (_density(model, ids, "reference", method, protocol, options)
            == _density(model, ids, "extension", method, protocol, options))
