"""The method registry and the mask rules on plain tensors (cabattn.sparse_attention)."""
import dataclasses
import math

import helpers
import pytest
import torch

import cabattn
from cabattn import methods
from cabattn.grid import BlockGrid, kept_pairs
from cabattn.methods import KVState

ALL = methods.available()
SPARSE = [m for m in ALL if m != "dense"]
EVICTING = [m for m in helpers.kv_methods("evict") if m != "dense"]


def qkv(length=300, heads=6, kv_heads=2, batch=2, device="cpu"):
    """Head dim 64: one the CUDA kernels take."""
    return helpers.qkv(batch, heads, kv_heads, length, 64, device=device)


def causal_sdpa(q, k, v):
    group = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True)


def test_registry_lists_every_method():
    assert ALL == sorted(["dense", "h2o", "cab_v4", "cab_v3", "streaming_llm", "local_strided",
                          "random", "knorm", "oracle_topk", "quest", "tova", "snapkv",
                          "pyramidkv", "adakv"])


@pytest.mark.parametrize("name, params, message", [
    ("nope", {}, "valid methods: adakv, cab_v3, cab_v4, dense"),
    ("h2o", {"h2o_recent_ratio": 1.5}, "h2o_recent_ratio=1.5 must be a number in [0, 1]"),
    ("cab_v4", {"lambda_redundancy": -0.1}, "lambda_redundancy=-0.1 must be a number >= 0"),
    ("cab_v4", {"magnitude_ratio": -1}, "magnitude_ratio=-1 must be a number in [0, 1]"),
    ("cab_v3", {"magnitude_ratio": 0.5}, "has no parameter(s) ['magnitude_ratio']"),
    ("cab_v3", {"frc_select": "middle"}, "valid choices: high, low"),
    ("local_strided", {"pattern": "dilated"}, "valid choices: budget, fixed"),
    ("streaming_llm", {"n_sink": -4}, "n_sink=-4 must be an integer >= 0"),
])
def test_bad_method_parameters_name_the_valid_choices(name, params, message):
    with pytest.raises(ValueError) as err:
        methods.get_method(name, **params)
    assert message in str(err.value)


@pytest.mark.parametrize("options, message", [
    ({"sparsity": 1.0}, "sparsity 1.0 is outside [0, 1)"),
    ({"sparsity": -0.1}, "sparsity -0.1 is outside [0, 1)"),
    ({"sparsity": 0.5, "block_size": 48}, "valid: auto, 16, 32, 64, 128"),
    ({"sparsity": 0.5, "causal_selection": "future"}, "valid choices: strict, block"),
    ({"sparsity": 0.5, "k_min": 0}, "k_min 0 must be a positive integer"),
])
def test_bad_options_are_rejected(options, message):
    q, k, v = qkv(length=64)
    with pytest.raises(ValueError) as err:
        cabattn.sparse_attention(q, k, v, "h2o", **options)
    assert message in str(err.value)


@pytest.mark.parametrize("selection", ["strict", "block"])
@pytest.mark.parametrize("name", ALL)
def test_sparsity_zero_is_dense(name, selection, torch_device):
    q, k, v = qkv(device=torch_device)
    out = cabattn.sparse_attention(q, k, v, name, 0.0, causal_selection=selection)
    torch.testing.assert_close(out, causal_sdpa(q, k, v), atol=2e-5, rtol=1e-5)


def expected_density(grid: BlockGrid) -> float:
    """Every row keeps exactly k_b blocks; every kept off-diagonal block is a whole block."""
    sizes = grid.block_lengths().double()
    off_diagonal = (grid.row_budget().double() - 1) * grid.block_size
    kept = (sizes * off_diagonal + sizes * (sizes + 1) / 2).sum()
    return float(kept / (grid.length * (grid.length + 1) / 2))


