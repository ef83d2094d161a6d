"""Tokenizers in local folders (transformers' AutoTokenizer, never the hub) and as files to store in a model folder.

Every vistrain VLM checkpoint and model folder keeps its tokenizer under `tokenizer/` (TOKENIZER_DIR), so a
folder answers questions alone.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

TOKENIZER_DIR = "tokenizer"  # inside every VLM checkpoint and model folder


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved in a local folder. A path that is not a folder is an error at once (given a name that
    looks like a repo id, transformers would otherwise retry the network for a minute)."""
    from transformers import AutoTokenizer  # here: transformers is an optional extra (hf), and slow to import

    if not Path(folder).is_dir():
        raise ValueError(f"{folder} is not a folder: give a local folder with the tokenizer files (vistrain does "
                         "not download)")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, the tokenizers library's own)
        raise ValueError(f"the tokenizer in {folder} cannot be read ({type(e).__name__}: {e})") from None


def tokenizer_assets(tokenizer: Any) -> dict[str, bytes]:
    """The tokenizer's files as a model folder's assets: {"tokenizer/<file>": bytes}."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {f"{TOKENIZER_DIR}/{p.name}": p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
