"""Ray Data's settings for every pass omnistream runs, set in one place.

Every pass keeps its order (the stream, the token cache and the fitted codebooks depend on it). Ray
Data's own progress output is off: with stdout not a terminal it logs a line per operator every few
seconds (thousands in a demo), and omnistream's commands show their own progress bars and step lines.
`omnistream --verbose` (or OMNISTREAM_DATA_PROGRESS=1) turns Ray Data's progress back on.
"""

from __future__ import annotations

import logging
import os

PROGRESS_ENV = "OMNISTREAM_DATA_PROGRESS"


def data_context():
    """The current Ray Data context, set for omnistream's passes; returns it."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    progress = os.environ.get(PROGRESS_ENV, "0") not in ("", "0", "false")
    ctx.enable_progress_bars = progress
    # and no execution banners ("Starting execution of Dataset ...") through Ray Data's logger
    logging.getLogger("ray.data").setLevel(logging.INFO if progress else logging.WARNING)
    # and not its warning that they are off ("Progress bars disabled. To enable, set ...")
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if progress else logging.ERROR)
    return ctx
