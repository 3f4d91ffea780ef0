"""Quality filters: each modality judges its own decoded objects.

A record is filtered (not errored) when one of its fields fails a check: the bytes were fine,
the content is not what a model should learn from. The checks come from each modality through
its protocol (`Modality.quality_reason`, with typed settings `Modality.Filters`), so a plugin
modality has filters the same way the built-ins do. The settings are `[data.quality.<modality>]`;
the reason names are the metric names (`data/filtered/<reason>`), e.g. `text_too_short`.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from omnistream.common.errors import UserError
from omnistream.modalities.base import BaseModality, FilterOptions


def build_filters(
    mods: dict[str, BaseModality] | dict[str, type], quality: dict[str, dict[str, Any]]
) -> dict[str, FilterOptions]:
    """Each modality's validated filter settings; a bad key or value is a UserError naming it."""
    unknown = sorted(set(quality) - set(mods))
    if unknown:
        raise UserError(f"data.quality names {unknown}, which this run's modalities {list(mods)} do not include")
    out = {}
    for name, m in mods.items():
        cls = m if isinstance(m, type) else type(m)
        try:
            out[name] = getattr(cls, "Filters", FilterOptions)(**quality.get(name, {}))
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(x) for x in err["loc"])
            raise UserError(f"data.quality.{name}.{key}: {err['msg']}") from None
    return out
