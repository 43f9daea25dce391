#!/usr/bin/env bash
# The GPU half of bench/gpu_embeddings.py: train both encoders on every pack in parallel on one GPU.
# Usage: bash bench/gpu_embeddings.sh PACK_DIR OUT_DIR SECONDS "SNAPSHOT TIMES"
# Writes OUT_DIR/<pack>_<encoder>.log and OUT_DIR/<pack>_<encoder>.tar.xz (the snapshots).
set -euo pipefail
packs=$1 out=$2 seconds=$3 snaps=$4 device=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1
work=$(mktemp -d)
nvidia-smi -L || true
# a few seconds' smoke test first: a broken environment fails here, cheaply
python3 bench/gpu_embeddings.py train --pack "$(ls "$packs"/*.pack | head -1)" --encoder shen --seconds 3 \
    --device "$device" --out "$work/smoke" > "$out/smoke.log" 2>&1 || { cat "$out/smoke.log"; exit 3; }
tail -1 "$out/smoke.log"
n=$(ls "$packs"/*.pack | wc -l)
threads=$(( $(nproc) / (2 * n) )); threads=$(( threads > 0 ? threads : 1 ))
pids=()
for p in "$packs"/*.pack; do
    m=$(basename "$p" .pack)
    for e in shen astro; do
        # shellcheck disable=SC2086  # the snapshot times are separate arguments
        python3 bench/gpu_embeddings.py train --pack "$p" --encoder $e --seconds "$seconds" --snapshots $snaps \
            --device "$device" --threads "$threads" --out "$work/$m" > "$out/${m}_$e.log" 2>&1 &
        pids+=($!)
    done
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for d in "$work"/*/; do
    m=$(basename "$d")
    [ "$m" = smoke ] && continue
    (cd "$work" && tar -cf - "$m"/shen_*) | xz -T0 -6 > "$out/${m}_shen.tar.xz" &
    (cd "$work" && tar -cf - "$m"/specformer_*) | xz -T0 -6 > "$out/${m}_astro.tar.xz" &
done
wait
ls -la "$out"
for f in "$out"/*_*.log; do echo "== $f"; tail -2 "$f"; done
exit $status
