"""Reading the JSON files of other projects' folders (config.json, preprocessor_config.json, ...), with errors that
name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path, error: type[ValueError], where: str = "") -> dict[str, Any]:
    """The JSON object in `path`. Raises `error` (the format's own exception type) naming `where` (default: the
    path) when the file cannot be read, is not JSON, or holds something other than an object."""
    where = where or str(path)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise error(f"{where}: cannot read {Path(path).name} as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise error(f"{where}: {Path(path).name} is not a JSON object")
    return data
