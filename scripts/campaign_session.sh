#!/usr/bin/env bash
# Issue 14's campaign, one session at a time: what every session does first and last, in one
# place (docs/TRAINING.md, "The campaign").
#
#   scripts/campaign_session.sh start    # first thing (runs `make setup` when .venv is missing)
#   scripts/campaign_session.sh status   # steps, validation, audits' progress, jobs running
#   scripts/campaign_session.sh stop     # ~15 minutes before the session ends; then commit
#
# start: a worktree pinned at HEAD ($PINNED, default ../pinned), so that the session's own commits
#   never change code under a running job, sharing this checkout's .venv. In it, for each of the
#   two runs: if it has not finished, `deqguard train --resume` on one thread, followed (once the
#   run has finished) by `scripts/campaign_finish.sh` with one worker; if it has finished, one
#   worker of `scripts/campaign_finish.sh` straight away. So each core always has one job: a
#   training run, or the audit queue of the runs that have finished.
#   With FOCUS=train (exactly one run still training): that run gets both cores (`--threads 2`),
#   chained into `campaign_finish.sh` with two workers (its history and export on two threads),
#   and the finished run's audits wait for it: the training ends in about 60% of the time
#   (docs/TRAINING.md: about 1,200 steps per hour on two threads against 600-700 on one beside
#   an audit), so its export and audits start within the session.
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
SINCE=.campaign-session.json # in $PINNED: when this session started, each run's step then

finished() { # run directory -> exit 0 when its state.json says finished
    "$PY" -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get('finished') else 1)" \
        "$1/state.json" 2>/dev/null
}

progress() { # run directory [session-start file] -> one line: step, rate, ETA, validation
    "$PY" - "$1" "${2:-}" <<'EOF'
import json, sys
from pathlib import Path
d, since = Path(sys.argv[1]), sys.argv[2]
s = json.loads((d / "state.json").read_text())
rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
vals = [r for r in rows if "val_pgd" in r]
last = vals[-1] if vals else {}
best = max(vals, key=lambda v: (v["val_pgd"], v["val_clean"])) if vals else {}
fmt = lambda v: f"{v['val_clean']:.1%} / {v['val_pgd']:.1%} at {v['step']:,}" if v else "-"
first = json.loads(Path(since).read_text()).get(d.name, s["step"]) if since else None
# the rate over the last 30 logged steps of this session (elapsed_s is training time, but a
# SIGSTOP pause counts in it: a recent window keeps an earlier pause out)
steps = [r for r in rows if "elapsed_s" in r and (first is None or r["step"] > first)][-30:]
rate = ""
if len(steps) >= 2 and steps[-1]["elapsed_s"] > steps[0]["elapsed_s"]:
    per_h = 3600 * (steps[-1]["step"] - steps[0]["step"]) / (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"])
    left = s.get("total_steps", s["step"]) - s["step"]
    rate = f", {per_h:.0f} steps/h" + (f" (about {left / per_h:.1f} h to go)" if left > 0 and per_h > 0 else "")
session = f" (this session from {first:,})" if first is not None else ""
print(f"{d.name}: step {s['step']:,}{session}, finished {s.get('finished', False)}{rate}; "
      f"last val {fmt(last)}; best by PGD-10 {fmt(best)}")
EOF
}

draft_row() { # session-start file -> a draft of the session's row in docs/TRAINING.md's table
    "$PY" - "$1" "$REPO/training/state" "${RUNS[@]}" <<'EOF'
import json, platform, sys, time
from pathlib import Path
since = json.loads(Path(sys.argv[1]).read_text())
root, runs = Path(sys.argv[2]), sys.argv[3:]
cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
            if l.startswith("model name")), platform.processor() or "?")
cells = []
for run in runs:
    s = json.loads((root / run / "state.json").read_text())
    cells.append(f"{since.get(run, s['step']):,} -> {s['step']:,}")
for run in runs:
    vals = [json.loads(l) for l in (root / run / "metrics.jsonl").read_text().splitlines() if '"val_pgd"' in l]
    v = vals[-1] if vals else None
    cells.append(f"{v['val_clean']:.1%} / {v['val_pgd']:.1%} ({v['step']:,})" if v else "-")
print(f"| {since['utc']}-{time.strftime('%H:%M', time.gmtime())} ({cpu}) | " + " | ".join(cells) + " | (rates; what shared the cores) |")
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
    "$PY" - "$PINNED/$SINCE" "${RUNS[@]/#/$PINNED/training/state/}" <<'EOF' # the session's first steps
import json, sys, time
from pathlib import Path
steps = {Path(d).name: json.loads((Path(d) / "state.json").read_text())["step"] for d in sys.argv[2:]}
Path(sys.argv[1]).write_text(json.dumps({"utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), **steps}))
EOF
    cd "$PINNED"
    local n
    if [ "${FOCUS:-}" = train ]; then
        local left=()
        for n in "${RUNS[@]}"; do finished "training/state/$n" || left+=("$n"); done
        if [ ${#left[@]} -ne 1 ]; then
            echo "FOCUS=train needs exactly one unfinished run (${#left[@]} are)" >&2
            cd "$REPO" && git worktree remove --force "$PINNED"
            exit 1
        fi
        n=${left[0]}
        echo "$n: training on both cores (then every finished run's audits, two workers), log /tmp/$n.log"
        # shellcheck disable=SC2016  # expanded by the inner shell
        PYTHONPATH=$PINNED nohup bash -c '
            "$0" -m deqguard.cli train --config "training/configs/$1.toml" --resume --threads 2 \
                > "/tmp/$1.log" 2>&1 || exit
            THREADS=2 WORKERS=2 scripts/campaign_finish.sh > "/tmp/$1-finish.log" 2>&1' \
            "$PY" "$n" > /dev/null 2>&1 &
        return 0
    fi
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
    if [ -f "$PINNED/$SINCE" ]; then
        echo "draft row for docs/TRAINING.md's progress table:"
        draft_row "$PINNED/$SINCE"
    fi
    git worktree remove --force "$PINNED"
    echo "now: complete that row in docs/TRAINING.md, then"
    echo "git add training/state docs/audits model_store docs/training-curves.png docs/TRAINING.md && git commit"
}

status() {
    local root=$REPO n pid since=
    [ -d "$PINNED" ] && root=$PINNED
    [ -f "$PINNED/$SINCE" ] && since=$PINNED/$SINCE
    for n in "${RUNS[@]}"; do progress "$root/training/state/$n" "$since"; done
    # the audits still running or waiting mid-way: batches, compute, time to go, tallies so far
    PYTHONPATH=$REPO "$PY" -m deqguard.cli audit-status --quiet --unfinished \
        "$root"/docs/audits/*/ || true
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
