#!/usr/bin/env bash
# The README's test command, run RUNS times in a row (default 3) while another
# process keeps one core busy: the check that no test's verdict depends on the
# machine being quiet (issue 16). Prints one line per run and exits non-zero if
# any run failed. Extra arguments go to pytest.
#
#     scripts/busy_suite.sh            # 3 runs
#     RUNS=1 scripts/busy_suite.sh -x
set -u
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
python -c 'while 1: pass' &
busy=$!
trap 'kill "$busy" 2>/dev/null' EXIT
failed=0
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  python -m pytest -q -p no:cacheprovider "$@" > "busy_run_$i.log" 2>&1
  rc=$?
  echo "run $i of $runs: rc $rc in $(( $(date +%s) - start )) s: $(tail -n 1 "busy_run_$i.log")"
  [ "$rc" -eq 0 ] || failed=1
done
exit "$failed"
