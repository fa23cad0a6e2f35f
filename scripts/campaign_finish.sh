#!/usr/bin/env bash
# Issue 14, the end of the campaign: for every campaign run that has finished (state.json says
# "finished": true), export its validation-selected weights (training.selection: the trainer's
# selection unless its PGD-10 is masked there) as version 2 of its shipped name,
# then run its audits (items 5 and 6) from one queue shared by WORKERS one-thread workers. A
# model's audits start as soon as its own run has finished, so while the other run still
# trains, one worker audits beside it (WORKERS=1) and the two cores stay busy.
#
# Every step is resumable and idempotent: an exported model is not exported again, and each
# audit resumes from its directory's state.json (a finished one only rewrites its report). So
# every session runs the same command first thing, in the background, and commits
# docs/audits/ and model_store/ before it ends:
#
#     WORKERS=1 nohup scripts/campaign_finish.sh > /tmp/campaign_finish.log 2>&1 &  # one run still trains
#     nohup scripts/campaign_finish.sh > /tmp/campaign_finish.log 2>&1 &            # both finished
#
# Budgets (item 6; what each directory holds), by stage; the queue runs stage by stage (the
# models interleaved) in the order 1, 2, 5, 6, 4, 3, so that the worst case of each row of the
# ablation table (undefended: stage 1; the paper defense: stages 2, 5 and 6) is known before
# the two grid + AutoAttack audits fill the table's remaining columns; stage 3, the longest
# (about 11 core-hours per model at 1,000 images, most of it Square's 5,000 queries), runs last:
#   1 <m>@2-off-quick9-solver-1000   undefended served prediction: PGD-10, APGD-CE, APGD-T 9
#                                  targets (item 5's target check)
#   2 <m>@2-paper-quick-solver-1000  the paper defense: the same as transfer + BPDA APGD-T
#   3 <m>@2-off-paper-solver-1000    undefended: the 144-attack Eq. 11 grid + standard AutoAttack
#                                  (APGD-CE, APGD-T 9, FAB-T, Square 5,000)
#   4 <m>@2-paper-paper-$N_PAPER       the paper defense: the 144-attack grid + standard AutoAttack
#   5 <m>@2-paper-adaptive-solver-$N_ADAPTIVE  through the defense: BPDA and exact APGD-CE (3 restarts),
#                                  APGD-T (3 targets), PGD-50 x 5 restarts; APGD transfer
#   6 <m>@2-paper-square-$N_SQUARE     Square end to end, 1,000 queries
# All but Square run as a cascade (--cascade: each attack only on the images every earlier
# attack of its family left correct, as AutoAttack runs its four; fewer images per attack,
# docs/TRAINING.md), so APGD-CE "then" APGD-T is item 5's protocol as written.
# then `deqguard audit-table` (docs/TRAINING.md) combines them per sample. The defended grid,
# adaptive and Square audits run on the first 200 images by default: at the per-image costs of
# the committed audits (docs/TRAINING.md) they are 5-25 core-hours per model on 1,000.
#
# A worker claims an audit with flock on $LOCKS/<audit>.lock (so two workers, or a second copy
# of this script, never run the same one) and logs to /tmp/campaign_finish-<audit>.log.
#
# Environment: PY (default .venv/bin/python), WORKERS (2), STAGES (the queue order, 1 2 5 6 4 3), N (images of the first three, 1000),
# N_PAPER, N_ADAPTIVE, N_SQUARE (200 each), ONLY (one model name: only its audits),
# LOCKS (/tmp/deqguard-campaign-locks), DEVICE (cpu), BATCH (128: a cascade's later attacks
# run on a batch's survivors, which larger batches keep efficient; audits resume mid-batch, so
# a larger batch risks no more at a session's end) and SUFFIX (appended to every audit
# directory; an audit resumes only under the batch size it started with, so a GPU run with
# large batches writes its own directories: DEVICE=cuda BATCH=256 SUFFIX=-cuda WORKERS=8), EXPORT
# (1; 0: never export, audit only the models already at version 2: a machine without the git
# history or the training split, which the export's selection reads), THREADS (1: the threads of
# the robustness history and the export, which run before any audit; 2 when this script has
# both cores: campaign_session.sh's FOCUS=train).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORKERS=${WORKERS:-2}
N=${N:-1000}
N_PAPER=${N_PAPER:-200}
N_ADAPTIVE=${N_ADAPTIVE:-200}
N_SQUARE=${N_SQUARE:-200}
LOCKS=${LOCKS:-/tmp/deqguard-campaign-locks}
DEVICE=${DEVICE:-cpu}
BATCH=${BATCH:-128}
SUFFIX=${SUFFIX:-}
EXPORT=${EXPORT:-1}
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=1 PYTHONPATH=${PYTHONPATH:-$PWD}
ALL=(micro-trades micro-trades-ri)
[ -n "${ONLY:-}" ] && ALL=("$ONLY")
mkdir -p "$LOCKS"

json_field() { # file, python expression over `d`
    "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); print($2)" "$1"
}

MODELS=()
for m in "${ALL[@]}"; do
    state=training/state/campaign-$m/state.json
    if [ -f "$state" ] && [ "$(json_field "$state" 'bool(d.get("finished"))')" = True ]; then
        MODELS+=("$m")
    else
        echo "campaign-$m has not finished ($state): its audits wait" >&2
    fi