@pytest.mark.parametrize("selection", ["strict", "block"])
@pytest.mark.parametrize("name", SPARSE)
def test_density_matches_the_budget(name, selection):
    q, k, _ = qkv(length=1000)
    layout = cabattn.select_blocks(q, k, name, 0.9, causal_selection=selection)
    grid = layout.grid
    assert (grid.block_size, grid.budget) == (16, 100)
    rows = grid.row_budget().expand_as(layout.block_count)
    # every row keeps its budget over the heads; per-head budgets (adakv) share it unevenly
    assert torch.equal(layout.block_count.sum(1), rows.sum(1))
    if name != "adakv":
        assert torch.equal(layout.block_count, rows)
    assert layout.density == pytest.approx(expected_density(grid), rel=1e-12)
    assert 0.1 < layout.density < 0.2


@pytest.mark.parametrize("name", [m for m in ALL if not methods.METHODS[m].reads_own_row])
def test_strict_selection_never_sees_the_future(name):
    q, k, v = qkv(length=400)
    cut = 137  # inside a block: tokens of the same block after the cut change too
    out = cabattn.sparse_attention(q, k, v, name, 0.9)
    for t in (q, k, v):
        t[:, :, cut:] = torch.randn_like(t[:, :, cut:])
    changed = cabattn.sparse_attention(q, k, v, name, 0.9)
    assert torch.equal(out[:, :, :cut], changed[:, :, :cut])
    assert not torch.equal(out[:, :, cut:], changed[:, :, cut:])


def test_block_selection_can_see_its_own_block():
    """The documented difference of causal_selection='block': a row's pick may depend on
    later tokens of its own block, so the output before a cut can change."""
    torch.manual_seed(1)
    q, k, v = qkv(length=400)
    cut = 200 + 3
    out = cabattn.sparse_attention(q, k, v, "cab_v3", 0.9, causal_selection="block")
    q[:, :, cut:] *= 50
    changed = cabattn.sparse_attention(q, k, v, "cab_v3", 0.9, causal_selection="block")
    assert not torch.equal(out[:, :, cut - 3:cut], changed[:, :, cut - 3:cut])


def test_random_is_seeded():
    q, k, _ = qkv(length=600)
    a = cabattn.select_blocks(q, k, "random", 0.9, seed=1).block_index
    b = cabattn.select_blocks(q, k, "random", 0.9, seed=1).block_index
    c = cabattn.select_blocks(q, k, "random", 0.9, seed=2).block_index
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_kept_pairs_counts_the_token_mask():
    q, k, _ = qkv(length=300, batch=1)
    layout = cabattn.select_blocks(q, k, "cab_v3", 0.8)
    mask = cabattn.reference.layout_to_mask(layout.block_count, layout.block_index, 300,
                                            layout.grid.block_size)
    assert torch.equal(kept_pairs(layout.block_count, layout.block_index, layout.grid),
                       mask.sum((-1, -2)).double())


def kv_state(n=200, budget=96, batch=2, kv_heads=2, group=3, dim=16, block_size=16):
    blocks = math.ceil(n / block_size)
    return KVState(keys=torch.randn(batch, kv_heads, n, dim),
                   positions=torch.arange(n).expand(batch, kv_heads, n).contiguous(),
                   mass=torch.rand(batch, kv_heads, n),
                   block_queries=torch.randn(batch, kv_heads * group, blocks, dim),
                   budget=budget, block_size=block_size, scale=dim ** -0.5,
                   recent_queries=torch.randn(batch, kv_heads * group, 32, dim))


@pytest.mark.parametrize("name", EVICTING)
def test_kv_keep_is_sorted_unique_within_budget_and_keeps_the_newest(name):
    state = kv_state()
    keep = methods.get_method(name).kv_keep(state)
    if isinstance(keep, methods.RaggedKeep):  # per-head counts (adakv): Hkv * K per batch row
        assert keep.counts.dtype == torch.int64 and keep.counts.shape == (2, 2)
        assert bool((keep.counts >= 1).all()) and keep.counts.sum(-1).tolist() == [192, 192]
        heads = [keep.index[b, g, :keep.counts[b, g]] for b in range(2) for g in range(2)]
    else:
        assert keep.shape[:2] == (2, 2) and 1 <= keep.shape[2] <= state.budget
        heads = list(keep.flatten(0, 1))
    for kept in heads:
        assert kept.dtype == torch.int64 and bool((kept.diff() > 0).all())
        if name != "tova":  # tova's newest entry competes with the rest (the TOVA paper's rule)
            assert int(kept[-1]) == state.positions.shape[-1] - 1


