//! copairs-compatible mAP against the golden values (README item 9) and hand-computed cases.
mod common;

use std::collections::HashMap;

use balans_metrics::Codes;
use balans_metrics::map::{
    ApOutput, LabelMap, MapMetadata, QueryAp, average_precision_negcon, average_precision_nonrep,
    benjamini_hochberg, mean_average_precision, summarize_map,
};

const NULL_SIZE: usize = 10_000;
const THRESHOLD: f64 = 0.05;

struct Coded {
    labels: Codes,
    plates: Codes,
    wells: Codes,
}

fn code(g: &common::GoldenEmbedding) -> Coded {
    Coded {
        labels: Codes::from_strings(&g.label),
        plates: Codes::from_strings(&g.plate),
        wells: Codes::from_strings(&g.well),
    }
}

fn check_queries(folder: &str, file: &str, out: &ApOutput) {
    let golden = common::read_parquet(&common::golden(folder, file));
    let rows = common::col_i64(&golden, "row");
    let n_pos = common::col_i64(&golden, "n_pos_pairs");
    let n_total = common::col_i64(&golden, "n_total_pairs");
    let ap = common::col_f64(&golden, "average_precision");
    let ours: HashMap<usize, &QueryAp> = out.queries.iter().map(|q| (q.row, q)).collect();
    assert_eq!(ours.len(), rows.len(), "{folder}/{file}: query count");
    for i in 0..rows.len() {
        let row = usize::try_from(rows[i]).unwrap();
        let q = ours
            .get(&row)
            .unwrap_or_else(|| panic!("{folder}/{file}: row {row} missing"));
        assert_eq!(
            q.n_pos as i64, n_pos[i],
            "{folder}/{file}: n_pos of row {row}"
        );
        assert_eq!(
            q.n_total as i64, n_total[i],
            "{folder}/{file}: n_total of row {row}"
        );
        assert!(
            (q.average_precision - ap[i]).abs() <= 1e-12,
            "{folder}/{file}: AP of row {row}: {} vs golden {}",
            q.average_precision,
            ap[i]
        );
    }
}

fn check_labels(folder: &str, file: &str, ours: &[LabelMap], names: &[String]) {
    let golden = common::read_parquet(&common::golden(folder, file));
    let labels = common::col_str(&golden, "label");
    let n_profiles = common::col_i64(&golden, "n_profiles");
    let map = common::col_f64(&golden, "mean_average_precision");
    let p = common::col_f64(&golden, "p_value");
    let q = common::col_f64(&golden, "corrected_p_value");
    let below_q = common::col_str(&golden, "below_corrected_p");
    assert_eq!(ours.len(), labels.len(), "{folder}/{file}: label count");
    let by_name: HashMap<&str, &LabelMap> = ours
        .iter()
        .map(|l| (names[l.label as usize].as_str(), l))
        .collect();
    for i in 0..labels.len() {
        let l = by_name[labels[i].as_str()];
        let what = format!("{folder}/{file}: {}", labels[i]);
        assert_eq!(l.n_profiles as i64, n_profiles[i], "{what}: n_profiles");
        assert!(
            (l.mean_average_precision - map[i]).abs() <= 1e-12,
            "{what}: mAP {} vs {}",
            l.mean_average_precision,
            map[i]
        );
        assert!(
            (l.p_value - p[i]).abs() <= 0.01,
            "{what}: p {} vs {}",
            l.p_value,
            p[i]
        );
        if (q[i] - THRESHOLD).abs() > 0.01 {
            assert_eq!(
                l.below_corrected_p,
                below_q[i] == "true",
                "{what}: q {} vs {}",
                l.corrected_p_value,
                q[i]
            );
        }
    }
}

