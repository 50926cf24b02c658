#!/usr/bin/env bash
# One GPU slice: trains one Procgen game with the given methods and seeds side by side on one GPU for a
# fixed wall-clock budget, and keeps their scalars, per-episode records and final weights under results/.
#
#   scripts/gpu_slice.sh GAME MINUTES [METHOD:SEEDS ...]     (default methods: ppo:1,2 mdpo:1)
#   e.g. SLICE_COMMIT=abc1234 scripts/gpu_slice.sh coinrun 7.5 ppo:1,2 mdpo:1
#
# In order, each step stopping the slice when it fails:
#  1. checks the arguments, the GPU, and that the results directory is new;
#  2. installs device-files/bundle.tar.xz (scripts/gather_device_files.sh makes it on a machine with network)
#     offline into a directory of its own, put first on PYTHONPATH, so the machine's Python is left as it was;
#     without the bundle, it uses what is installed;
#  3. loads Procgen, with the bundle's system libraries on LD_LIBRARY_PATH only if it does not load without,
#     and checks that it renders GAME as PyPI's wheel does (scripts/procgen_fingerprint.py --check: a difference
#     stops a rehearsal, and is reported in the log of a GPU slice);
#  4. runs the CUDA tests (python -m pytest -q -m cuda tests): a GPU path that fails stops the slice before
#     any curve is made with it;
#  5. runs one sweep.py per METHOD at once, its seeds side by side (--jobs = their number), each stopped
#     after MINUTES (--stop-after-min: runs checkpoint and stop; --total-timesteps is only a ceiling), with
#     the flags docs/results.md gives: --bf16 --compile --eval-interval 8, paper hyperparameters otherwise;
#  6. exports the runs with export.py (per-episode records and weights kept) into results/GAME-<gpu>-<MINUTES>min;
#  7. with $OUT set (the GPU machine copies $OUT back), writes there slice.log and GAME-<gpu>-<MINUTES>min.tar.gz
#     (split into .part-* pieces above 15 MiB), to unpack in the repository root: the results directory, and
#     the sweeps' and training logs under sweeps/.
#
# Environment:
#   SLICE_COMMIT     the commit the tree was copied from, where it has no .git (the GPU machine's copy):
#                    export.py records it, since the runs can only log "unknown"
#   SLICE_FLAGS      training flags added after the slice's own, e.g. "--num-envs 256 --eval-interval 2 --eval-episodes 64"
#                    for the coinrun control (docs/results.md): the last of a repeated flag wins
#   SLICE_SUFFIX     added to the results directory's name, e.g. envs256: results/coinrun-h100-7.5min-envs256
#   SLICE_REHEARSAL  1: rehearse the whole slice on a CPU (no GPU needed, none used): tiny runs (REHEARSAL_FLAGS),
#                    one thread each, results/GAME-cpu-<MINUTES>min; the CUDA tests still run (and skip), so that
#                    their collection, which imports every test module, is checked with the bundle's packages.
#                    Pick a game whose untrained episodes end soon (starpilot, bigfish): an evaluation waits for
#                    each env's first episode, up to 1,000 steps in coinrun
#   PYTHON           the interpreter (default python3: on the GPU machine, the one that has torch)
# Exit codes: 0 done; 2 bad arguments or environment (nothing trained); 1 a step failed.
set -euo pipefail

GAMES="bigfish bossfight caveflyer chaser climber coinrun dodgeball fruitbot heist jumper leaper maze miner ninja plunder starpilot"
GPU_FLAGS="--bf16 --compile --eval-interval 8"
# Four iterations per agent of 8 envs x 32 steps, evaluated twice: every step of the slice in a minute or two
# on two CPU cores. --compile is left out: inductor on a CPU compiles for minutes.
REHEARSAL_FLAGS="--no-cuda --bf16 --eval-interval 2 --num-envs 8 --num-steps 32 --num-minibatches 2 --update-epochs 1 --total-timesteps 1024"
OUT_PIECE_MIB=15  # the GPU machine returns files of at most 16 MB

