"""The typed config tree: every section and field, each with a default and a one-line description
(`omnistream config show --doc`). load.py layers defaults, a TOML file and `--set` overrides into it.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from omnistream.common.errors import UserError
from omnistream.common.logs import redact
from omnistream.modalities import registry
from omnistream.model.config import GPTConfig
from omnistream.pipelines.config import DataConfig
from omnistream.pipelines.democorpus import CorpusSpec


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainConfig(_Section):
    steps: int = Field(300, ge=1, description="optimizer steps to train (fewer if the stream ends first)")
    micro_batch_size: int = Field(8, ge=1, description="packed rows per worker per forward pass")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    lr: float = Field(3e-3, gt=0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at lr × this")
    warmup_steps: int = Field(20, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay (matrices only)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0 = off)")
    zero_stage: int = Field(
        3, ge=0, le=3, description="DeepSpeed ZeRO stage: 0 none, 1 optimizer, 2 +gradients, 3 +parameters"
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="training precision (bf16 needs hardware support to be fast)"
    )
    register_as: str = Field(
        "",
        description="when set, the final checkpoint is exported and registered in MLflow's "
        "model registry under this name (as `omnistream export ... --register NAME`)",
    )
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: keep optimizer states on the CPU")
    log_every: int = Field(10, ge=1, description="steps between logged training metrics")
    eval_every: int = Field(0, ge=0, description="steps between evaluations (0 = only at the end)")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints Ray Train keeps")
    max_failures: int = Field(
        0,
        ge=-1,
        description="worker-group failures tolerated; the run starts the group again from its newest complete "
        "checkpoint (-1 = unlimited)",
    )
    resume_from: str = Field(
        "",
        description="checkpoint directory to resume from, or a run's folder (its newest complete checkpoint); on any "
        "number of workers ('' = start fresh)",
    )
    loss_weights: dict[str, float] = Field(
        default_factory=dict,
        description="per-modality loss weight, e.g. { text = 1.0, image = 0.5 }: the loss is the mean of each label "
        "token's loss times its modality's weight (unnamed modalities 1); train/loss/<modality> stays unweighted",
    )
    torch_threads: int = Field(1, ge=1, description="intra-op threads per training worker (OMP_NUM_THREADS)")
    activation_checkpointing: bool = Field(
        False,
        description="recompute each block's activations in backward: activation memory falls to about one "
        "block input per block (~1/10 here) for ~33% more step FLOPs; for models that do not fit",
    )
    compile: bool = Field(
        False,
        description="torch.compile each Transformer block (static shapes); measured on an H100 "
        "at 337M: no gain (FlexAttention is one kernel already); for new kernels",
    )


class ClusterConfig(_Section):
    address: str = Field("", description="'' starts a local Ray in this process (127.0.0.1 only); else a Ray address")
    num_workers: int = Field(2, ge=1, description="training workers (one DeepSpeed rank each)")
    cpus_per_worker: float = Field(
        0.5, gt=0, description="CPUs each training worker asks of Ray (fractions leave room for Ray Data)"
    )
    use_gpu: bool = Field(False, description="one GPU per training worker")
    worker_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each training worker needs, e.g. {trainer = 1}"
    )
    placement_strategy: Literal["PACK", "SPREAD"] = Field(
        "PACK",
        description="how Ray places the training workers: PACK fills as few nodes as it can (fast collectives); "
        "SPREAD puts them on as many as it can (a lost node takes fewer ranks with it)",
    )
    local_cpus: int = Field(0, ge=0, description="CPUs a local Ray offers (0 = this machine's count)")
    storage_path: str = Field("runs/ray", description="where Ray Train persists checkpoints (local path or URI)")


class TrackingConfig(_Section):
    backend: str = Field(
        "mlflow",
        description="where runs are recorded: mlflow, tensorboard, or a backend a package "
        "registers under the omnistream.trackers entry points",
    )
    uri: str = Field(
        "",
        description="the store: for mlflow a tracking URI ('' = sqlite:///mlflow.db in the working "
        "directory; http:// for a server), for tensorboard a folder ('' = runs/tensorboard)",
    )
    experiment: str = Field("omnistream", description="experiment name (tensorboard: a folder under uri)")
    run_name: str = Field("", description="run name ('' = the config's name)")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="the backend's own settings, checked by its Options model, e.g. for tensorboard: flush_secs = 5",
    )
    buffer_metrics: int = Field(
        100_000,
        ge=1000,
        description="metric values held while the tracking server is "
        "unreachable (training goes on; beyond this the oldest are dropped and counted)",
    )
    flush_timeout_s: float = Field(
        120.0,
        ge=0,
        description="at the end of training, how long to wait for held metrics to reach the tracking server",
    )
    system_metrics_interval_s: float = Field(
        10.0,
        ge=0,
        description="seconds between samples of each node's CPU, "
        "memory, disk, network and GPU (system/<node>/...; 0 = off)",
    )

    @model_validator(mode="after")
    def _options(self):
        if self.options:  # the backend's own model checks them (tracking.backend_options); none: nothing to load
            from omnistream.tracking import backend_options

            backend_options(self.backend, self.options)
        return self


class EvalTask(_Section):
    """A cross-modal task: prompt with one modality (or, kind "parts", several parts) of a held-out record,
    generate another, check the answer."""

    kind: str = Field(
        "generate",
        description="what the task does: generate (prompt with `prompt`, generate `target`, "
        "match the answer against `label_field`), or a kind a package registers under the "
        "omnistream.eval_tasks entry points (training/evaluate.py, TaskKind)",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="settings of the task's kind beyond these")
    prompt: str | list[str] = Field(
        description='modality of the prompt, e.g. image; a "parts" task: the modalities its prompt parts must '
        'hold, e.g. ["image", "audio"]'
    )
    target: str = Field("text", description="modality generated as the answer, e.g. text")
    label_field: str = Field(description="field of the record's JSON (.json member) that holds the expected answer")
    match: Literal["exact", "contains", "number", "numbers"] = Field(
        "contains",
        description="how the generated answer is checked: exact (whole answer, case and outer spaces "
        "ignored), contains (the label appears in it), number (the first number in it, as "
        "numerals or English number words, equals the label), numbers (the numbers it names, in order, "
        'are the label\'s: "3 7" is "three then seven")',
    )


class EvalConfig(_Section):
    tasks: dict[str, EvalTask] = Field(
        default_factory=dict,
        description="cross-modal tasks by name, logged as "
        'eval/<name>/accuracy, e.g. [eval.tasks.image_to_text] prompt = "image" ...',
    )
    examples: int = Field(
        200,
        ge=1,
        description="held-out records each task scores (its own: the first that carry what it prompts with and its "
        "label), and records whose documents give eval/loss",
    )
    loss_rows: int = Field(64, ge=1, description="held-out packed rows used for eval/loss/<modality>")
    max_new_tokens: int = Field(6, ge=1, description="tokens generated for a →text answer")
    batch_size: int = Field(50, ge=1, description="prompts generated together")
    samples: int = Field(3, ge=0, description="generated examples logged as files per task")


class GenerateDefaults(_Section):
    """How a model writes one target modality unless a request says otherwise (`[generate.<modality>]`): saved
    into the exported model, read by `omnistream generate` and the served model."""

    temperature: float = Field(0.0, ge=0, description="sampling temperature (0: greedy)")
    top_k: int = Field(0, ge=0, description="sample from the k likeliest tokens (0: all)")
    top_p: float = Field(1.0, gt=0, le=1, description="sample from the smallest set of tokens reaching p (1: all)")
    cfg_scale: float = Field(
        1.0, description="classifier-free guidance scale (1: the prompt alone; needs data.cfg_dropout in training)"
    )
    max_new_tokens: int = Field(
        0, ge=0, description="length bound of the span (0: the model's room); it ends at its end marker before"
    )


class RunConfig(_Section):
    name: str = Field("demo", description="run name")
    seed: int = Field(0, description="seed of everything: shard order, modality order, init")
    modalities: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"text": {}, "image": {}, "audio": {}},
        description="modalities in vocabulary order, each with its plugin's options",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="shards and the token stream")
    model: GPTConfig = Field(default_factory=GPTConfig, description="the decoder Transformer")
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimisation, DeepSpeed, checkpoints")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray cluster and placement")
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="where the run is recorded (MLflow by default)"
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="held-out evaluation")
    generate: dict[str, GenerateDefaults] = Field(
        default_factory=dict,
        description="generation defaults per target modality, e.g. [generate.image] cfg_scale = 3 "
        "(flags and request params override them)",
    )
    demo: CorpusSpec = Field(default_factory=CorpusSpec, description="the corpus `omnistream demo` writes first")

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, v):
        if not v:
            raise ValueError("at least one modality is needed")
        for name, opts in v.items():
            registry.build(name, opts)  # UserError naming the plugin and key
        registry.check_keys(v)
        return v

    @model_validator(mode="after")
    def _modality_names(self):
        names = list(self.modalities)
        unknown = sorted(set(self.train.loss_weights) - set(names))
        if unknown:
            raise ValueError(f"train.loss_weights names {unknown}, which this run's modalities {names} do not include")
        bad = {k: v for k, v in self.train.loss_weights.items() if not (0 <= v < float("inf"))}
        if bad or (self.train.loss_weights and not any(self.train.loss_weights.get(n, 1.0) > 0 for n in names)):
            raise ValueError(f"train.loss_weights must be finite, at least 0, and not all 0: {self.train.loss_weights}")
        unknown = sorted(set(self.data.mix.shares) - set(names))
        if unknown:
            raise ValueError(f"data.mix.shares names {unknown}, which this run's modalities {names} do not include")
        unknown = sorted(set(self.generate) - set(names))
        if unknown:
            raise ValueError(f"generate names {unknown}, which this run's modalities {names} do not include")
        for task, t in self.eval.tasks.items():
            for role in ("prompt", "target"):
                v = getattr(t, role)
                if any(x not in names for x in ([v] if isinstance(v, str) else v)):
                    raise ValueError(f"eval.tasks.{task}.{role} is {v!r}, not of this run's modalities {names}")
        from omnistream.pipelines.quality import build_filters

        try:
            build_filters({n: registry.get(n) for n in names}, self.data.quality)
            for src_name, src in self.data.sources.items():
                try:
                    build_filters({n: registry.get(n) for n in names}, src.quality)
                except UserError as e:
                    raise UserError(f"data.sources.{src_name}.quality: {e}") from None
        except UserError as e:
            raise ValueError(str(e)) from None
        return self

    def modality_names(self) -> list[str]:
        return list(self.modalities)

    def tracking_uri(self) -> str:
        from omnistream.tracking import resolve_uri

        return resolve_uri(self.tracking.backend, self.tracking.uri)

    def resolved_paths(self) -> RunConfig:
        """A copy whose local paths are absolute, so Ray workers (other cwd) find them."""
        c = self.model_copy(deep=True)
        c.data.bundle_dir = _abs(c.data.bundle_dir)
        if c.data.sources:
            for src in c.data.sources.values():
                src.shards = [_abs(s) for s in src.shards]
        else:
            c.data.train_shards = [_abs(s) for s in c.data.train_shards]
        c.data.eval_shards = [_abs(s) for s in c.data.eval_shards]
        if c.data.token_cache != "auto":
            c.data.token_cache = _abs(c.data.token_cache)
        c.cluster.storage_path = _abs(c.cluster.storage_path)
        if c.train.resume_from:
            c.train.resume_from = _abs(c.train.resume_from)
        c.tracking.uri = c.tracking_uri()
        c.tracking.run_name = c.tracking.run_name or c.name
        return c

    def to_toml(self, redacted: bool = False) -> str:
        """The whole config as TOML; `redacted`: URLs' passwords as *** (what a tracking store is sent)."""
        return tomli_w.dumps(self._dump(redacted))

    def flat(self, redacted: bool = False) -> dict[str, Any]:
        return flatten(self._dump(redacted))

    def _dump(self, redacted: bool) -> dict:
        d = self.model_dump(mode="json")
        return _redacted(d) if redacted else d


def _redacted(v):
    if isinstance(v, dict):
        return {k: _redacted(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_redacted(x) for x in v]
    return redact(v) if isinstance(v, str) else v


def _abs(p: str) -> str:
    return p if "://" in p else os.path.abspath(p)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