/// Summary against metrics.json; the fractions may move by one label where a golden p or q
/// lies within 0.01 of the threshold (RNG noise).
fn check_summary(folder: &str, flavour: &str, ours: &[LabelMap], out: &ApOutput) {
    let json = common::metrics_json(folder);
    let value = |key: &str| json[format!("{flavour}_{key}")].as_f64().unwrap();
    let summary = summarize_map(ours, out.single_replicate_labels.len());
    assert!(
        (summary.mean_map - value("map")).abs() <= 1e-12,
        "{folder} {flavour}: mAP {} vs {}",
        summary.mean_map,
        value("map")
    );
    assert_eq!(summary.n_groups as f64, value("n_groups"));
    assert_eq!(summary.n_profiles as f64, value("n_query_profiles_with_ap"));
    assert_eq!(summary.n_single_replicate_labels, 0);
    let golden = common::read_parquet(&common::golden(folder, &format!("map_{flavour}.parquet")));
    let near = |column: &str| {
        common::col_f64(&golden, column)
            .iter()
            .filter(|v| (*v - THRESHOLD).abs() <= 0.01)
            .count() as f64
    };
    let n = summary.n_groups as f64;
    assert!(
        (summary.fraction_below_p - value("fraction_below_p")).abs() <= near("p_value") / n + 1e-12,
        "{folder} {flavour}: fraction below p"
    );
    assert!(
        (summary.fraction_below_corrected_p - value("fraction_below_corrected_p")).abs()
            <= near("corrected_p_value") / n + 1e-12,
        "{folder} {flavour}: fraction below q"
    );
}

fn check_folder(folder: &'static str) {
    let g = common::load(folder);
    let c = code(&g);
    let meta = MapMetadata {
        labels: &c.labels.codes,
        plates: &c.plates.codes,
        wells: &c.wells.codes,
        is_negcon: &g.is_negcon,
    };
    for (flavour, out) in [
        (
            "negcon",
            average_precision_negcon(&g.all, g.d, &meta).unwrap(),
        ),
        (
            "nonrep",
            average_precision_nonrep(&g.all, g.d, &meta).unwrap(),
        ),
    ] {
        assert!(out.single_replicate_labels.is_empty());
        check_queries(folder, &format!("ap_{flavour}.parquet"), &out);
        let per_label =
            mean_average_precision(&out.queries, meta.labels, NULL_SIZE, THRESHOLD, 0).unwrap();
        check_labels(
            folder,
            &format!("map_{flavour}.parquet"),
            &per_label,
            &c.labels.names,
        );
        check_summary(folder, flavour, &per_label, &out);
    }
}

#[test]
fn golden_bbbc021_preprocessed() {
    check_folder("bbbc021_preprocessed");
}

#[test]
fn golden_bbbc021_combat() {
    check_folder("bbbc021_combat");
}

#[test]
fn golden_bbbc021_harmony() {
    check_folder("bbbc021_harmony");
}

#[test]
fn golden_synthetic_raw() {
    check_folder("synthetic_raw");
}

#[test]
fn golden_synthetic_combat() {
    check_folder("synthetic_combat");
}

#[test]
fn golden_synthetic_harmony() {
    check_folder("synthetic_harmony");
}

/// A tiny table: 2-d rows (angles), labels, plates, wells, controls.
struct Tiny {
    x: Vec<f64>,
    labels: Vec<u32>,
    plates: Vec<u32>,
    wells: Vec<u32>,
    is_negcon: Vec<bool>,
}

impl Tiny {
    fn meta(&self) -> MapMetadata<'_> {
        MapMetadata {
            labels: &self.labels,
            plates: &self.plates,
            wells: &self.wells,
            is_negcon: &self.is_negcon,
        }
    }
}

fn unit(angle_degrees: f64) -> [f64; 2] {
    let a = angle_degrees.to_radians();
    [a.cos(), a.sin()]
}

#[test]
fn negcon_ranking_by_hand() {
    // Plate 0: query A0 at 0 deg; its replicates A1 (30 deg, other well) and A2 (same well
    // name as A0 on plate 1: not a positive); controls at 10, 45 and 170 deg.
    // A0 ranking: ctrl 10 (neg), A1 30 (pos), ctrl 45 (neg), ctrl 170 (neg) -> AP = 1/2.
    let rows = [
        (0.0, 1, 0, 0, false),  // A0, plate 0, well 0
        (30.0, 1, 0, 1, false), // A1, plate 0, well 1
        (5.0, 1, 1, 0, false),  // A2, plate 1, well 0
        (10.0, 9, 0, 2, true),
        (45.0, 9, 0, 3, true),
        (170.0, 9, 0, 4, true),
        (0.0, 9, 1, 2, true),
        (90.0, 9, 1, 3, true),
    ];
    let t = Tiny {
        x: rows.iter().flat_map(|r| unit(r.0)).collect(),
        labels: rows.iter().map(|r| r.1).collect(),
        plates: rows.iter().map(|r| r.2).collect(),
        wells: rows.iter().map(|r| r.3).collect(),
        is_negcon: rows.iter().map(|r| r.4).collect(),
    };
    let out = average_precision_negcon(&t.x, 2, &t.meta()).unwrap();
    assert_eq!(out.queries.len(), 3);
    let a0 = out.queries[0];
    assert_eq!((a0.row, a0.n_pos, a0.n_total), (0, 1, 4));
    assert!((a0.average_precision - 0.5).abs() < 1e-15);
    // A1 (30 deg): positives A0 (0 deg, sim cos 30) and A2 (5 deg, cos 25, other plate);
    // negatives on plate 0: 10 (cos 20), 45 (cos 15), 170 (cos 140).
    // Ranking: 45 (neg), 10 (neg), A2 (pos, rank 3), A0 (pos, rank 4) -> (1/3 + 2/4) / 2.
    let a1 = out.queries[1];
    assert_eq!((a1.n_pos, a1.n_total), (2, 5));
    assert!((a1.average_precision - (1.0 / 3.0 + 0.5) / 2.0).abs() < 1e-15);
    // A2 on plate 1: positive A1 only (A0 has the same well name); negatives 0 deg, 90 deg.
    // Ranking: 0 deg (neg, cos 5), A1 (pos, cos 25), 90 deg (neg) -> 1/2.
    let a2 = out.queries[2];
    assert_eq!((a2.n_pos, a2.n_total), (1, 3));
    assert!((a2.average_precision - 0.5).abs() < 1e-15);
    assert!(out.plates_without_negatives.is_empty());
}

