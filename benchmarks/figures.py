"""What every bench script ends with: its figures written to a JSON file and printed as an aligned table."""

from __future__ import annotations

import json
from pathlib import Path


def report(figures: dict, path: str, title: str) -> None:
    Path(path).write_text(json.dumps(figures, indent=1))
    width = max(map(len, figures))
    print(f"\n{title}")
    for k, v in figures.items():
        print(f"  {k:{width}s}  {v}")
    print(f"written to {path}")
