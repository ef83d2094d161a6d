"""Where vistrain caches what it computes once (VQA token lengths, the digits judge, reference statistics).
A leaf module: it imports nothing of vistrain."""

import os


def default_cache_dir() -> str:
    """$VISTRAIN_CACHE_DIR, else ~/.cache/vistrain."""
    return os.environ.get("VISTRAIN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vistrain")
