#!/bin/bash
# On a GPU machine: offline bench.py, then the same workload through `nanovllm serve` (benchmarks/bench_serve.py).
# Needs fastapi, uvicorn and httpx (`pip install -e ".[serve]"`); on a machine without network, put their
# wheels in .whl/serve and they are installed from there. Logs go to $LOG_DIR.
[ -d .whl/serve ] && python3 -m pip install --no-index --find-links .whl/serve fastapi uvicorn httpx prometheus_client -q 2>&1 | tail -2
LOG_DIR=${LOG_DIR:-/tmp/nanovllm-logs}; mkdir -p "$LOG_DIR"
export PYTHONPATH=.
nvidia-smi -L
python3 --version
timeout ${OFFLINE_LIMIT:-200} python3 bench.py --quiet $BENCH_ARGS $OFFLINE_ARGS 2>&1 | tee $LOG_DIR/offline.log
MODEL=$(python3 -c "from nanovllm.models.shapes import shape_checkpoint_dir; print(shape_checkpoint_dir('qwen3-0.6b'))")
python3 -m nanovllm serve $MODEL --load-format dummy --max-model-len 4096 --port 8000 --host 127.0.0.1 --uvicorn-log-level warning $SERVE_ARGS > $LOG_DIR/server.log 2>&1 &
SPID=$!
python3 - <<'PY'
import time, urllib.request
for _ in range(300):
    try:
        urllib.request.urlopen("http://127.0.0.1:8000/health"); print("server up"); break
    except Exception:
        time.sleep(1)
PY
for c in ${CONCURRENCY:-256}; do
  for r in $(seq ${REPEAT:-1}); do     # REPEAT=2: the same workload again on the warm server
    timeout ${SERVE_LIMIT:-200} python3 benchmarks/bench_serve.py --url http://127.0.0.1:8000 --concurrency $c $BENCH_ARGS --json $LOG_DIR/serve.jsonl 2>&1 | tee -a $LOG_DIR/serve.log
  done
done
kill $SPID; wait $SPID
tail -20 $LOG_DIR/server.log
