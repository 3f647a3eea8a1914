#!/usr/bin/env bash
# What outlives a sweep driver killed with SIGKILL: starts `freetf sweep --smoke` in an
# empty temporary folder, kills its driver with -9 once trials run, then counts every
# 5 s the Ray processes that were not there before (docs/reliability.md, Interruption).
#
#   tools/kill_driver_check.sh            # uses `freetf` from PATH
set -uo pipefail
FREETF="${FREETF:-freetf}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
pattern="ray::|raylet|gcs_server|dashboard|runtime_env|log_monitor|monitor.py|default_worker"
before=$(pgrep -f "$pattern" | sort)
setsid "$FREETF" sweep --smoke --set mlflow.sweep_name=kill_check > sweep.log 2>&1 &
driver=$!
for _ in $(seq 1 90); do grep -q "trials ended" sweep.log && break; sleep 2; done
sleep 5
echo "kill -9 of the sweep driver (pid $driver)"
kill -9 "$driver"
start=$(date +%s)
for _ in $(seq 1 60); do
    left=$(comm -13 <(echo "$before") <(pgrep -f "$pattern" | sort) | grep -c .)
    echo "$(( $(date +%s) - start )) s: $left of its Ray processes left"
    [ "$left" = 0 ] && exit 0
    comm -13 <(echo "$before") <(pgrep -f "$pattern" | sort) \
        | xargs -r ps -o comm= -p | sort | uniq -c | sed 's/^/    /'
    sleep 5
done
exit 1
