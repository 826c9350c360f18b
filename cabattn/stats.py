"""What a model ran under cabattn.apply() / cabattn.model_attention(): the protocol's record.

Each protocol fills a ProtocolStats while the model runs and reports itself through `record()`
(protocol, block size, its own options, the method's parameters, realised density, timings), so
a caller stores that record as it is and never needs to know which protocol produced it.
DenseStats is the same record for the model's own attention.
"""
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch

# A row margin below this share of the row's score range counts as a near tie: well above the
# float32 rounding of the scores (~1e-6 of their range), well below a typical margin.
SMALL_MARGIN = 1e-3


@dataclass
class ProtocolStats:
    """Realised density per layer and head, and where the time went.

    Pairs are summed over every forward: kept (query, key) pairs and causal pairs per layer,
    each a float64 tensor [Hq]. Density = kept / causal.
    """
    protocol: str = ""
    options: dict = field(default_factory=dict)  # the protocol's own options, e.g. kv_chunk
    params: dict = field(default_factory=dict)  # the method's parameters, defaults filled in
    block_size: Optional[int] = None  # of the latest window (set by the protocol)
    budget_tokens: Optional[int] = None  # K of the latest window (set by the protocol)
    k_min: Optional[int] = None
    kept: dict = field(default_factory=dict)
    causal: dict = field(default_factory=dict)
    oracle_selection: bool = False
    # "upper_bound": the selection read the queries it serves (Method.reads_own_row)
    oracle: Optional[str] = None
    # kv protocol: "evict" (the cache is bounded) or "select" (the attended keys are)
    kv_mode: Optional[str] = None
    # the query rows the density is counted over: "all", "context" (the mask protocol's
    # block-sparse prefill when the continuation is decoded densely) or "continuation" (the
    # prefill protocol's: its context is prefilled densely by definition)
    density_rows: str = "all"
    # what a sequence's context and its continuation attended to (docs/protocols.md)
    context_attention: str = ""
    continuation_attention: str = ""
    # the model's attention features each layer honoured (cabattn.protocol.LayerAttention):
    # {layer: window} of the layers that keep the model's sliding window instead of the
    # method's budget, and the logit soft-cap
    model_windows: dict = field(default_factory=dict)
    softcap: Optional[float] = None
    # prefill protocol: per layer, int64 [B, Hkv, K_l] sorted absolute positions each KV head
    # kept after the latest forward's compression (-1 past a head's own count)
    kept_positions: Optional[list] = None
    seconds: dict = field(default_factory=lambda: {"selection": 0.0, "attention": 0.0})
    # CUDA (what, start event, end event) not yet added to `seconds`: reading them waits for
    # the GPU, so that happens once, when the seconds are read, not inside the forward.
    pending: list = field(default_factory=list)
    # What the kept attention explains (docs/metrics.md), summed over every forward as [measured,
    # out of] pairs; the sums may be device tensors, read (and waited for) only by record().
    recall: dict = field(default_factory=dict)  # layer -> [kept softmax mass, query rows]
    sink: list = field(default_factory=lambda: [0, 0])  # [rows/caches holding key 0, all]
    cached_age: list = field(default_factory=lambda: [0, 0])  # [summed age, cached entries]
    # layer -> [sum of squared (dense - method) outputs, sum of squared dense outputs]
    output_error: dict = field(default_factory=dict)
    # Near ties (cabattn.ties, docs/block_statistics.md): [tie-decided, all] max_l2 block
    # representatives; [kept blocks whose score read one, all kept off-diagonal blocks]; the
    # score margins of the rows a score stage picked for (device tensors until record()).
    pooling_ties: list = field(default_factory=lambda: [0, 0])
    picks_near_ties: list = field(default_factory=lambda: [0, 0])
    margins: list = field(default_factory=list)

    def note_layers(self, layers: list) -> None:
        """The model's attention features the protocol honours, per layer (LayerAttention)."""
        self.model_windows = {i: f.window for i, f in enumerate(layers) if f.window}
        self.softcap = next((f.softcap for f in layers if f.softcap), None)

    def add_pairs(self, layer_idx: int, kept: torch.Tensor, causal: torch.Tensor) -> None:
        """Per-head kept and causal pair counts; summed on their device (no host read inside a
        forward: reading happens in record())."""
        kept, causal = kept.detach().double(), causal.detach().double()
        if layer_idx in self.kept:
            self.kept[layer_idx] += kept
            self.causal[layer_idx] += causal
        else:
            self.kept[layer_idx], self.causal[layer_idx] = kept.clone(), causal.clone()

    def add_recall(self, layer_idx: int, kept_mass, rows: int) -> None:
        """Dense softmax mass (summed over rows, each row's being 1) inside what was kept."""
        measured = self.recall.setdefault(layer_idx, [0, 0])
        measured[0] = measured[0] + kept_mass
        measured[1] += rows

    def add_output_error(self, layer_idx: int, squared_difference, squared_dense) -> None:
        """||O_dense - O_method||_F^2 and ||O_dense||_F^2 of one forward of a layer."""
        sums = self.output_error.setdefault(layer_idx, [0, 0])
        sums[0] = sums[0] + squared_difference
        sums[1] = sums[1] + squared_dense

    def layer_output_error(self) -> dict:
        """{layer: ||O_dense - O_method||_F / ||O_dense||_F over every forward}."""
        return {layer: (float(diff) / float(dense)) ** 0.5 if float(dense) > 0 else 0.0
                for layer, (diff, dense) in self.output_error.items()}

    @property
    def attention_output_error(self) -> Optional[float]:
        """Mean over layers of layer_output_error(), None when not measured."""
        errors = self.layer_output_error()
        return sum(errors.values()) / len(errors) if errors else None

    @property
    def attention_output_error_max_layer(self) -> Optional[float]:
        return max(self.layer_output_error().values(), default=None)

    def add_sink(self, holding_first, total: int) -> None:
        """How many of `total` query-block rows (mask) or caches (kv) hold key 0."""
        self.sink[0] = self.sink[0] + holding_first
        self.sink[1] += total

    def add_pooling_ties(self, decided, total: int) -> None:
        self.pooling_ties[0] = self.pooling_ties[0] + decided
        self.pooling_ties[1] += total

    def add_picks_near_ties(self, near, kept) -> None:
        self.picks_near_ties[0] = self.picks_near_ties[0] + near
        self.picks_near_ties[1] = self.picks_near_ties[1] + kept

    def add_margins(self, margins: torch.Tensor) -> None:
        self.margins.append(margins.detach())

    def add_cached_age(self, age_sum, entries: int) -> None:
        """Summed age (newest cached position - position) of `entries` cached tokens."""
        self.cached_age[0] = self.cached_age[0] + age_sum
        self.cached_age[1] += entries

    @contextmanager
    def timing(self, what: str, device: torch.device):
        """Adds the time the block takes to `selection` or `attention` seconds: on the GPU the
        stream's time between two CUDA events (so work queued before the block, such as the
        previous layer's attention, is not counted), on the CPU the wall time."""
        if device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True),
                          torch.cuda.Event(enable_timing=True))
            start.record()
            try:
                yield
            finally:
                end.record()
                self.pending.append((what, start, end))
        else:
            start = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[what] += time.perf_counter() - start

    def _settle(self) -> dict:
        for what, start, end in self.pending:
            end.synchronize()
            self.seconds[what] += start.elapsed_time(end) / 1000
        self.pending.clear()
        return self.seconds

    @property
    def selection_seconds(self) -> float:
        return self._settle()["selection"]

    @property
    def attention_seconds(self) -> float:
        return self._settle()["attention"]

    @property
    def density(self) -> float:
        """Kept / causal pairs over every layer and head (1.0 before any forward)."""
        if not self.kept:
            return 1.0
        kept = sum(float(t.sum()) for t in self.kept.values())
        causal = sum(float(t.sum()) for t in self.causal.values())
        return kept / causal

    def layer_recall(self) -> dict:
        """{layer: share of the dense causal softmax mass inside the kept layout, averaged over
        heads and query rows} (empty unless the protocol measured it)."""
        return {layer: float(mass) / rows for layer, (mass, rows) in self.recall.items()}

    @property
    def attention_recall(self) -> Optional[float]:
        """Mean over layers of layer_recall(), None when not measured."""
        recall = self.layer_recall()
        return sum(recall.values()) / len(recall) if recall else None

    @property
    def attention_recall_min_layer(self) -> Optional[float]:
        return min(self.layer_recall().values(), default=None)

    @property
    def sink_retention(self) -> Optional[float]:
        """Share of query-block rows (mask) or (layer, KV head, step) caches (kv) that hold
        key 0 (None when nothing was counted)."""
        return float(self.sink[0]) / self.sink[1] if self.sink[1] else None

    @property
    def mean_cached_age(self) -> Optional[float]:
        """Mean age in tokens of what a cache holds after each step (kv protocol)."""
        return float(self.cached_age[0]) / self.cached_age[1] if self.cached_age[1] else None

    @property
    def pooling_tie_share(self) -> Optional[float]:
        """Share of max_l2 block representatives (queries and keys) the first-index rule chose
        among tokens inside the tolerance (None when nothing was pooled by max_l2)."""
        return float(self.pooling_ties[0]) / self.pooling_ties[1] if self.pooling_ties[1] else None

    @property
    def selection_tie_share(self) -> Optional[float]:
        """Share of kept off-diagonal blocks whose score read a tie-decided representative."""
        decided, kept = (float(n) for n in self.picks_near_ties)
        return decided / kept if self.pooling_ties[1] and kept else None

    def _margins(self) -> Optional[torch.Tensor]:
        return torch.cat([m.cpu() for m in self.margins]) if self.margins else None

    @property
    def row_margin_median(self) -> Optional[float]:
        """Median over scored rows of (last kept - first dropped score) / the row's range."""
        margins = self._margins()
        return float(margins.median()) if margins is not None and margins.numel() else None

    @property
    def row_margin_small_share(self) -> Optional[float]:
        """Share of scored rows whose margin is below SMALL_MARGIN (a near tie)."""
        margins = self._margins()
        if margins is None or not margins.numel():
            return None
        return float((margins < SMALL_MARGIN).double().mean())

    @property
    def selection_share(self) -> Optional[float]:
        """Selection time over attention time."""
        attention = self.attention_seconds
        return self.selection_seconds / attention if attention > 0 else None

    def layer_head_density(self) -> dict:
        """{layer: [density of each query head]}."""
        return {layer: (self.kept[layer] / self.causal[layer]).tolist() for layer in self.kept}

    def record(self) -> dict:
        """What ran and what it cost, for a results file (JSON types only)."""
        return {"density": self.density, "block_size": self.block_size, "k_min": self.k_min,
                "budget_tokens": self.budget_tokens,
                "protocol": self.protocol, **self.options, "params": dict(self.params),
                "selection_seconds": self.selection_seconds,
                "attention_seconds": self.attention_seconds,
                "oracle_selection": self.oracle_selection, "oracle": self.oracle,
                "kv_mode": self.kv_mode, "density_rows": self.density_rows,
                "context_attention": self.context_attention,
                "continuation_attention": self.continuation_attention,
                "model_windows": {str(k): v for k, v in self.model_windows.items()} or None,
                "softcap": self.softcap,
                "selection_share": self.selection_share,
                "attention_recall": self.attention_recall,
                "attention_recall_min_layer": self.attention_recall_min_layer,
                "attention_output_error": self.attention_output_error,
                "attention_output_error_max_layer": self.attention_output_error_max_layer,
                "sink_retention": self.sink_retention, "mean_cached_age": self.mean_cached_age,
                "pooling_tie_share": self.pooling_tie_share,
                "selection_tie_share": self.selection_tie_share,
                "row_margin_median": self.row_margin_median,
                "row_margin_small_share": self.row_margin_small_share,
                "layer_head_density": {str(k): v for k, v in self.layer_head_density().items()}}


class DenseStats:
    """The record of the model's own attention: nothing selected, every causal pair kept, no
    cabattn operator run (kernels None)."""
    density = 1.0

    def record(self) -> dict:
        return {"density": 1.0, "block_size": None, "budget_tokens": None,
                "protocol": "dense", "kernels": None, "params": {},
                "selection_seconds": 0.0, "attention_seconds": None, "oracle_selection": False,
                "oracle": None, "kv_mode": None, "density_rows": "all",
                "context_attention": "dense", "continuation_attention": "dense",
                "model_windows": None, "softcap": None,
                "selection_share": None, "attention_recall": None,
                "attention_recall_min_layer": None, "attention_output_error": None,
                "attention_output_error_max_layer": None, "sink_retention": None,
                "mean_cached_age": None, "pooling_tie_share": None,
                "selection_tie_share": None, "row_margin_median": None,
                "row_margin_small_share": None, "layer_head_density": None}
