"""Local paths made from names someone else chose (object keys in a listing, paths in a manifest): each
must stay inside the folder it is written to or read from. Mosaic streaming and Energon refuse paths outside
their roots the same way, and MLflow refuses `..` in artifact paths."""

from __future__ import annotations

from pathlib import Path


def inside(root: str | Path, rel: str) -> Path | None:
    """`root / rel` when `rel` is a plain relative path that stays inside `root` (no `..`, `.` or empty
    segment, not absolute, no backslash or NUL, and no link under `root` leading out); else None."""
    if not rel or "\\" in rel or "\x00" in rel or any(p in ("..", ".", "") for p in rel.split("/")):
        return None  # (an absolute path's first segment is empty)
    base = Path(root).resolve()
    target = (base / rel).resolve()
    return target if target.is_relative_to(base) and target != base else None
