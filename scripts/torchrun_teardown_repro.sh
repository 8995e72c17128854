#!/bin/bash
# Repeat the 2-process torchrun run of tests/test_distributed_cli.py, two jobs at a time, and count the
# runs whose output shows an abort at teardown ("terminate called" / elastic "FAILED").
# usage: scripts/torchrun_teardown_repro.sh ITERATIONS   (each iteration = 2 concurrent runs)
fails=0
tmp=$(mktemp -d)
for i in $(seq 1 "${1:-10}"); do
  for j in 1 2; do
    OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore timeout 120 python -m torch.distributed.run --standalone \
      --nproc_per_node 2 --max-restarts 0 --monitor-interval 0.2 -m bnlab train --model mlp --data digits \
      --epochs 3 --batch-size 16 --max-steps-per-epoch 30 --lr 0.05 --device cpu --test-subset 200 \
      --out "$tmp/run_$j" --auto-resume > "$tmp/log_$j" 2>&1 &
  done
  wait
  for j in 1 2; do
    if grep -q "terminate called\|FAILED" "$tmp/log_$j"; then fails=$((fails + 1)); cp "$tmp/log_$j" "$tmp/fail_$fails.log"; fi
    rm -rf "$tmp/run_$j"
  done
done
echo "aborted runs: $fails of $((2 * ${1:-10})) (failure logs in $tmp)"
