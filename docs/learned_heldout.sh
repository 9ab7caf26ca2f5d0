#!/bin/bash
# Held-out-batch comparison of the learned embeddings on BBBC021 (BENCHMARKS.md, "Learned
# embeddings"): preprocess with the mad_int_featselect recipe, train ABRA and CellPainTR on 8 of
# the 10 weeks (Week1 and Week9 held out; the training itself holds out 2 of the 8 for
# validation), embed all wells, correct all wells with Harmony and BALANS, and score each on
# the held-out weeks and on all wells.
#   usage: docs/learned_heldout.sh [WORK_DIR]   (BALANS=path/to/balans, BALANS_SHARED=../shared)
set -euo pipefail
B=$(realpath "${BALANS:-target/release/balans}")
SHARED=$(realpath "${BALANS_SHARED:-../shared}")
WORK=${1:-learned_heldout}
RAW=$SHARED/data/bbbc021/bbbc021_well_raw.parquet
NEG="Metadata_PertType = 'negcon'"
mkdir -p "$WORK" && cd "$WORK"
rm -rf models ./*.parquet ./*.json ./*.txt
$B --quiet preprocess -i "$RAW" -o pre.parquet --recipe mad-int-featselect --plate Metadata_Plate --negcon "$NEG"
$B --quiet sql "CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION 'pre.parquet';
  SELECT * FROM p WHERE Metadata_Batch NOT IN ('Week1','Week9')" -o train.parquet
mkdir -p models
$B train --model abra -i train.parquet -b Metadata_Batch --label Metadata_Compound -o models/abra \
    --epochs 30 --patience 8 --seed 0 2> train_abra.log
$B train --model cellpaintr -i train.parquet -b Metadata_Batch --label Metadata_Compound \
    -o models/cellpaintr --epochs 6 --patience 3 --lr 3e-4 --batch-size 32 --seed 0 2> train_cellpaintr.log
tail -n 2 train_abra.log train_cellpaintr.log
for m in abra cellpaintr; do
  $B --quiet correct -i pre.parquet -b Metadata_Batch -o emb_$m.parquet --method embed --model models/$m
done
$B --quiet correct -i pre.parquet -b Metadata_Batch -o harmony.parquet --method harmony
$B --quiet correct -i pre.parquet -b Metadata_Batch -o balans.parquet
for t in pre emb_abra emb_cellpaintr harmony balans; do
  $B --quiet sql "CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION '$t.parquet';
    SELECT * FROM p WHERE Metadata_Batch IN ('Week1','Week9')" -o test_$t.parquet
  $B --quiet evaluate -i test_$t.parquet -b Metadata_Batch --label Metadata_MoA --negcon "$NEG" > test_$t.txt
  $B --quiet evaluate -i $t.parquet -b Metadata_Batch --label Metadata_MoA --negcon "$NEG" > all_$t.txt
  echo "== $t"; grep -E "batch_score|bio_score|overall" test_$t.txt all_$t.txt
done
