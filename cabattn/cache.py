"""The one cache folder cabattn and its harness share (models, corpora, the self-check's
verdicts): $CABATTN_CACHE, else ~/.cache/cabattn."""
import os
from pathlib import Path

CACHE_ENV = "CABATTN_CACHE"


def cache_dir(override=None) -> Path:
    """override, else $CABATTN_CACHE, else ~/.cache/cabattn; created if missing."""
    path = Path(override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cabattn")
    path = path.expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