#[test]
fn ties_rank_positives_first() {
    // The query's positive and one control are the same vector: the tie goes to the positive.
    let rows = [
        ([1.0, 0.0], 1, false),
        ([1.0, 1.0], 1, false),
        ([2.0, 2.0], 9, true),
        ([1.0, -0.1], 9, true),
    ];
    let t = Tiny {
        x: rows.iter().flat_map(|r| r.0).collect(),
        labels: rows.iter().map(|r| r.1).collect(),
        plates: vec![0; 4],
        wells: vec![0, 1, 2, 3],
        is_negcon: rows.iter().map(|r| r.2).collect(),
    };
    let out = average_precision_negcon(&t.x, 2, &t.meta()).unwrap();
    // Row 1 (45 deg): positive row 0 (cos 45), negatives row 2 (cos 0: same direction) and
    // row 3. Row 0: positive row 1 and negative row 2 tie exactly (both at 45 deg) -> the
    // positive first, but row 3 (-5.7 deg) ranks above both: AP = 1/2.
    assert_eq!(out.queries[0].n_total, 3);
    assert!((out.queries[0].average_precision - 0.5).abs() < 1e-15);
    assert!((out.queries[1].average_precision - 0.5).abs() < 1e-15);
}

#[test]
fn single_replicate_labels_and_plates_without_controls() {
    // Label 1 twice on plate 0 (with a control), label 2 twice on plate 1 (no control),
    // label 3 once (dropped).
    let rows = [
        ([1.0, 0.0], 1, 0, false),
        ([1.0, 0.2], 1, 0, false),
        ([0.0, 1.0], 9, 0, true),
        ([0.0, 1.0], 9, 0, true),
        ([1.0, 0.5], 2, 1, false),
        ([0.5, 1.0], 2, 1, false),
        ([1.0, 1.0], 3, 1, false),
    ];
    let t = Tiny {
        x: rows.iter().flat_map(|r| r.0).collect(),
        labels: rows.iter().map(|r| r.1).collect(),
        plates: rows.iter().map(|r| r.2).collect(),
        wells: (0..7).collect(),
        is_negcon: rows.iter().map(|r| r.3).collect(),
    };
    let out = average_precision_negcon(&t.x, 2, &t.meta()).unwrap();
    assert_eq!(out.single_replicate_labels, vec![3]);
    assert_eq!(out.plates_without_negatives, vec![1]);
    let rows_out: Vec<usize> = out.queries.iter().map(|q| q.row).collect();
    assert_eq!(rows_out, vec![0, 1, 4, 5]);
    // Plate 1's queries: one positive, no negatives -> AP 1 (copairs' behaviour).
    assert_eq!((out.queries[2].n_pos, out.queries[2].n_total), (1, 1));
    assert_eq!(out.queries[2].average_precision, 1.0);
    // Plate 0's queries rank their replicate above both controls.
    assert_eq!(out.queries[0].average_precision, 1.0);

    let per_label = mean_average_precision(&out.queries, &t.labels, 99, 0.05, 7).unwrap();
    assert_eq!(per_label.len(), 2);
    // Label 2 only has (1, 1) rankings: the null equals the mAP, never above it: p = 1/100.
    assert_eq!(per_label[1].label, 2);
    assert_eq!(per_label[1].p_value, 0.01);
    // Label 1: configuration (1, 3); a null mAP of 1 is never strictly above 1 either.
    assert_eq!(per_label[0].p_value, 0.01);
    let summary = summarize_map(&per_label, out.single_replicate_labels.len());
    assert_eq!(summary.n_groups, 2);
    assert_eq!(summary.n_single_replicate_labels, 1);
    assert_eq!(summary.mean_map, 1.0);

    // Nonrep: without the controls and label 3, each plate holds a single label, so there is
    // no negative pair at all: an error, as copairs' `UnpairedException`.
    assert!(average_precision_nonrep(&t.x, 2, &t.meta()).is_err());
    let err = average_precision_negcon(
        &t.x,
        2,
        &MapMetadata {
            is_negcon: &[false; 7],
            ..t.meta()
        },
    );
    assert!(err.is_err(), "no negative pair at all must be an error");
}

