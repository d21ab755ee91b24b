"""Cases that once found a bug, kept as JSON files and replayed in CI.

`bench/fuzz.py --save-failures DIR` writes every failing case of a run there
(`case-<index>-<status>.json`); a case worth keeping is copied to
tests/fuzz/corpus/ with a line in its `note` saying what it found and what
fixed it. The frames are hex, so the file holds the exact bytes sent.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenrelay_devtools.fuzz.generate import FuzzCase


def load(directory: Path) -> list[tuple[Path, FuzzCase]]:
    return [
        (path, FuzzCase.from_json(json.loads(path.read_text())))
        for path in sorted(directory.glob("*.json"))
    ]
