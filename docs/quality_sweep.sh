#!/usr/bin/env bash
# The BALANS quality sets of docs/balans.md, each scored by `balans tune` (one correction per
# setting, then the whole metric suite). Usage:
#   docs/quality_sweep.sh OUT_DIR [--grid NAME=V1,V2 ...]
# With no --grid, one setting: the defaults. Needs the shared data ($BALANS_SHARED, default
# ../shared) and a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: docs/quality_sweep.sh OUT_DIR [--grid ...]}"
shift
grid=("$@")
if [ ${#grid[@]} -eq 0 ]; then grid=(--grid seed=0); fi
shared="${BALANS_SHARED:-$(cd .. && pwd)/shared}"
bin=target/release/balans
mkdir -p "$out"
for seed in 1 2 3; do
    [ -f "$out/synthetic_seed$seed.parquet" ] ||
        "$bin" --quiet synth --seed "$seed" -o "$out/synthetic_seed$seed.parquet"
done
run() { # name input label negcon
    "$bin" --quiet tune -i "$2" -b Metadata_Batch --label "$3" --negcon "$4" \
        "${grid[@]}" --json "$out/$1.json" --overwrite > "$out/$1.md"
    echo "== $1"; cat "$out/$1.md"
}
run bbbc021 "$shared/golden/preprocess/final_mad_int_featselect.parquet" Metadata_MoA \
    "Metadata_PertType = 'negcon'"
run varchamp "$shared/data/varchamp/varchamp_b20_b21_well.parquet" Metadata_Perturbation \
    "Metadata_PertType = 'negcon'"
run synthetic_seed7 "$shared/data/synthetic/synthetic_n3000_d20_k10_b5_seed7.parquet" \
    Metadata_Compound "Metadata_IsControl"
for seed in 1 2 3; do
    run "synthetic_seed$seed" "$out/synthetic_seed$seed.parquet" Metadata_Compound \
        "Metadata_IsControl"
done