#[test]
fn nonrep_rules_by_hand() {
    // Labels 1 and 2 on plate 0, label 1 again on plate 1 with label 3.
    // Query row 0 (0 deg): positives row 1 (plate 0, 60 deg) and row 3 (plate 1, 20 deg);
    // negatives only on plate 0: row 2 (label 2, 10 deg). Controls (row 5) are ignored.
    let rows = [
        (0.0, 1, 0, false),
        (60.0, 1, 0, false),
        (10.0, 2, 0, false),
        (20.0, 1, 1, false),
        (80.0, 2, 1, false),
        (1.0, 9, 0, true),
        (50.0, 3, 1, false),
        (55.0, 3, 1, false),
    ];
    let t = Tiny {
        x: rows.iter().flat_map(|r| unit(r.0)).collect(),
        labels: rows.iter().map(|r| r.1).collect(),
        plates: rows.iter().map(|r| r.2).collect(),
        wells: vec![0; 8],
        is_negcon: rows.iter().map(|r| r.3).collect(),
    };
    let out = average_precision_nonrep(&t.x, 2, &t.meta()).unwrap();
    assert_eq!(out.queries.len(), 7);
    let q0 = out.queries[0];
    assert_eq!((q0.row, q0.n_pos, q0.n_total), (0, 2, 3));
    // Ranking: row 2 (neg, 10 deg), row 3 (pos, 20), row 1 (pos, 60) -> (1/2 + 2/3) / 2.
    assert!((q0.average_precision - (0.5 + 2.0 / 3.0) / 2.0).abs() < 1e-15);
    // Row 3 on plate 1: positives rows 0 and 1; negatives rows 4, 6, 7 (labels 2 and 3).
    let q3 = out.queries.iter().find(|q| q.row == 3).unwrap();
    assert_eq!((q3.n_pos, q3.n_total), (2, 5));
    assert_eq!(out.single_replicate_labels, vec![9]);
    assert!(out.plates_without_negatives.is_empty());
}

#[test]
fn benjamini_hochberg_by_hand() {
    // Sorted p: 0.01, 0.02, 0.03, 0.04, 0.5 (m = 5): raw 0.05, 0.05, 0.05, 0.05, 0.5.
    let p = [0.04, 0.5, 0.01, 0.03, 0.02];
    let q = benjamini_hochberg(&p);
    let expected = [0.05, 0.5, 0.05, 0.05, 0.05];
    for (a, b) in q.iter().zip(expected) {
        assert!((a - b).abs() < 1e-15, "{q:?}");
    }
    // Monotone step-up and the cap at 1: raw 0.9 * 2 / 1 = 1.8 -> min with 0.95 -> 0.95.
    let q = benjamini_hochberg(&[0.9, 0.95]);
    assert_eq!(q, vec![0.95, 0.95]);
    let q = benjamini_hochberg(&[0.6, 0.01, 0.7]);
    assert!((q[1] - 0.03).abs() < 1e-15 && (q[0] - 0.7).abs() < 1e-15 && q[2] == 0.7);
}

