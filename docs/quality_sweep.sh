#!/usr/bin/env bash
# The BALANS quality sets of docs/balans.md, each scored by `balans tune` (one correction per
# setting, then the whole metric suite), and, with --peers, the peer pipelines of Arevalo et
# al. 2024 on the same inputs (ComBat, Harmony, sphering on the controls then Harmony). Usage:
#   docs/quality_sweep.sh OUT_DIR [--peers] [--grid NAME=V1,V2 ...]
# With no --grid, one setting: the defaults. The confounded sets (`balans synth --confounded`,
# seeds 11-13: most compounds in one batch only) sit next to BBBC021, VarChAMP and the
# balanced synthetic seeds. Every set names its negative controls (anchors of anchor=negcon,
# and of the `auto criterion` column) and its anchor label (anchor=label: values shared by
# several batches). Needs the shared data ($BALANS_SHARED, default ../shared) and a release
# build.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: docs/quality_sweep.sh OUT_DIR [--peers] [--grid ...]}"
shift
peers=0
if [ "${1:-}" = "--peers" ]; then
    peers=1
    shift
fi
grid=("$@")
if [ ${#grid[@]} -eq 0 ]; then grid=(--grid seed=0); fi
shared="${BALANS_SHARED:-$(cd .. && pwd)/shared}"
bin=target/release/balans
mkdir -p "$out"
for seed in 1 2 3; do
    [ -f "$out/synthetic_seed$seed.parquet" ] ||
        "$bin" --quiet synth --seed "$seed" -o "$out/synthetic_seed$seed.parquet"
done
for seed in 11 12 13; do
    [ -f "$out/confounded_seed$seed.parquet" ] ||
        "$bin" --quiet synth --confounded --n 6000 --seed "$seed" \
            -o "$out/confounded_seed$seed.parquet"
done
run() { # name input label negcon anchor-label
    local name="$1" input="$2" label="$3" negcon="$4" anchor="$5"
    "$bin" --quiet tune -i "$input" -b Metadata_Batch --label "$label" --negcon "$negcon" \
        --anchor-label "$anchor" "${grid[@]}" --json "$out/$name.json" --overwrite \
        > "$out/$name.md"
    echo "== $name"
    cat "$out/$name.md"
    if [ "$peers" = 1 ]; then
        "$bin" --quiet tune -i "$input" -b Metadata_Batch --label "$label" --negcon "$negcon" \
            --grid method=combat,harmony --json "$out/$name.peers.json" --overwrite \
            > "$out/$name.peers.md"
        cat "$out/$name.peers.md"
        # Arevalo's best pipeline: sphering fitted on the controls, then Harmony.
        "$bin" --quiet correct -i "$input" -b Metadata_Batch --method sphering \
            --negcon "$negcon" -o "$out/$name.sphered.parquet" --overwrite
        "$bin" --quiet correct -i "$out/$name.sphered.parquet" -b Metadata_Batch \
            --method harmony -o "$out/$name.sphering_harmony.parquet" --overwrite
        "$bin" --quiet evaluate -i "$out/$name.sphering_harmony.parquet" -b Metadata_Batch \
            --label "$label" --negcon "$negcon" --json "$out/$name.sphering_harmony.json" \
            --overwrite > "$out/$name.sphering_harmony.md"
        echo "-- sphering + harmony"
        cat "$out/$name.sphering_harmony.md"
        rm -f "$out/$name.sphered.parquet" "$out/$name.sphering_harmony.parquet"
    fi
}
run bbbc021 "$shared/golden/preprocess/final_mad_int_featselect.parquet" Metadata_MoA \
    "Metadata_PertType = 'negcon'" Metadata_Compound
run varchamp "$shared/data/varchamp/varchamp_b20_b21_well.parquet" Metadata_Perturbation \
    "Metadata_PertType = 'negcon'" Metadata_Perturbation
run synthetic_seed7 "$shared/data/synthetic/synthetic_n3000_d20_k10_b5_seed7.parquet" \
    Metadata_Compound "Metadata_IsControl" Metadata_Compound
for seed in 1 2 3; do
    run "synthetic_seed$seed" "$out/synthetic_seed$seed.parquet" Metadata_Compound \
        "Metadata_IsControl" Metadata_Compound
done
for seed in 11 12 13; do
    run "confounded_seed$seed" "$out/confounded_seed$seed.parquet" Metadata_Compound \
        "Metadata_PertType = 'negcon'" Metadata_Compound
done