usage="usage: scripts/gpu_slice.sh GAME MINUTES [METHOD:SEEDS ...], e.g. coinrun 7.5 ppo:1,2 mdpo:1"
bad() { echo "gpu_slice.sh: $*" >&2; exit 2; }
fail() { echo "gpu_slice.sh: $*" >&2; exit 1; }

main() {
    set -euo pipefail  # again: main runs in the pipeline below, after set +e
    # 1. Arguments, before anything slow.
    [ $# -ge 2 ] || bad "$usage"
    local game=$1 minutes=$2
    shift 2
    [[ " $GAMES " == *" $game "* ]] || bad "unknown game '$game'; one of: $GAMES"
    [[ $minutes =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v m="$minutes" 'BEGIN {exit !(m > 0)}' \
        || bad "MINUTES must be a positive number, got '$minutes'"
    local specs=("$@")
    [ ${#specs[@]} -gt 0 ] || specs=(ppo:1,2 mdpo:1)
    local methods=() seed_lists=() spec method seeds
    for spec in "${specs[@]}"; do
        [[ $spec =~ ^([a-z0-9_]+):([0-9]+(,[0-9]+)*)$ ]] || bad "'$spec' is not METHOD:SEEDS, e.g. ppo:1,2"
        method=${BASH_REMATCH[1]} seeds=${BASH_REMATCH[2]//,/ }
        [[ " ${methods[*]} " != *" $method "* ]] || bad "$method is given twice: give its seeds once, e.g. $method:1,2"
        [ "$(tr ' ' '\n' <<<"$seeds" | sort | uniq -d)" = "" ] || bad "'$spec' repeats a seed"
        methods+=("$method") seed_lists+=("$seeds")
    done
    case ${SLICE_REHEARSAL:-0} in 0|1) ;; *) bad "SLICE_REHEARSAL must be 0 or 1, got '$SLICE_REHEARSAL'" ;; esac
    local rehearsal=${SLICE_REHEARSAL:-0} suffix=${SLICE_SUFFIX:-}
    [[ -z $suffix || $suffix =~ ^[a-z0-9][a-z0-9.-]*$ ]] || bad "SLICE_SUFFIX may hold a-z, 0-9, '.' and '-' only"
    local root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    cd "$root"
    [ -f sweep.py ] && [ -f export.py ] || bad "no sweep.py or export.py in $root"
    local commit=""
    if ! git rev-parse --verify -q HEAD >/dev/null 2>&1; then
        commit=${SLICE_COMMIT:-}
        [[ $commit =~ ^[0-9a-f]{7,40}$ ]] || bad "no git checkout here: set SLICE_COMMIT to the commit this tree was copied from (git rev-parse --short HEAD there)"
    fi
    local py=${PYTHON:-python3}
    command -v "$py" >/dev/null || bad "no $py (set PYTHON to the interpreter that has torch)"
    "$py" -c 'import torch' 2>/dev/null || bad "$py cannot import torch: the slice expects it installed (on the GPU machine: python3)"

    # The GPU, by a short name for the results directory: "NVIDIA H100 80GB HBM3" -> h100, "NVIDIA A100-SXM4-80GB"
    # -> a100, "NVIDIA GeForce RTX 4090" -> rtx4090.
    local gpu gpu_full="CPU"
    if [ "$rehearsal" = 1 ]; then
        gpu=cpu
    else
        gpu_full=$("$py" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')
        [ -n "$gpu_full" ] || bad "no CUDA device: this is a GPU slice (SLICE_REHEARSAL=1 rehearses it on a CPU)"
        gpu=$(awk '{s = ""; for (i = 1; i <= NF; i++) { w = tolower($i); if (w ~ /^(nvidia|geforce|tesla|quadro)$/) continue;
                    s = s w; if (w ~ /[0-9]/) break } sub(/-.*/, "", s); gsub(/[^a-z0-9]/, "", s); print s}' <<<"$gpu_full")
        [ -n "$gpu" ] || gpu=gpu
    fi
    local name="$game-$gpu-${minutes}min${suffix:+-$suffix}"
    local results="results/$name" sweep_root="sweeps/slice-$name"
    [ ! -e "$results" ] || bad "$results exists: a slice never overwrites results (SLICE_SUFFIX names another)"
    [ ! -e "$sweep_root" ] || bad "$sweep_root exists (an earlier slice's runs): move it away first"
    if [ -n "${OUT:-}" ]; then [ -d "$OUT" ] && [ -w "$OUT" ] || bad "OUT=$OUT is not a writable directory"; fi
    local flags="$GPU_FLAGS"
    if [ "$rehearsal" = 1 ]; then
        flags="$REHEARSAL_FLAGS"
        # The runs share a few cores: with one thread each, OpenMP does not oversubscribe them (tenfold slower).
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    fi
    flags="$flags${SLICE_FLAGS:+ $SLICE_FLAGS}"
    echo "== slice $name: ${specs[*]} side by side for $minutes min on $gpu_full; flags: $flags"

    # 2. Packages, offline.
    local work
    work=$(mktemp -d "${TMPDIR:-/tmp}/mdpo-slice.XXXXXX")
    trap 'rm -rf "$work"' EXIT  # the installed packages serve this slice only
    if [ -f device-files/bundle.tar.xz ]; then
        "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
            || bad "device-files holds wheels for CPython 3.12, and $py is $("$py" -V 2>&1)"
        tar -C "$work" -xJf device-files/bundle.tar.xz
        "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$work/site" \
            --find-links "$work/wheels" "$work"/wheels/*.whl || fail "installing device-files' wheels failed"
        export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
        echo "installed $(ls "$work/wheels" | wc -l) wheels into $work/site (first on PYTHONPATH)"
    else
        echo "no device-files/bundle.tar.xz (scripts/gather_device_files.sh makes it): using the installed packages"
    fi

    # 3. Procgen loads, with the carried system libraries only where the machine lacks its own.
    local load='from procgen import ProcgenGym3Env; ProcgenGym3Env(num=1, env_name="coinrun").close()' err
    if ! err=$("$py" -c "$load" 2>&1); then
        [[ $err == *"cannot open shared object file"* && -d $work/lib ]] || fail "Procgen does not load: $(tail -n 1 <<<"$err")"
        export LD_LIBRARY_PATH="$work/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        err=$("$py" -c "$load" 2>&1) || fail "Procgen does not load, with the carried libraries too: $(tail -n 1 <<<"$err")"
        echo "Procgen loads with the carried system libraries (LD_LIBRARY_PATH=$work/lib)"
    fi
    # The carried wheel's art is re-stored (gather_device_files.sh): the game must render as PyPI's wheel does.
    # The rehearsal, on the kind of machine the hashes come from, stops on a difference; a GPU machine only
    # reports one, since its own system libraries (libm, Qt's CPU paths) could differ there too.
    local fingerprint status=0
    fingerprint=$("$py" scripts/procgen_fingerprint.py --check --games "$game" 2>"$work/fingerprint.err") || status=$?
    if [ "$status" = 0 ]; then
        echo "Procgen renders $game as PyPI's wheel does (fingerprint ${fingerprint#* })"
    elif [ "$rehearsal" = 1 ]; then
        fail "Procgen's fingerprint check failed (exit $status): $(tail -n 1 "$work/fingerprint.err")"
    else
        echo "WARNING: Procgen's fingerprint check failed (exit $status), training anyway: $(tail -n 1 "$work/fingerprint.err")"
    fi
    "$py" - <<'EOF' || exit 1
import importlib, sys
for name in ("torch", "numpy", "gymnasium", "kornia", "tyro", "tensorboard", "tqdm", "matplotlib", "PIL", "pytest"):
    try:
        importlib.import_module(name)
    except Exception as error:
        sys.exit(f"gpu_slice.sh: cannot import {name} ({type(error).__name__}: {error}): "
                 "carry it (CARRY in scripts/gather_device_files.sh)")
import numpy, torch
print(f"torch {torch.__version__}, numpy {numpy.__version__}, Python {sys.version.split()[0]}")
EOF

    # Methods, seeds and flags as each sweep will check them, before the GPU minutes start.
    local i sweep_args=()
    for i in "${!methods[@]}"; do
        # shellcheck disable=SC2206
        local seed_array=(${seed_lists[i]})
        sweep_args[i]="--root $sweep_root --games $game --methods ${methods[i]} --seeds ${seed_lists[i]} --jobs ${#seed_array[@]} --stop-after-min $minutes"
        # shellcheck disable=SC2086
        "$py" sweep.py ${sweep_args[i]} --flags="$flags" --dry-run >/dev/null || bad "sweep.py refused ${methods[i]} (above)"
    done
    mkdir -p "$sweep_root"
    echo "$sweep_root" >"$log.where"

    # 4. The GPU paths first.
    echo "== CUDA tests"
    "$py" -m pytest -q -m cuda tests -p no:cacheprovider || fail "the CUDA tests failed: nothing trained"

    # 5. Training, every method at once.
    echo "== training: ${specs[*]}, $minutes min"
    local smi_pid=""
    if [ "$rehearsal" = 0 ] && command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 15 >"$sweep_root/nvidia-smi.csv" 2>&1 &
        smi_pid=$!
    fi
    local pids=() status=0 code
    for i in "${!methods[@]}"; do
        # shellcheck disable=SC2086
        "$py" sweep.py ${sweep_args[i]} --flags="$flags" >"$sweep_root/sweep-${methods[i]}.log" 2>&1 &
        pids[i]=$!
    done
    for i in "${!methods[@]}"; do
        code=0
        wait "${pids[i]}" || code=$?
        sed "s/^/[${methods[i]}] /" "$sweep_root/sweep-${methods[i]}.log"
        [ "$code" = 0 ] || { echo "gpu_slice.sh: the ${methods[i]} sweep exited $code" >&2; status=1; }
    done
    [ -z "$smi_pid" ] || kill "$smi_pid" 2>/dev/null || true

    # 6. Export whatever ran, also after a failed sweep: its runs' state says how they ended.
    echo "== export to $results"
    local how="scripts/gpu_slice.sh $game $minutes ${specs[*]} on one $gpu_full: one sweep.py per method at once,"
    for i in "${!methods[@]}"; do how="$how ${sweep_args[i]/--root $sweep_root /};"; done
    how="$how --flags=\"$flags\""
    [ -d "$sweep_root/runs" ] || fail "no runs under $sweep_root to export"
    "$py" export.py --runs "$sweep_root/runs" --to "$results" --how "$how" ${commit:+--commit "$commit"} \
        || fail "export.py failed"

    # 7. What comes back from the GPU machine.
    if [ -n "${OUT:-}" ]; then
        local packed=("$results") path
        for path in "$sweep_root"/*.log "$sweep_root"/*.csv "$sweep_root/logs"; do [ ! -e "$path" ] || packed+=("$path"); done
        tar -czf "$OUT/$name.tar.gz" "${packed[@]}"
        if [ "$(stat -c %s "$OUT/$name.tar.gz")" -gt $((OUT_PIECE_MIB * 1048576)) ]; then
            split -b "${OUT_PIECE_MIB}m" "$OUT/$name.tar.gz" "$OUT/$name.tar.gz.part-"
            rm "$OUT/$name.tar.gz"
            echo "in \$OUT: $name.tar.gz.part-* (cat them | tar -xz, in the repository root)"
        else
            echo "in \$OUT: $name.tar.gz (tar -xzf it in the repository root)"
        fi
    fi
    [ "$status" = 0 ] || fail "a sweep failed (above); what ran is exported to $results"
    echo "== done: $results"
}

# The whole output also goes to slice.log in the sweep's directory and in $OUT, copied once main has
# ended: tee's pipe closes only then, so the copy holds the last line too.
log=$(mktemp "${TMPDIR:-/tmp}/gpu-slice-log.XXXXXX")
set +e
main "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if [ -f "$log.where" ]; then cp "$log" "$(dirname "${BASH_SOURCE[0]}")/../$(cat "$log.where")/slice.log"; fi
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then cp "$log" "$OUT/slice.log"; fi
rm -f "$log" "$log.where"
exit "$rc"
