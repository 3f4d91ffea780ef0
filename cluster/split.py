"""Ray Train's dataset split for omnistream's stream, in order.

A module of its own, importing Ray Train's `DataConfig` and nothing of torch: Ray Train sends the split to
its DatasetManager actor, a process that otherwise never imports torch. Kept beside the process-group
backend (cluster/backend.py), which imports torch through Ray Train's TorchConfig, it cost every run a
torch import there: the DatasetManager process used 3.5 s of a core per run with it and 1.8 s without
(2 cores, CPU time of each process sampled over tests/integration/test_sources_run.py's 4 runs).
"""

from __future__ import annotations

from ray.train import DataConfig


class OrderedSplit(DataConfig):
    """Ray Train's dataset split, but deterministic: blocks go to the ranks in turn (block b to rank
    b mod world), in stream order, the tail included.

    The stock split (`equal=True`) evens out the ranks' row counts at the end of the stream by cutting
    blocks; here the stream is cut into blocks of one rank-step each (pipelines/rows.py), so handing them
    out in turn already gives every rank the same number of rows per step, and the global order of the
    rows consumed does not depend on the number of ranks (the Trainer checks each micro-batch's place)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        out = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            opts = self._resolve_execution_options(name)
            opts.preserve_order = True
            ds.context.execution_options = opts
            for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=None)):
                out[i][name] = split
        return out