def test_kv_keep_h2o_keeps_a_heavy_hitter_and_the_recent_window():
    state = kv_state()
    state.mass[:, 1, 7] = 1e6
    keep = methods.get_method("h2o").kv_keep(state)
    assert bool((keep[:, 1] == 7).any(-1).all())
    assert set(range(200 - 48, 200)) <= set(keep[0, 0].tolist())


def test_kv_keep_streaming_llm_keeps_sinks_and_recent():
    keep = methods.get_method("streaming_llm", n_sink=4).kv_keep(kv_state())
    assert keep[0, 0].tolist() == [0, 1, 2, 3] + list(range(200 - 92, 200))


def test_kv_keep_cab_evicts_whole_blocks():
    state = kv_state(n=200, budget=96)  # 12 whole blocks + 8 newest tokens; room for 5
    for name in ("cab_v3", "cab_v4"):
        keep = methods.get_method(name).kv_keep(state)
        assert keep.shape[-1] == 5 * 16 + 8
        blocks = keep[..., :80].view(2, 2, 5, 16)
        assert bool((blocks % 16 == torch.arange(16)).all())
        assert keep[0, 0, -8:].tolist() == list(range(192, 200))


# -- rules and checks added with the local_strided / random / cab kv fixes ----------------------

@pytest.mark.parametrize("name, params, message", [
    ("cab_v3", {"temperature": 0}, "temperature=0 must be a number > 0"),
    ("cab_v3", {"frc_formula": "x"}, "valid choices: additive, multiplicative"),
    ("cab_v3", {"normalization": "l2"}, "valid choices: row_minmax, global_minmax"),
    ("cab_v3", {"pooling": "min"}, "valid choices: max_l2, mean"),
    ("h2o", {"lambda_redundancy": 0.3}, "its parameters are: h2o_recent_ratio"),
    ("local_strided", {"stride": 0}, "stride=0 must be a positive integer"),
])
def test_more_bad_parameters_name_the_valid_choices(name, params, message):
    with pytest.raises(ValueError) as err:
        methods.get_method(name, **params)
    assert message in str(err.value)


def test_register_makes_a_new_method_usable_without_touching_the_protocols():
    @methods.register
    class RecentOnly(methods.Method):
        name = "test_recent_only"

        def mask_plan(self, ctx):
            rule = ctx.grid.rule_budget(ctx.q.device)
            zeros = torch.zeros_like(rule)
            return methods.BlockPlan(n_recent=rule, n_sink=zeros, n_score1=zeros,
                                     n_score2=zeros)
    try:
        assert "test_recent_only" in methods.available()
        q, k, _ = qkv(length=400)
        layout = cabattn.select_blocks(q, k, "test_recent_only", 0.9)
        window = cabattn.select_blocks(q, k, "streaming_llm", 0.9, n_sink=0)
        assert torch.equal(layout.block_index, window.block_index)
    finally:
        del methods.METHODS["test_recent_only"]


@pytest.mark.parametrize("selection", ["strict", "block"])
def test_fixed_pattern_is_window_plus_strided_blocks(selection):
    q, k, _ = qkv(length=1024, batch=1)
    budget = cabattn.select_blocks(q, k, "local_strided", 0.9, causal_selection=selection)
    fixed = cabattn.select_blocks(q, k, "local_strided", 0.9, pattern="fixed",
                                  causal_selection=selection)
    # B = 16: a 256-token window is 16 blocks; a multiple of 64 starts every 4th block.
    for row in (3, 16, 40, 63):
        kept = set(fixed.block_index[0, 0, row, :fixed.block_count[0, 0, row]].tolist())
        window = set(range(max(row - 15, 0), row + 1))
        assert kept == window | set(range(0, row + 1, 4)), row
    assert fixed.density > budget.density


