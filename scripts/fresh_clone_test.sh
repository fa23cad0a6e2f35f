#!/bin/sh
# Fresh-clone `make test` runs (issue 11): clone main next to ../shared (so the data resolves),
# run `make test`, print one result line per run. "loaded" keeps both cores busy with two
# busy loops for the whole run. Pause your own background jobs (SIGSTOP) for "idle" runs.
#
#   scripts/fresh_clone_test.sh idle 1 2 3
#   scripts/fresh_clone_test.sh loaded 4 5 6
set -u
mode=$1
shift
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
parent=$(dirname "$repo")
for i in "$@"; do
  d="$parent/fc$i"
  rm -rf "$d"
  git clone -q "$repo" "$d"
  commit=$(git -C "$d" rev-parse --short HEAD)
  if [ "$mode" = loaded ]; then
    sh -c 'while :; do :; done' & l1=$!
    sh -c 'while :; do :; done' & l2=$!
  fi
  start=$(date +%s)
  (cd "$d" && make test > "$d.log" 2>&1)
  rc=$?
  end=$(date +%s)
  if [ "$mode" = loaded ]; then kill "$l1" "$l2"; fi
  echo "run $i $mode $commit rc=$rc wall=$((end - start))s load=$(cut -d' ' -f1-3 /proc/loadavg) :: $(tail -n1 "$d.log")"
  rm -rf "$d"
done
