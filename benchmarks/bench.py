"""`make bench`: what omnistream's machinery costs, as ratios against baselines run in the same process.

(a) throughput: `omnistream train` (Ray Data stream -> Ray Train, 1 worker, DeepSpeed ZeRO-0)
    against a plain PyTorch loop over the same model and the same pre-tokenized packed rows,
    with the same micro-batch, optimizer and thread count. Ratio = omnistream / plain.
    omnistream's figure is the median tokens/s of the second half of its run: by then the
    stream's tokenizer has finished the epoch and the trainer reads pre-tokenized rows too, so
    the ratio is the cost of Ray Train + DeepSpeed + streaming, not of tokenizing on 2 cores.
(b) data wait: the share of step time the demo's trainers (2 workers, ZeRO-3) waited for the
    stream, over the whole run (warm-up included) and after the first logged interval.

Figures go to stdout as a table and to bench.json (name -> number), so commits can be compared.
No timing is asserted anywhere: these machines are shared and noisy.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from omnistream.cluster import tracking  # noqa: E402
from omnistream.cluster.cli.demo import demo_config, prepare_demo  # noqa: E402
from omnistream.cluster.config import load_config  # noqa: E402
from omnistream.cluster.engine import lr_lambda, param_groups  # noqa: E402
from omnistream.cluster.train import prepare, run_training  # noqa: E402
from omnistream.model.model import GPT  # noqa: E402
from omnistream.pipelines.packing import COLUMNS, pack_documents  # noqa: E402
from omnistream.pipelines.shards import list_shards  # noqa: E402
from omnistream.pipelines.stream import local_documents  # noqa: E402

STEPS = int(os.environ.get("BENCH_STEPS", "240"))
DEMO_STEPS = int(os.environ.get("BENCH_DEMO_STEPS", "100"))
THREADS = 2


def plain_loop(cfg, vocab, steps: int) -> float:
    """Tokens/s of a bare PyTorch loop: pre-tokenized rows, no Ray, no DeepSpeed."""
    t = cfg.train
    need_rows = (steps + 5) * t.micro_batch_size
    docs = []
    for _, _, toks, mods in local_documents(list_shards(cfg.data.train_shards), cfg.data.bundle_dir, cfg.modalities,
                                            cfg.data, cfg.seed):
        docs.append((toks, mods, ""))
        if len(docs) >= need_rows * 12:  # ~7 documents fill a 256-token row
            break
    rows = pack_documents([d[0] for d in docs], [d[1] for d in docs], [d[2] for d in docs], cfg.data.seq_len)
    assert len(rows["input_ids"]) >= need_rows, "not enough rows for the plain loop"
    torch.set_num_threads(THREADS)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model).train()
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
    tokens, t0 = 0, None
    for step in range(steps + 5):
        if step == 5:  # 5 warm-up steps are not timed (first-touch allocation, thread pools)
            t0, tokens = time.perf_counter(), 0
        sl = slice(step * t.micro_batch_size, (step + 1) * t.micro_batch_size)
        b = {c: torch.as_tensor(rows[c][sl], dtype=torch.long) for c in COLUMNS}
        _, loss, _ = model(b["input_ids"], b["position_ids"], b["doc_ids"], b["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        tokens += int((b["doc_ids"] > 0).sum())
    return tokens / (time.perf_counter() - t0)


def history(res, key):
    return [v for _, v in sorted(tracking.metric_history(res.tracking_uri, res.run_id, key))]


DEMO_CONFIG = demo_config()


def main() -> int:
    os.chdir(REPO)
    base = load_config(DEMO_CONFIG)
    prepare_demo(base)
    common = [f"train.torch_threads={THREADS}", "train.log_every=5", "data.eval_shards=[]",
              'tracking.experiment="omnistream-bench"']

    # (a) omnistream train, one worker, ZeRO-0, against the plain loop
    one = load_config(DEMO_CONFIG, common + [f"train.steps={STEPS}", "cluster.num_workers=1", "data.epochs=1",
                                             "cluster.cpus_per_worker=1", "train.zero_stage=0"])
    res_one = run_training(one)
    tps = history(res_one, "train/tokens_per_s")
    omni_tps = statistics.median(tps[len(tps) // 2:])
    cfg_plain, vocab = prepare(one)
    plain_tps = plain_loop(cfg_plain, vocab, STEPS // 2)

    # (b) the demo's data wait: 2 workers, ZeRO-3, as configs/demo.toml says
    demo = load_config(DEMO_CONFIG, common + [f"train.steps={DEMO_STEPS}"])
    res_demo = run_training(demo)
    waits = history(res_demo, "train/data_wait_frac")
    figures = {
        "train_tokens_per_s_omnistream_1worker_zero0": round(omni_tps, 1),
        "train_tokens_per_s_plain_pytorch": round(plain_tps, 1),
        "throughput_ratio_omnistream_vs_plain": round(omni_tps / plain_tps, 3),
        "demo_data_wait_frac_mean": round(statistics.mean(waits), 4),
        "demo_data_wait_frac_after_first_interval": round(statistics.mean(waits[1:]), 4) if len(waits) > 1 else None,
        "demo_tokens_per_s_2workers_zero3": round(statistics.median(history(res_demo, "train/tokens_per_s")[2:]), 1),
        "omnistream_tokens_per_s_first_half_while_tokenizing": round(statistics.median(tps[1:len(tps) // 2]), 1),
    }
    Path("bench.json").write_text(json.dumps(figures, indent=1))
    width = max(map(len, figures))
    print("\nomnistream bench (same process, same machine)")
    for k, v in figures.items():
        print(f"  {k:{width}s}  {v}")
    print("written to bench.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
