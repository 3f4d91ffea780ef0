"""Ray alone: the driver (driver.py) and what runs in each Ray Train worker (worker.py), the process-group
backend (backend.py), connecting to Ray (connect.py), a local head (head.py), the token (auth.py) and
the Jobs client (jobs.py). Nothing here runs a training step: that is training/."""

import os as _os

# Ray reads this when it is first imported: with it at 0 a local Ray advertises and binds
# 127.0.0.1 only. Export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 to join a multi-machine cluster
# from a driver on another host.
_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
