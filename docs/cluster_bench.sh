#!/usr/bin/env bash
# Single process against a local Balans cluster (Ballista) of 1 and 2 executors, on the
# synthetic workload; prints a Markdown table (BENCHMARKS.md, "Cluster").
#
#   docs/cluster_bench.sh BALANS_BINARY ROWS FEATURES [FILES] [METHOD] [SHUFFLE_COMPRESSION]
#
# BALANS_BINARY must be built with the `cluster` feature
# (cargo build --release -p balans-engine --features cluster). The table is written as FILES
# Parquet files of consecutive rows (the scan's partitions; default 4). Every run is checked
# to give the single process's values (the Parquet files are compared with `balans sql`).
set -euo pipefail
bin="$(realpath "$1")"; n="$2"; d="$3"; files="${4:-4}"; method="${5:-balans}"; codec="${6:-lz4}"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

"$bin" --quiet synth --n "$n" --d "$d" --k 1000 --batches 10 --seed 7 --output "$work/all.parquet" >/dev/null
mkdir -p "$work/in"
for ((i = 0; i < files; i++)); do
    lo=$(( n * i / files )); hi=$(( n * (i + 1) / files ))
    "$bin" --quiet sql "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '$work/all.parquet';
        COPY (SELECT * EXCLUDE (rn) FROM (SELECT *, row_number() OVER () AS rn FROM t)
              WHERE rn > $lo AND rn <= $hi) TO '$work/in/part-$i.parquet' STORED AS PARQUET" >/dev/null
done

seconds() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>"$work/last.err" || { cat "$work/last.err" >&2; exit 1; }; e=$(date +%s.%N); printf '%.2f' "$(echo "$e - $s" | bc)"; }
correct() { "$bin" --quiet correct --input "$work/in" --batch Metadata_Batch --method "$method" \
    --partitions "$files" --seed 1 --output "$1" --overwrite "${@:2}"; }
same() {
    "$bin" --quiet sql "CREATE EXTERNAL TABLE a STORED AS PARQUET LOCATION '$1';
        CREATE EXTERNAL TABLE b STORED AS PARQUET LOCATION '$2';
        SELECT count(*) AS differ FROM (SELECT * FROM a EXCEPT ALL SELECT * FROM b)" | grep -q '| 0 '
}

single=$(seconds correct "$work/single.parquet" --summary-json "$work/summary.json")
rows=("| single process | $single | 1.00 |")
for executors in 1 2; do
    port=$(( 40000 + RANDOM % 10000 ))
    "$bin" cluster scheduler --bind "127.0.0.1:$port" >/dev/null 2>"$work/scheduler.log" &
    pids+=($!)
    sleep 1
    for ((e = 0; e < executors; e++)); do
        p=$(( port + 10 + 10 * e ))
        RUST_LOG=balans_operators=info "$bin" cluster executor --scheduler "127.0.0.1:$port" \
            --bind "127.0.0.1:$p" --work-dir "$work/ex$executors-$e" >/dev/null \
            2>"$work/executors$executors-$e.log" &
        pids+=($!)
    done
    sleep 3
    t=$(seconds correct "$work/cluster$executors.parquet" --scheduler "df://127.0.0.1:$port" \
        --shuffle-compression "$codec")
    same "$work/single.parquet" "$work/cluster$executors.parquet" \
        || { echo "cluster of $executors: values differ" >&2; exit 1; }
    rows+=("| cluster, $executors executor(s) | $t | $(echo "scale=2; $t / $single" | bc) |")
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
done
echo "$method, $n x $d, $files files, shuffle $codec, $(nproc) cores, $(date -u +%F)"
echo
echo "| run | seconds | vs single |"
echo "|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
# Task and merge times of the cluster's steps (the executors' logs), per cluster size:
# step, tasks, sum of task seconds, longest task.
for executors in 1 2; do
    echo
    echo "cluster of $executors: step, tasks, task seconds (sum), longest task"
    cat "$work"/executors$executors-*.log | grep -oE 'cluster (task|merge): .*: [0-9.]+ s' \
        | sed -E 's/ of (partition [0-9]+\/[0-9]+|[0-9]+ partitions)//' \
        | awk -F': ' '{ t = $3; sub(/ s$/, "", t); k = $1 ": " $2; n[k]++; sum[k] += t;
                        if (t > mx[k]) mx[k] = t; if (!(k in seen)) { seen[k] = 1; order[++m] = k } }
                      END { for (i = 1; i <= m; i++) { k = order[i];
                            printf "  %s: %d, %.2f s, %.2f s\n", k, n[k], sum[k], mx[k] } }'
done
echo
echo "single-process stages (s): $(python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(', '.join(f\"{t['stage']} {t['seconds']:.2f}\" for t in s['stages']))" "$work/summary.json")"