done
if [ ${#MODELS[@]} -eq 0 ]; then
    echo "no campaign run has finished: train first (docs/TRAINING.md)" >&2
    exit 2
fi

exec {export_fd}> "$LOCKS/export.lock"
flock "$export_fd" # two copies of this script (one per finished run) must not export at once
EXPORTED=()
for m in "${MODELS[@]}"; do
    if [ "$(json_field "model_store/$m/manifest.json" 'd["version"]')" != 2 ]; then
        if [ "$EXPORT" = 0 ]; then # e.g. on a GPU machine: no git history, no training split
            echo "$m@2 is not exported yet (EXPORT=0): its audits wait" >&2
            continue
        fi
        run=training/state/campaign-$m
        # the weights: the trainer's selection unless its PGD-10 is masked on them (PGD-10 on
        # the solver's gradient, every committed snapshot, validation images: training.selection);
        # the snapshots the committed history already measured are taken from it
        echo "== $(date -u +%FT%TZ) robustness history and selection of $m"
        "$PY" -m training.robust_history "$run" --n 256 --threads "$THREADS" --json "$run/robust_history.json" \
            --reuse docs/robust_history.json
        "$PY" -m training.selection "$run" --history "$run/robust_history.json" --write
        echo "== $(date -u +%FT%TZ) export $m@2"
        "$PY" -m training.evaluate --run "$run" --store model_store \
            --name "$m" --version 2 --weights selection --n-test "$N" --threads "$THREADS" --batch-size 100
    fi
    EXPORTED+=("$m")
done
if [ ${#EXPORTED[@]} -eq 0 ]; then
    echo "no exported model to audit" >&2
    exit 0
fi
MODELS=("${EXPORTED[@]}")
"$PY" -m training.curves training/state/campaign-micro-trades training/state/campaign-micro-trades-ri \
    --out docs/training-curves.png
exec {export_fd}>&-

# one line per audit: its directory name, then deqguard audit's arguments after the model.
# Every gradient attack on the served prediction, undefended or through the defense (stages 1,
# 2, 3 and 5: "-solver" in the name; stage 4's grid and AutoAttack take the Eq. 11 surrogates
# the paper defines), is backpropagated through every solver step: the unrolled default
# overstated the TRADES run's robustness by a wide margin (docs/DEFENSE.md).
UG="--undefended-grad solver"          # the defense off: nothing else to differentiate
SG="$UG --defended-grad solver"
stage() { # stage number, model -> the line of that stage
    local m=$2 d=$2@2
    case $1 in
    1) echo "$d-off-quick9-solver-$N --defense off --suite quick --apgd-targets 9 -n $N $UG --cascade" ;;
    2) echo "$d-paper-quick-solver-$N --defense paper --suite quick -n $N $SG --cascade" ;;
    3) echo "$d-off-paper-solver-$N --defense off --suite paper -n $N $UG --cascade" ;;
    4) echo "$d-paper-paper-$N_PAPER --defense paper --suite paper -n $N_PAPER --cascade" ;;
    5) echo "$d-paper-adaptive-solver-$N_ADAPTIVE --defense paper --suite adaptive -n $N_ADAPTIVE $SG" \
        "--attacks apgd-ce,apgd-t,bpda-apgd-ce,bpda-apgd-t,exact-apgd-ce,exact-apgd-t,bpda-pgd,exact-pgd" \
        "--cascade" ;;
    6) echo "$d-paper-square-$N_SQUARE --defense paper --suite adaptive -n $N_SQUARE" \
        "--attacks square-defended --square-queries 1000" ;;
    esac
}
STAGES=${STAGES:-1 2 5 6 4 3} # queue order (above)
JOBS=()
for s in $STAGES; do
    for m in "${MODELS[@]}"; do
        read -r name args <<< "$(stage "$s" "$m")"
        JOBS+=("$m $name$SUFFIX $args")
    done
done

form_args() { # audit directory -> "--model-form training" when it began before that option
    # (its fingerprint lacks model_form: it judged the module as trained, and resumes only so);
    # every other audit attacks the service's own eval-only copy (the default, served)
    local state=$1/state.json
    if [ -f "$state" ] &&
        [ "$(json_field "$state" '"model_form" in d["fingerprint"]["config"]')" = False ]; then
        echo "--model-form training"
    fi
    return 0
}

worker() { # worker number: runs every job it can claim, in queue order
    local job m name lock status=0
    for job in "${JOBS[@]}"; do
        read -r m name args <<< "$job"
        lock=$LOCKS/$name.lock
        [ -e "$LOCKS/$name.done" ] && continue
        exec {fd}> "$lock"
        if ! flock -n "$fd" || [ -e "$LOCKS/$name.done" ]; then # taken, or just finished
            exec {fd}>&-
            continue
        fi
        echo "== $(date -u +%FT%TZ) worker $1: $name"
        # shellcheck disable=SC2086  # args is a word list by construction
        if "$PY" -m deqguard.cli audit "$m@2" $args $(form_args "docs/audits/$name") \
            --batch-size "$BATCH" --device "$DEVICE" --out "docs/audits/$name" \
            > "/tmp/campaign_finish-$name.log" 2>&1; then
            touch "$LOCKS/$name.done"
        else
            status=$?
            echo "== $(date -u +%FT%TZ) worker $1: $name failed (exit $status)" >&2
        fi
        exec {fd}>&-
    done
    return $status
}

pids=()
for w in $(seq 1 "$WORKERS"); do
    worker "$w" &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
echo "== $(date -u +%FT%TZ) done (exit $status)"
exit $status
