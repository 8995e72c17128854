"""Data-parallel scaling of ``bnlab train``: images/s with 1 process and with ``torchrun`` N processes.

    python bench/bench_scaling.py --data cifar10 --data-dir /work/shared/data/cifar10.npz \
        --model resnet20 --global-batch 128 --procs 1,2 --steps 10 --epochs 3 [--json out.json]

Each configuration is one real ``bnlab train`` run (``python -m bnlab train`` for 1 process,
``python -m torch.distributed.run --standalone --nproc_per_node N -m bnlab train`` for N). The global
batch is fixed (strong scaling: each of N processes gets ``global_batch / N``); ``sync_stats`` is on,
so all runs normalise with the statistics of the same global batch. Throughput = global images per
epoch / ``epoch_time`` (training loop only, evaluation excluded), median over the epochs after the
first (warm-up). 1-process runs are measured with ``--threads`` intra-op threads (default: 1 and
N_max, to separate the gain from more cores from the gain from more processes); N-process runs use
1 thread per process (torchrun's default). Prints a Markdown table (speed-up against the 1-process,
1-thread run measured in the same invocation) and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(procs: int, threads: int, args: argparse.Namespace, out: Path, sync_stats: bool = True) -> dict:
    batch = args.global_batch // procs
    train = ["-m", "bnlab", "train", "--model", args.model, "--data", args.data, "--epochs", str(args.epochs),
             "--batch-size", str(batch), "--max-steps-per-epoch", str(args.steps), "--train-subset",
             str(args.train_subset), "--test-subset", str(args.test_subset), "--device", "cpu", "--seed", "0",
             "--out", str(out), "--quiet", "--sync-stats", str(sync_stats).lower(), "--eval-every", str(args.epochs)]
    if args.data_dir:
        train += ["--data-dir", args.data_dir]
    if procs == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["epoch_time"] for r in rows[1:]] or [rows[0]["epoch_time"]]
    images = args.steps * batch * procs
    return {"procs": procs, "threads_per_proc": threads, "sync_stats": sync_stats, "batch_per_proc": batch,
            "global_batch": batch * procs, "epoch_time_s": statistics.median(times),
            "images_per_s": images / statistics.median(times), "process_wall_s": wall,
            "final_train_loss": rows[-1]["train_loss"], "command": " ".join(["python", *cmd[1:]])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data", default="cifar10")
    p.add_argument("--data-dir", default="/work/shared/data/cifar10.npz")
    p.add_argument("--train-subset", type=int, default=4096)
    p.add_argument("--test-subset", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--procs", default="1,2", help="comma-separated process counts")
    p.add_argument("--threads", default=None,
                   help="comma-separated intra-op thread counts for the 1-process runs (default: 1,max procs)")
    p.add_argument("--steps", type=int, default=10, help="steps per epoch")
    p.add_argument("--epochs", type=int, default=3, help="epochs (the first is warm-up)")
    p.add_argument("--unsync", action="store_true",
                   help="also run every multi-process configuration with sync_stats=false")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args()
    procs = [int(x) for x in args.procs.split(",")]
    threads = [int(x) for x in args.threads.split(",")] if args.threads else sorted({1, max(procs)})
    for n in procs:
        if args.global_batch % n:
            raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {n} processes")
    plan = [(1, t, True) for t in threads] + [(n, 1, True) for n in procs if n > 1]
    if args.unsync:
        plan += [(n, 1, False) for n in procs if n > 1]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (n, t, synced) in enumerate(plan):
            res = _run(n, t, args, Path(tmp) / f"run{i}", synced)
            results.append(res)
            print(f"procs={n} threads={t} sync_stats={synced}: {res['images_per_s']:.1f} images/s",
                  file=sys.stderr, flush=True)
    base = results[0]["images_per_s"]
    print("| processes | threads/process | sync_stats | batch/process | epoch time (s) | images/s | speed-up |\n"
          "|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['procs']} | {r['threads_per_proc']} | {r['sync_stats']} | {r['batch_per_proc']} | "
              f"{r['epoch_time_s']:.2f} | {r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f}x |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
