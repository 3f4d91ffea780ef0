"""The model and the real Trainer on a GPU: run where one is (torch + deepspeed needed; no Ray).

    python3 benchmarks/gpu_check.py [--out gpu.json]
    python3 benchmarks/gpu_check.py --cpu-smoke      # the same path, tiny, on the CPU (a dry run)

1. the same weights and packed batch (documents, positions, document mask) give the same loss on
   CUDA in fp32 as on the CPU;
2. training through omnistream's Trainer (DeepSpeed ZeRO-3, bf16, world size 1; the loop users run,
   not a copy): tokens/s, MFU (6N + attention FLOPs per token, against the card's dense bf16 peak)
   and peak memory, for the demo model and a ~350M-parameter one, as the Trainer logs them;
3. greedy generation runs on CUDA and matches the CPU's ids.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from omnistream.cluster.config import load_config
from omnistream.cluster.engine import single_process_group
from omnistream.cluster.tracking import MemoryTracker
from omnistream.cluster.trainer import Trainer
from omnistream.modalities import registry
from omnistream.modalities.vocab import Vocabulary
from omnistream.model.model import GPT, GPTConfig, generate
from omnistream.pipelines.packing import pack_documents


def batch(vocab: int, rows: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    docs, mods, keys = [], [], []
    while sum(len(d) for d in docs) < rows * seq * 1.1:
        L = int(rng.integers(8, seq // 2))
        docs.append(rng.integers(3, vocab, L))
        mods.append(np.ones(L, np.int64))
        keys.append(str(len(keys)))
    out = pack_documents(docs, mods, keys, seq)
    return {k: torch.as_tensor(out[k][:rows]) for k in ("input_ids", "labels", "position_ids", "doc_ids")}


def tiny_vocab() -> Vocabulary:
    """A real one-modality vocabulary (a byte-level BPE fitted on a few strings): the Trainer's
    bookkeeping needs modality names; the model's own vocab_size is set by the config below."""
    text = registry.build("text", {"vocab_size": 260})
    text.fit([f"sample {i} of a tiny corpus" for i in range(50)])
    return Vocabulary([text])


def synthetic_batches(vocab_size: int, rows: int, seq: int):
    """Packed rows of random documents, forever, in the stream's format (keys and modality ids included)."""
    rng = np.random.default_rng(0)
    n = 0
    while True:
        docs, mods, keys = [], [], []
        while sum(len(d) for d in docs) < rows * seq * 1.1:
            L = int(rng.integers(8, seq // 2))
            docs.append(rng.integers(3, vocab_size, L))
            mods.append(np.ones(L, np.int64))
            keys.append(f"0:synthetic:{n}")
            n += 1
        out = pack_documents(docs, mods, keys, seq)
        yield {k: out[k][:rows] for k in ("input_ids", "labels", "position_ids", "doc_ids", "modality_ids", "keys")}


def trainer_speed(model: GPTConfig, rows: int, steps: int, precision: str) -> dict:
    """Train through the real Trainer (DeepSpeed ZeRO-3, world size 1) and read what it logged."""
    cfg = load_config(None, [f"model.{k}={v}" for k, v in vars(model).items() if k != "vocab_size"] + [
        f"train.steps={steps}", f"train.log_every={max(1, steps // 2)}", f"train.micro_batch_size={rows}",
        "train.zero_stage=3", f'train.precision="{precision}"', "train.warmup_steps=1", "data.eval_shards=[]",
        f"data.seq_len={model.max_seq_len}", 'modalities = {text = {vocab_size = 260}}'])
    cfg.model.vocab_size = model.vocab_size
    tracker = MemoryTracker()
    trainer = Trainer(cfg, tiny_vocab(), synthetic_batches(model.vocab_size, rows, model.max_seq_len),
                      tracker=tracker, log=lambda line: print(line, flush=True))
    trainer.train()
    m = tracker.last()  # the second interval: the first holds the warm-up steps
    return {"params_m": round(trainer.n_params / 1e6, 1), "tokens_per_s": round(m["train/tokens_per_s"]),
            "mfu": round(m["train/mfu"], 3) if "train/mfu" in m else None, "loss": round(m["train/loss"], 4),
            "max_mem_gb": round(m["train/memory_gb"], 2), "precision": precision, "zero_stage": 3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu.json")
    ap.add_argument("--cpu-smoke", action="store_true", help="run the Trainer path tiny on the CPU (no CUDA checks)")
    args = ap.parse_args()
    single_process_group()
    demo = GPTConfig(vocab_size=608, n_layers=4, n_heads=4, d_model=128, max_seq_len=256)
    if args.cpu_smoke:
        print(json.dumps(trainer_speed(GPTConfig(vocab_size=608, n_layers=2, n_heads=2, d_model=64, max_seq_len=64),
                                       rows=4, steps=6, precision="fp32"), indent=1))
        return
    import deepspeed

    assert torch.cuda.is_available(), "no CUDA device"
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "deepspeed": deepspeed.__version__}

    # 1. CPU vs CUDA, fp32
    cfg = demo
    torch.manual_seed(0)
    cpu = GPT(cfg).eval()
    gpu = GPT(cfg).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    b = batch(cfg.vocab_size, 8, 256)
    with torch.no_grad():
        _, l_cpu, _ = cpu(b["input_ids"], b["position_ids"], b["doc_ids"], b["labels"])
        torch.backends.cuda.matmul.allow_tf32 = False
        bg = {k: v.cuda() for k, v in b.items()}
        _, l_gpu, _ = gpu(bg["input_ids"], bg["position_ids"], bg["doc_ids"], bg["labels"])
    res["fp32_loss_cpu"], res["fp32_loss_cuda"] = float(l_cpu), float(l_gpu)
    res["fp32_loss_match"] = abs(float(l_cpu) - float(l_gpu)) < 1e-4

    # 3. generation on CUDA equals generation on the CPU
    prompts = [[1, 3, 20, 21, 22], [1, 5, 40]]
    res["generate_match"] = generate(cpu, prompts, 8) == generate(gpu, prompts, 8)

    # 2. bf16 training speed through the Trainer
    res["demo_model_bf16"] = trainer_speed(cfg, rows=64, steps=20, precision="bf16")
    big = GPTConfig(vocab_size=32768, n_layers=24, n_heads=16, d_model=1024, max_seq_len=2048)
    res["gpt350m_bf16"] = trainer_speed(big, rows=8, steps=20, precision="bf16")
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
