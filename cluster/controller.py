"""Ray Train's TorchTrainer, whose controller starts without a runtime_env on a Ray started here.

Ray Train (2.60, its v2 API) starts the run's controller actor with a runtime_env that holds nothing but
environment variables (its ENV_VARS_TO_PROPAGATE that the driver set, and RAY_WARN_BLOCKING_GET_INSIDE_ASYNC
= 0). Every process the controller starts inherits it: the ranks, Ray Train's own actors (the data split's
coordinator, the dataset manager, the synchronization actor, the placement-group cleaner) and Ray Data's
actors and tasks of the stream. Ray starts each worker with a non-empty runtime_env through a shim process
(setup_worker.py) that imports Ray before the worker does: 0.4 s of CPU per worker, measured (10 actors: 8.7
-> 4.6 s of CPU on 2 cores).

A Ray that this process started with connect.own_environment (`omnistream train` with no cluster, a test
cluster) hands its workers that environment from its own processes already: where every variable the
controller would be given has the same value there, the controller is started without a runtime_env and
nothing of the run goes through the shim. Anywhere else (a cluster joined by address, a submitted job) this
is Ray Train's own TorchTrainer, unchanged.

The override mirrors TorchTrainer's `_initialize_and_run_controller` in Ray 2.60 (a private method of Ray
Train's): the controller on the driver's node, no CPU, run, result; no SIGINT handler, as Ray's own installs
none off the main thread, where the driver runs fit (driver._interruptible). Every local training test runs
through it; a Ray that renames the method simply never calls it.

On such a Ray the run also goes without Ray Train's placement-group cleaner (the override of
`_create_default_callbacks`, as private, leaves its callback out): a detached actor per run that asks the
state API, once a second, whether the controller is still alive, to remove the run's placement group if it
died and the driver lived on. Here a controller that dies ends the run's `fit` with an error either way, and
the Ray ends with this process (`omnistream train`'s), its placement groups with it; only a process that goes
on to start more runs on the same Ray (a test session) would find such a run's CPUs still held. Measured: 2.5
to 3 s of CPU per run for the cleaner's process (the suite makes 13 runs), beside the dashboard's answers.
"""

from __future__ import annotations

import ray
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.constants import (
    DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
    RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
    get_env_vars_to_propagate,
)


def controller_env() -> dict[str, str]:
    """What Ray Train would put in its controller's runtime_env, as it computes it."""
    env = get_env_vars_to_propagate()
    env.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    return env


def missing_on_nodes(workers_env: dict[str, str]) -> list[str]:
    """The variables of controller_env() that the Ray's processes, inheriting `workers_env`, lack or hold with
    another value: none, and the controller needs no runtime_env."""
    return sorted(k for k, v in controller_env().items() if workers_env.get(k) != v)


class OwnRayTorchTrainer(TorchTrainer):
    """TorchTrainer for a Ray whose processes inherit `workers_env` (connect.own_environment)."""

    def __init__(self, *args, workers_env: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self._workers_env = workers_env

    def _inherited(self) -> bool:
        """Whether the Ray's processes hold everything Ray Train would hand its controller."""
        return not missing_on_nodes(self._workers_env)

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if not self._inherited():
            return callbacks
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

        return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if not self._inherited():
            return super()._initialize_and_run_controller(**controller_init_kwargs)
        from ray.train.v2._internal.execution.controller import TrainController

        node = ray.get_runtime_context().get_node_id()
        controller = ray.remote(num_cpus=0, label_selector={ray._raylet.RAY_NODE_ID_KEY: node})(TrainController)
        handle = controller.remote(**controller_init_kwargs)
        ray.get(handle.run.remote())
        return ray.get(handle.get_result.remote())
