#!/usr/bin/env bash
# Run the distributed tests N times in a row (default 20) and count the passes: the check
# that they are not flaky (each run starts fresh processes and a fresh rendezvous file).
#   bash benchmarks/ddp_repeat.sh [N]
set -u
n=${1:-20}
pass=0
for i in $(seq 1 "$n"); do
  if .venv/bin/python -m pytest -q -p no:cacheprovider tests/distributed >/tmp/ddp_repeat_$i.log 2>&1; then
    pass=$((pass + 1))
  else
    echo "run $i failed: $(tail -3 /tmp/ddp_repeat_$i.log | tr '\n' ' ')"
  fi
done
echo "$pass of $n runs passed"
