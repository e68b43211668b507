#!/usr/bin/env bash
# Run examples/ddp_train.py under torchrun (2 ranks, gloo, CPU) RUNS times in a row and stop
# at the first run that exits non-zero; optionally with LOAD busy processes beside it.
#
#   bash examples/stress_ddp.sh               # 50 runs, no extra load
#   bash examples/stress_ddp.sh 50 2          # 50 runs with 2 busy-looping processes beside them
#   SCRIPT=/tmp/copy.py bash examples/stress_ddp.sh 20   # another script with the same arguments
#
# The reliability check of the example: before the example tore down its process group in the
# right order, about 3 runs in 20 ended in "terminate called without an active exception"
# (rank 0 SIGABRT) after training had finished. Each line shows the run, its exit code,
# its wall time and the 1-minute load average; the failing run's output is printed.
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-50}
LOAD=${2:-0}
PY=${PYTHON:-.venv/bin/python}
SCRIPT=${SCRIPT:-examples/ddp_train.py}

pids=()
stop_load() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; }
trap stop_load EXIT
for _ in $(seq 1 "$LOAD"); do
  "$PY" -c "while True: pass" &
  pids+=($!)
done

log=$(mktemp)
failures=0
for i in $(seq 1 "$RUNS"); do
  port=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  start=$SECONDS
  OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --nnodes=1 --nproc_per_node=2 --master_addr=127.0.0.1 \
    --master_port="$port" "$SCRIPT" --steps 3 --batch-size 8 >"$log" 2>&1
  rc=$?
  printf 'run %3d/%d: exit %d in %3d s, load %s\n' "$i" "$RUNS" "$rc" $((SECONDS - start)) "$(cut -d' ' -f1 /proc/loadavg)"
  if [ "$rc" -ne 0 ]; then
    failures=$((failures + 1))
    tail -n 40 "$log"
    if [ "${KEEP_GOING:-0}" != 1 ]; then break; fi
  fi
done
rm -f "$log"
echo "$failures failed of $i runs"
[ "$failures" -eq 0 ]
