"""JSON of the provider's stream, parsed with orjson where it can.

Every data event of an answer is one JSON object (one per token), so the
parser is on the per-token path: orjson parses a Chat Completions chunk in
about 0.7 µs against the standard library's 4 µs (issue 10). What orjson
refuses and the standard library accepts (NaN, Infinity, 1e400, a lone
surrogate escape such as "\\ud800") is parsed by the standard library, so
an adapter accepts exactly what it accepted before; a document neither
takes raises `ValueError` (json.JSONDecodeError), as before. (orjson reads
an integer past 64 bits as a float where the standard library keeps the
int: token counts that large are garbage either way.)
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def parse_json(text: str) -> Any:
    """The document `text` holds; raises ValueError when it is not JSON."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
