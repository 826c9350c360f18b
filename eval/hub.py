"""Whether the Hugging Face hub answers, asked once per process and quickly."""
import functools
import os
import urllib.error
import urllib.request

OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 5.0) -> bool:
    """True when the hub endpoint answers HTTP at all; False offline or when told to be.

    Checked up front so that a missing hub fails at once with a useful message instead of
    after the client libraries' retries.
    """
    if any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
           for name in OFFLINE_ENV):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # it answered, even if not with 200
    except (urllib.error.URLError, OSError):
        return False
    return True