def test_random_strict_draws_every_pick_from_the_earlier_blocks():
    """k_b - 1 uniform draws from 0..I-1 (the previous block is not forced)."""
    q, k, _ = qkv(length=1000, batch=1)
    layout = cabattn.select_blocks(q, k, "random", 0.9)
    rows = torch.arange(layout.grid.num_blocks)
    previous_kept = (layout.block_index[0, :, 20:] == rows[20:, None] - 1).any(-1)
    assert previous_kept.float().mean() < 0.5  # 6 of 19..62 candidates, not always


def test_cab_v4_without_magnitude_is_cab_v3_and_frc_directions_differ():
    q, k, _ = qkv(length=1000)
    v3 = cabattn.select_blocks(q, k, "cab_v3", 0.9).block_index
    assert torch.equal(v3, cabattn.select_blocks(q, k, "cab_v4", 0.9,
                                                 magnitude_ratio=0.0).block_index)
    assert not torch.equal(v3, cabattn.select_blocks(q, k, "cab_v3", 0.9,
                                                     frc_select="low").block_index)


def test_dense_kv_keeps_everything():
    state = kv_state()
    assert torch.equal(methods.get_method("dense").kv_keep(state),
                       torch.arange(200).expand(2, 2, 200))


def test_kv_keep_local_strided_uses_the_smallest_power_of_two_stride_that_fits():
    keep = methods.get_method("local_strided").kv_keep(kv_state(n=200, budget=40))
    # last 20 entries; history 0..179 must fit 20 entries: stride 16 (12 entries), not 8 (23).
    assert keep[1, 1].tolist() == list(range(0, 180, 16)) + list(range(180, 200))
    with pytest.raises(ValueError, match="pattern='budget'"):  # the protocol asks, once
        methods.get_method("local_strided", pattern="fixed").check_protocol("kv")


def test_kv_keep_random_is_seeded_and_per_head():
    state = kv_state()
    rule = methods.get_method("random")
    a, b = rule.kv_keep(state), rule.kv_keep(state)
    assert torch.equal(a, b) and a.shape[-1] == state.budget
    assert not torch.equal(a[0, 0], a[0, 1])
    state.seed = 7
    assert not torch.equal(rule.kv_keep(state), a)


def test_kv_keep_cab_v4_keeps_the_block_with_most_received_mass():
    state = kv_state(n=200, budget=40)  # 12 whole blocks + 8 newest tokens; room for 2
    state.mass[:, 0, 32:48] = 100.0  # block 2 of KV head 0
    keep = methods.get_method("cab_v4").kv_keep(state)  # round(0.5 * 2) = 1 pick by mass
    assert bool((keep[:, 0] == 32).any(-1).all())


def test_kv_keep_cab_rejects_a_budget_smaller_than_the_newest_block():
    with pytest.raises(ValueError, match="block_size <= K"):
        methods.get_method("cab_v3").kv_keep(kv_state(n=200, budget=6))


