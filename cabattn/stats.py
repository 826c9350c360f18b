"""Statistics a protocol collects while a model runs under cabattn.apply()."""
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class ProtocolStats:
    """Realised density per layer and head, and where the time went.

    Pairs are summed over every forward since the last reset(): kept (query, key) pairs and
    causal pairs per layer, each a float64 tensor [Hq]. Density = kept / causal.
    """
    kept: dict = field(default_factory=dict)
    causal: dict = field(default_factory=dict)
    selection_seconds: float = 0.0
    attention_seconds: float = 0.0
    oracle_selection: bool = False

    def add_pairs(self, layer_idx: int, kept: torch.Tensor, causal: torch.Tensor) -> None:
        kept, causal = kept.detach().double().cpu(), causal.detach().double().cpu()
        if layer_idx in self.kept:
            self.kept[layer_idx] += kept
            self.causal[layer_idx] += causal
        else:
            self.kept[layer_idx], self.causal[layer_idx] = kept.clone(), causal.clone()

    @contextmanager
    def timing(self, what: str):
        """Adds the wall time of the block to `selection` or `attention` seconds."""
        start = time.perf_counter()
        try:
            yield
        finally:
            attr = f"{what}_seconds"
            setattr(self, attr, getattr(self, attr) + time.perf_counter() - start)

    @property
    def density(self) -> float:
        """Kept / causal pairs over every layer and head (1.0 before any forward)."""
        if not self.kept:
            return 1.0
        kept = sum(float(t.sum()) for t in self.kept.values())
        causal = sum(float(t.sum()) for t in self.causal.values())
        return kept / causal

    def layer_head_density(self) -> dict:
        """{layer: [density of each query head]}."""
        return {layer: (self.kept[layer] / self.causal[layer]).tolist() for layer in self.kept}

    def reset(self) -> None:
        self.kept.clear()
        self.causal.clear()
        self.selection_seconds = self.attention_seconds = 0.0

    def as_dict(self) -> dict:
        return {"density": self.density, "selection_seconds": self.selection_seconds,
                "attention_seconds": self.attention_seconds,
                "oracle_selection": self.oracle_selection,
                "layer_head_density": {str(k): v for k, v in self.layer_head_density().items()}}
