#!/usr/bin/env bash
# Issue 14, after both campaign runs have finished (state.json says "finished": true): export the
# validation-selected weights as version 2 of the two shipped names, draw the curves, then run
# the audits of items 5 and 6 for both models side by side (one one-thread chain per model).
#
# Every step is resumable and idempotent: an exported model is not exported again, and each
# audit resumes from its directory's state.json (a finished one only rewrites its report). So
# every session runs the same command first thing, in the background, and commits
# docs/audits/ before it ends:
#
#     nohup scripts/campaign_finish.sh > /tmp/campaign_finish.log 2>&1 &
#
# Budgets (item 6; what each directory holds), in the order they run, so that the ablation
# table's columns fill early:
#   <m>@2-off-quick9-1000        undefended served prediction: PGD-10, APGD-CE, APGD-T 9 targets
#                                (item 5's target check)
#   <m>@2-paper-quick-1000       the paper defense: the same as transfer + BPDA APGD-T
#   <m>@2-off-paper-1000         undefended: the 144-attack Eq. 11 grid + standard AutoAttack
#                                (APGD-CE, APGD-T 9, FAB-T, Square 5,000)
#   <m>@2-paper-paper-$N_PAPER       the paper defense: the 144-attack grid + standard AutoAttack
#   <m>@2-paper-adaptive-$N_ADAPTIVE    through the defense: BPDA and exact APGD-CE (3 restarts),
#                                APGD-T (3 targets), PGD-50 x 5 restarts; APGD transfer
#   <m>@2-paper-square-$N_SQUARE     Square end to end, 1,000 queries
# then `deqguard audit-table` (docs/TRAINING.md) combines them per sample. The defended grid,
# adaptive and Square audits run on the first 200 images by default: at the per-image costs of
# the committed audits (docs/TRAINING.md) they are 5-25 core-hours per model on 1,000.
#
# Environment: PY (default .venv/bin/python), N (images of the first three, 1000), N_PAPER,
# N_ADAPTIVE, N_SQUARE (200 each), ONLY (one model name: run only its chain).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
N=${N:-1000}
N_PAPER=${N_PAPER:-200}
N_ADAPTIVE=${N_ADAPTIVE:-200}
N_SQUARE=${N_SQUARE:-200}
export OMP_NUM_THREADS=1 PYTHONPATH=${PYTHONPATH:-$PWD}
MODELS=(micro-trades micro-trades-ri)
[ -n "${ONLY:-}" ] && MODELS=("$ONLY")

json_field() { # file, python expression over `d`
    "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); print($2)" "$1"
}

for m in "${MODELS[@]}"; do
    state=training/state/campaign-$m/state.json
    if [ ! -f "$state" ] || [ "$(json_field "$state" 'bool(d.get("finished"))')" != True ]; then
        echo "campaign-$m has not finished ($state): train it first" >&2
        exit 2
    fi
done

for m in "${MODELS[@]}"; do
    if [ "$(json_field "model_store/$m/manifest.json" 'd["version"]')" != 2 ]; then
        echo "== export $m@2"
        "$PY" -m training.evaluate --run "training/state/campaign-$m" --store model_store \
            --name "$m" --version 2 --weights best --n-test "$N" --threads 1 --batch-size 100
    fi
done
"$PY" -m training.curves training/state/campaign-micro-trades training/state/campaign-micro-trades-ri \
    --out docs/training-curves.png

audit() { # out-dir, then deqguard audit's arguments
    local out=$1
    shift
    echo "== $(date -u +%FT%TZ) $out"
    "$PY" -m deqguard.cli audit "$@" --batch-size 64 --out "$out"
}

chain() {
    local m=$1 d=docs/audits/$1@2
    audit "$d-off-quick9-$N" "$m@2" --defense off --suite quick --apgd-targets 9 -n "$N"
    audit "$d-paper-quick-$N" "$m@2" --defense paper --suite quick -n "$N"
    audit "$d-off-paper-$N" "$m@2" --defense off --suite paper -n "$N"
    audit "$d-paper-paper-$N_PAPER" "$m@2" --defense paper --suite paper -n "$N_PAPER"
    audit "$d-paper-adaptive-$N_ADAPTIVE" "$m@2" --defense paper --suite adaptive -n "$N_ADAPTIVE" \
        --attacks apgd-ce,apgd-t,bpda-apgd-ce,bpda-apgd-t,exact-apgd-ce,exact-apgd-t,bpda-pgd,exact-pgd
    audit "$d-paper-square-$N_SQUARE" "$m@2" --defense paper --suite adaptive -n "$N_SQUARE" \
        --attacks square-defended --square-queries 1000
}

pids=()
for m in "${MODELS[@]}"; do
    chain "$m" > "/tmp/campaign_finish-$m.log" 2>&1 &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
echo "== $(date -u +%FT%TZ) done (exit $status)"
exit $status