def test_transposed_inputs_are_accepted():
    """Model code holds [B, L, H, d] and transposes: the public functions take such views."""
    q, k, v = qkv(length=200)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert not views[0].is_contiguous()
    torch.testing.assert_close(cabattn.sparse_attention(*views, "cab_v4", 0.7),
                               cabattn.sparse_attention(q, k, v, "cab_v4", 0.7), rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_parameters_are_declared_fields_with_a_doc_and_a_check(name):
    cls = methods.METHODS[name]
    assert dataclasses.is_dataclass(cls)
    method = methods.get_method(name)
    assert list(method.config) == list(cls.parameters())
    for spec in dataclasses.fields(cls):
        assert spec.metadata["doc"] and callable(spec.metadata["check"]), spec.name
        assert spec.metadata["check"](spec.default) is None  # every default is valid
        assert method.config[spec.name] == spec.default


def test_cab_v3_has_no_magnitude_ratio_to_hide():
    cab_v3 = methods.get_method("cab_v3")
    assert "magnitude_ratio" not in cab_v3.config and not hasattr(cab_v3, "magnitude_ratio")
    assert cab_v3.magnitude_share() == 0.0
    with pytest.raises(ValueError, match="no parameter"):
        methods.get_method("cab_v3", magnitude_ratio=0.5)
    assert methods.get_method("cab_v4", magnitude_ratio=0.25).magnitude_share() == 0.25


# -- keep_sink_blocks (docs/methods.md) ----------------------------------------------------------

@pytest.mark.parametrize("name", ["cab_v3", "cab_v4"])
def test_keep_sink_blocks_zero_is_the_seed_rule(name):
    """The seed's plan (diagonal, round(share * picks) by Gblk, the rest by FRC, no sinks)
    built by hand gives the layout of keep_sink_blocks=0."""
    from cabattn.methods.common import round_ratio
    from cabattn.sparse import layout_from_plan, make_grid
    q, k, _ = qkv()
    method = methods.get_method(name, keep_sink_blocks=0)
    layout = cabattn.select_blocks(q, k, method, 0.8)
    grid = make_grid(method, q.shape[2], 0.8)
    ctx = methods.MaskContext(q, k, grid, q.shape[-1] ** -0.5)
    plan = method.mask_plan(ctx)
    rule = grid.rule_budget()
    picks = (rule - 1).clamp(min=0)
    by_magnitude = round_ratio(picks, method.magnitude_share())
    seed_plan = methods.BlockPlan(rule.clamp(max=1), torch.zeros_like(rule), by_magnitude,
                                  picks - by_magnitude, plan.score1, plan.score2)
    seed = layout_from_plan(seed_plan, grid, q.shape[0], q.shape[1], q.device)
    assert torch.equal(layout.block_count, seed.block_count)
    assert torch.equal(layout.block_index, seed.block_index)


@pytest.mark.parametrize("selection", ["strict", "block"])
@pytest.mark.parametrize("name", ["cab_v3", "cab_v4"])
def test_keep_sink_blocks_keeps_block_zero_in_every_row_inside_the_budget(name, selection):
    q, k, _ = qkv()
    plain = cabattn.select_blocks(q, k, name, 0.8, causal_selection=selection)
    sunk = cabattn.select_blocks(q, k, name, 0.8, causal_selection=selection,
                                 keep_sink_blocks=2)
    assert bool((sunk.block_index[..., 0] == 0).all())
    assert not bool((plain.block_index[..., 0] == 0).all())  # the FRC alone drops it somewhere
    rows = torch.arange(sunk.grid.num_blocks)
    has_block_1 = (sunk.block_index == 1).any(-1)
    assert bool(has_block_1[..., rows >= 1 + sunk.grid.shift].all())
    assert torch.equal(sunk.block_count, plain.block_count)  # counted inside the budget
    assert sunk.density == pytest.approx(plain.density)


@pytest.mark.parametrize("name", ["cab_v3", "cab_v4"])
def test_kv_keep_sink_blocks_keeps_the_first_blocks_inside_the_budget(name):
    state = kv_state(n=200, budget=56)  # 12 whole blocks + 8 newest tokens; room for 3
    state.mass[..., :32] = 0.0  # nothing would pick blocks 0 and 1 by received mass
    plain = methods.get_method(name).kv_keep(state)
    keep = methods.get_method(name, keep_sink_blocks=2).kv_keep(state)
    assert keep.shape == plain.shape
    assert bool((keep[..., :32] == torch.arange(32)).all())
    assert keep[0, 0, -8:].tolist() == list(range(192, 200))
    assert not bool((plain[..., :32] == torch.arange(32)).all())