#[test]
fn null_p_values_are_seeded_and_plausible() {
    // 20 queries of one label, each 1 positive among 10: observed AP 1/10 each is the worst
    // possible mAP; an AP of 1 everywhere is never beaten (p = 1 / (n + 1)).
    let labels = vec![0u32; 20];
    let worst: Vec<QueryAp> = (0..20)
        .map(|row| QueryAp {
            row,
            n_pos: 1,
            n_total: 10,
            average_precision: 0.1,
        })
        .collect();
    let a = mean_average_precision(&worst, &labels, 1000, 0.05, 3).unwrap();
    let b = mean_average_precision(&worst, &labels, 1000, 0.05, 3).unwrap();
    assert_eq!(a, b);
    // All 20 queries share one null sample per draw, so the null mAP is one query's null AP:
    // above 0.1 unless the positive ranks last, p about 9/10.
    assert!((a[0].p_value - 0.9).abs() < 0.03, "{a:?}");
    let best: Vec<QueryAp> = worst
        .iter()
        .map(|q| QueryAp {
            average_precision: 1.0,
            ..*q
        })
        .collect();
    let c = mean_average_precision(&best, &labels, 1000, 0.05, 3).unwrap();
    assert_eq!(c[0].p_value, 1.0 / 1001.0);
    assert!(c[0].below_p && c[0].below_corrected_p);
    // Expected null AP of 1 positive among 10 is H(10)/10 = 0.2929: an observed mAP of 0.3
    // sits near the median for a single query.
    let one = [QueryAp {
        row: 0,
        n_pos: 1,
        n_total: 10,
        average_precision: 0.3,
    }];
    let d = mean_average_precision(&one, &labels, 10_000, 0.05, 1).unwrap();
    // P(null AP > 0.3) = P(rank <= 3) = 3/10.
    assert!((d[0].p_value - 0.3).abs() < 0.02, "{d:?}");
}

/// Process CPU time (user + system) in seconds, from `/proc/self/stat` (Linux; 0 elsewhere).
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after_name = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0);
    ticks / 100.0
}

/// Scale benchmark: 100,000 rows x 300 features, 1,000 labels, 40 plates of 2,500 rows, 10%
/// negative controls. Prints wall and CPU time of both AP flavours and a checksum of the APs
/// (bits of every AP hashed in row order) so runs before and after a change can be compared.
/// Run with `cargo test -p balans-metrics --test golden_map -- --ignored --nocapture`.
#[test]
#[ignore = "scale benchmark, about a minute"]
fn scale_benchmark_100k() {
    use rand::{Rng, SeedableRng};
    let (n, d, n_labels, plate_rows, n_wells) =
        (100_000usize, 300usize, 1000u32, 2500usize, 384usize);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let centroids: Vec<f64> = (0..n_labels as usize * d)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let plate_shifts: Vec<f64> = (0..(n / plate_rows) * d)
        .map(|_| rng.random_range(-0.5..0.5))
        .collect();
    let mut x = vec![0.0; n * d];
    let mut labels = vec![0u32; n];
    let mut is_negcon = vec![false; n];
    let plates: Vec<u32> = (0..n).map(|i| (i / plate_rows) as u32).collect();
    let wells: Vec<u32> = (0..n).map(|i| (i % n_wells) as u32).collect();
    for i in 0..n {
        is_negcon[i] = rng.random_bool(0.1);
        labels[i] = if is_negcon[i] {
            n_labels
        } else {
            rng.random_range(0..n_labels)
        };
        for j in 0..d {
            let centroid = if is_negcon[i] {
                0.0
            } else {
                centroids[labels[i] as usize * d + j] * 0.3
            };
            x[i * d + j] =
                centroid + plate_shifts[plates[i] as usize * d + j] + rng.random_range(-1.0..1.0);
        }
    }
    let meta = MapMetadata {
        labels: &labels,
        plates: &plates,
        wells: &wells,
        is_negcon: &is_negcon,
    };
    for (name, run) in [
        (
            "negcon",
            average_precision_negcon as fn(&[f64], usize, &MapMetadata) -> _,
        ),
        ("nonrep", average_precision_nonrep),
    ] {
        let (wall, cpu) = (std::time::Instant::now(), process_cpu_seconds());
        let out: ApOutput = run(&x, d, &meta).unwrap();
        let (wall, cpu) = (wall.elapsed().as_secs_f64(), process_cpu_seconds() - cpu);
        let checksum = out.queries.iter().fold(0u64, |h, q| {
            (h ^ q.average_precision.to_bits()).wrapping_mul(0x100_0000_01b3)
        });
        let mean =
            out.queries.iter().map(|q| q.average_precision).sum::<f64>() / out.queries.len() as f64;
        println!(
            "{name}: {} queries, wall {wall:.2} s, cpu {cpu:.2} s, mean AP {mean:.12}, checksum {checksum:016x}",
            out.queries.len()
        );
    }
}
