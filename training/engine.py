"""DeepSpeed around the plain model: ZeRO sharding, precision, gradient accumulation, clipping.

The model (omnistream.model) is single-device PyTorch and knows nothing of this; everything about
distribution is applied here, from outside, the way torchtitan keeps `parallelize` apart from the
model (docs/architecture.md, "Layout").
"""

from __future__ import annotations

import math

from omnistream.configs import RunConfig, TrainConfig


def deepspeed_config(t: TrainConfig) -> dict:
    """DeepSpeed's JSON for a TrainConfig. bf16 (and fp16) keep fp32 master weights in the ZeRO optimizer
    (for stage 0, DeepSpeed's BF16_Optimizer does); the model computes its loss in fp32 itself."""
    zero = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        # our optimizer is torch's AdamW: DeepSpeed's fused one needs CUDA ops compiled
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def lr_lambda(t: TrainConfig):
    """Linear warmup to 1, then cosine down to min_lr_ratio at train.steps."""

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        p = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return f


def param_groups(model, weight_decay: float):
    """Decay matrices only; norms' gains and 1-D params are left alone (standard AdamW practice)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def skip_muon_import() -> None:
    """Building any ZeRO engine, DeepSpeed imports its Muon optimizer only to ask `isinstance(optimizer,
    MuonWithAuxAdam)`; that module wraps its kernels in torch.compile as it is imported, which loads torch's
    inductor: about 1 s of CPU in every rank, each time a worker group starts (building the tests' tiny
    ZeRO-3 engine in one process: 3.8 s of CPU with it, 2.7 s without). omnistream's optimizer is torch's
    AdamW, never Muon, so a stand-in module answers that question with a class nothing is an instance of;
    any other name asked of it loads the real module. Left alone where Muon is already imported."""
    import importlib
    import sys
    import types

    if MUON in sys.modules:
        return
    stand_in = types.ModuleType(MUON, "omnistream's stand-in (training/engine.skip_muon_import)")
    stand_in.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})

    def real(name: str):
        if name.startswith("__"):  # the import system's own questions (__path__, __spec__...)
            raise AttributeError(name)
        sys.modules.pop(MUON, None)
        return getattr(importlib.import_module(MUON), name)

    stand_in.__getattr__ = real
    package, _, name = MUON.rpartition(".")
    setattr(importlib.import_module(package), name, stand_in)  # an empty package: no kernels compiled
    sys.modules[MUON] = stand_in


def skip_cpu_shm_op() -> None:
    """On the CPU accelerator DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce op
    (C++, with the machine's compiler: about a minute of 2 cores on a fresh environment, then a load of
    the built op in every rank) that only its `inference_all_reduce` uses; training's collectives go
    through torch.distributed (gloo here) either way. Marked incompatible, it is never built."""
    from omnistream.common.checkpoint import name_cpu_accelerator

    name_cpu_accelerator()
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(cfg: RunConfig, load_universal: bool = False):
    """The model, its AdamW and LR schedule, wrapped by `deepspeed.initialize`; returns (engine, scheduler,
    parameter count).

    Needs torch.distributed initialised (Ray Train does it; `single_process_group()` for one process).
    Every rank builds the model from the same seed: ZeRO partitions it, and stage 0 needs it equal.
    `load_universal`: the checkpoint this engine will load is in DeepSpeed's universal form (written by
    another number of ranks; checkpoint.to_universal).
    """
    import deepspeed
    import torch
    import torch.distributed as dist

    from omnistream.model.model import GPT

    t = cfg.train
    skip_cpu_shm_op()
    skip_muon_import()
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    n_params = model.num_params()  # before ZeRO-3 partitions the parameters
    if t.activation_checkpointing:
        apply_activation_checkpointing(model)
    if t.compile:
        compile_blocks(model)
    # On CUDA the fused AdamW kernel: one launch for all parameters instead of ~10 per tensor. It needs the
    # parameters on the GPU when it is built, so the model goes there first (DeepSpeed would move it anyway).
    fused = torch.cuda.is_available() and not t.offload_optimizer
    if fused:
        model.to(torch.device("cuda", torch.cuda.current_device()))
    optimizer = torch.optim.AdamW(
        param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas, **({"fused": True} if fused else {})
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config={**deepspeed_config(t), **({"checkpoint": {"load_universal": True}} if load_universal else {})},
    )
    engine.checkpoint_engine = weights_only_checkpoint_engine(engine)
    if dist.get_world_size() == 1 and t.zero_stage == 0:
        # one rank has nothing to average: skip DeepSpeed's flatten / all-reduce / unflatten of every gradient
        engine.enable_backward_allreduce = False
    return engine, scheduler, n_params


def apply_activation_checkpointing(model) -> None:
    """Recompute each block's activations in backward instead of keeping them: activation memory drops
    from every intermediate of every block to one block's input per block (about 1/10 at these widths)
    for one extra forward, ~+33% step FLOPs. The block's forward is wrapped in place, so parameter names,
    checkpoints and exports are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        forward = block.forward
        block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def compile_blocks(model) -> None:
    """torch.compile each block (fused norms, rotary and SwiGLU; the attention stays the layout's kernel).
    Costs a compile at the first step; on one H100 at 337M it gave no gain (MFU 0.216 against 0.222,
    benchmarks/gpu_h100.json), so it is off by default. Repeated blocks share the compiled code. Names stay as they
    were (Module.compile is in place).
    Static shapes (dynamic=False): a training step's shapes never change, and the symbolic-shape path
    failed to lower FlexAttention inside a compiled block on an H100 (torch 2.11)."""
    for block in model.blocks:
        block.compile(dynamic=False)


def plain_copy(engine, cfg: RunConfig):
    """A full, unsharded fp32 copy of the model on this rank's device (under ZeRO-3 every rank gathers
    the partitions)."""
    import deepspeed

    from omnistream.model.model import GPT

    plain = GPT(cfg.model).to(engine.device)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        full = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    for n, p in plain.named_parameters():
        p.data.copy_(full[n])
    return plain


def pin_collectives_to_loopback() -> None:
    """A local cluster's collectives stay on 127.0.0.1: gloo's pairs and NCCL's bootstrap and socket
    transport open their listeners on the named interface (by default, the first non-loopback one)."""
    import os

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


def single_process_group() -> None:
    """torch.distributed for one process (world size 1, an in-memory store, no sockets): how the Trainer
    runs outside Ray, for the golden test and the GPU check."""
    import os

    import torch
    import torch.distributed as dist

    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)  # what a launcher sets, and DeepSpeed checks
    pin_collectives_to_loopback()  # NCCL opens a bootstrap listener even for one rank
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )


def weights_only_checkpoint_engine(engine):
    """DeepSpeed's torch checkpoint engine, but loading with weights_only=True (load_weights_only):
    DeepSpeed's own engine loads with weights_only=False."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    from omnistream.common.checkpoint import load_weights_only

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_weights_only(path, map_location)

    return WeightsOnlyCheckpointEngine(engine._config)
