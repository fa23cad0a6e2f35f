#!/usr/bin/env bash
# Issue 14's campaign, one session at a time: what every session does first and last, in one
# place (docs/TRAINING.md, "The campaign").
#
#   scripts/campaign_session.sh start    # first thing (runs `make setup` when .venv is missing)
#   scripts/campaign_session.sh status   # steps, validation, audits running
#   scripts/campaign_session.sh stop     # ~15 minutes before the session ends; then commit
#
# start: a worktree pinned at HEAD ($PINNED, default ../pinned), so that the session's own commits
#   never change code under a running job, sharing this checkout's .venv. In it, for each of the
#   two runs: if it has not finished, `deqguard train --resume` on one thread, followed (once the
#   run has finished) by `scripts/campaign_finish.sh` with one worker; if it has finished, one
#   worker of `scripts/campaign_finish.sh` straight away. So each core always has one job: a
#   training run, or the audit queue of the runs that have finished.
# stop: SIGTERM to the training runs (each finishes its step and writes its state) and the audits
#   (about a minute and the attack in progress are lost: `deqguard audit` saves mid-batch), then
#   copies training/state, docs/audits, model_store and docs/training-curves.png back here,
#   redraws the curves, prints the progress and removes the worktree. Nothing is committed:
#   the session adds its row to docs/TRAINING.md and commits.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PINNED=${PINNED:-$(dirname "$REPO")/pinned}
PY=${PY:-$REPO/.venv/bin/python}
RUNS=(campaign-micro-trades campaign-micro-trades-ri)

finished() { # run directory -> exit 0 when its state.json says finished
    "$PY" -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get('finished') else 1)" \
        "$1/state.json" 2>/dev/null
}

progress() { # run directory -> one line: step, finished, last and best validation
    "$PY" - "$1" <<'EOF'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
s = json.loads((d / "state.json").read_text())
vals = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if '"val_pgd"' in l]
last = vals[-1] if vals else {}
best = max(vals, key=lambda v: (v["val_pgd"], v["val_clean"])) if vals else {}
fmt = lambda v: f"{v['val_clean']:.1%} / {v['val_pgd']:.1%} at {v['step']:,}" if v else "-"
print(f"{d.name}: step {s['step']:,}, finished {s.get('finished', False)}; "
      f"last val {fmt(last)}; best by PGD-10 {fmt(best)}")
EOF
}

start() {
    [ -x "$PY" ] || make setup # a fresh machine: the .venv first
    git worktree prune
    if [ -d "$PINNED" ]; then
        echo "$PINNED exists: a session's jobs may still run there (stop first)" >&2
        exit 1
    fi
    git worktree add --detach "$PINNED" HEAD
    ln -s "$REPO/.venv" "$PINNED/.venv"
    cd "$PINNED"
    local n
    for n in "${RUNS[@]}"; do
        if finished "training/state/$n"; then
            echo "$n has finished: one audit worker"
            WORKERS=1 nohup scripts/campaign_finish.sh > "/tmp/$n-finish.log" 2>&1 &
        else
            echo "$n: training (then its audits), log /tmp/$n.log"
            # shellcheck disable=SC2016  # expanded by the inner shell
            OMP_NUM_THREADS=1 PYTHONPATH=$PINNED nohup bash -c '
                "$0" -m deqguard.cli train --config "training/configs/$1.toml" --resume \
                    > "/tmp/$1.log" 2>&1 || exit
                WORKERS=1 scripts/campaign_finish.sh > "/tmp/$1-finish.log" 2>&1' \
                "$PY" "$n" > /dev/null 2>&1 &
        fi
    done
}

in_pinned() { # pgrep pattern -> the matching processes that run in $PINNED (and no others)
    local pid here
    here=$(readlink -f "$PINNED")
    for pid in $(pgrep -f "$1" || true); do
        [ "$(readlink -f "/proc/$pid/cwd" 2>/dev/null)" = "$here" ] && echo "$pid"
    done
    return 0
}

JOBS="deqguard.cli (train|audit)"
CHAINS="campaign_finish.sh|bash -c .*deqguard.cli train"

stop() {
    if [ ! -d "$PINNED" ]; then
        echo "no pinned worktree at $PINNED: nothing to stop" >&2
        exit 1
    fi
    # the chains first (so that a run stopped now does not go on to its audits), then the jobs;
    # only processes whose working directory is the pinned worktree
    local pids waited=0
    pids=$(in_pinned "$CHAINS")
    [ -n "$pids" ] && kill -TERM $pids 2> /dev/null || true
    pids=$(in_pinned "$JOBS")
    [ -n "$pids" ] && kill -TERM $pids 2> /dev/null || true
    while [ -n "$(in_pinned "$JOBS")" ] && [ $waited -lt 300 ]; do
        sleep 5
        waited=$((waited + 5))
    done
    if [ -n "$(in_pinned "$JOBS")" ]; then
        echo "jobs still running in $PINNED after ${waited} s; nothing copied" >&2
        exit 1
    fi
    cp -r "$PINNED/training/state/." training/state/
    local d
    for d in "$PINNED"/docs/audits/*/; do # the audits' directories only: docs/audits/README.md
        [ -d "$d" ] && cp -r "$d" docs/audits/ # may have changed here during the session
    done
    cp -r "$PINNED/model_store/." model_store/
    "$PY" -m training.curves "${RUNS[@]/#/training/state/}" --out docs/training-curves.png
    status
    git worktree remove --force "$PINNED"
    echo "now: add the session's row to docs/TRAINING.md, then"
    echo "git add training/state docs/audits model_store docs/training-curves.png docs/TRAINING.md && git commit"
}

status() {
    local root=$REPO n pid
    [ -d "$PINNED" ] && root=$PINNED
    for n in "${RUNS[@]}"; do progress "$root/training/state/$n"; done
    [ -d "$PINNED" ] || return 0
    for pid in $(in_pinned "$JOBS"); do
        tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q '^bash -c' && continue # a chain's shell
        echo "running: $(tr '\0' ' ' < "/proc/$pid/cmdline" | cut -c1-150)"
    done
}

case ${1:-} in
start | stop | status) "$1" ;;
*)
    echo "usage: $0 start|status|stop" >&2
    exit 2
    ;;
esac
