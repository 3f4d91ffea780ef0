"""Ties it together: config, Ray Train + DeepSpeed training, MLflow tracking, the CLI."""
import os as _os

# Ray reads this when it is first imported: with it at 0 a local Ray advertises and binds
# 127.0.0.1 only. Export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 to join a multi-machine cluster
# from a driver on another host.
_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
