//! Anchored BALANS through the operators: on a confounded toy set (a cluster that only one
//! batch holds) the unanchored correction moves that cluster relative to its own controls,
//! the anchored one removes the batch shift and leaves that distance unchanged; anchor errors
//! and the summary's label counts.

mod common;

use std::sync::{Arc, Mutex};

use balans_operators::config::{Anchor, BalansConfig};
use balans_operators::exec::{BalansSpec, correction_plan};
use balans_operators::{ProgressSink, RunSummary};
use common::{profile_table, str_col};
use datafusion::arrow::array::{AsArray, BooleanArray, RecordBatch};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::Float32Type;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::physical_plan::{ExecutionPlan, collect};
use datafusion::prelude::SessionContext;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const D: usize = 4;
const BATCHES: usize = 3;

/// The batch shift of batch `b` (a pure translation of every row).
fn shift(b: usize) -> [f32; D] {
    [0.6 * b as f32, -0.4 * b as f32, 0.25 * b as f32, 0.0]
}

/// Per batch: 40 controls (one replicate phenotype, identical profiles), 60 rows of each of
/// two shared compounds; batch 0 also holds 60 rows of a compound no other batch has. Every
/// row of batch `b` is its batch-free profile plus `shift(b)`; the shared compounds' profiles
/// are the same in every batch.
fn toy() -> RecordBatch {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let centres: [[f32; D]; 3] = [
        [2.0, 0.0, 0.5, -1.0],
        [0.0, 2.5, -0.5, 1.0],
        [3.0, 3.0, 1.5, 2.0],
    ];
    // 60 profiles scattered around a centre.
    let mut around = |centre: [f32; D]| -> Vec<[f32; D]> {
        (0..60)
            .map(|_| {
                let mut v = centre;
                v.iter_mut()
                    .for_each(|x| *x += rng.random::<f32>() * 0.6 - 0.3);
                v
            })
            .collect()
    };
    let shared: Vec<Vec<[f32; D]>> = (0..2).map(|c| around(centres[c])).collect();
    let unique: Vec<[f32; D]> = around(centres[2]);
    let (mut cols, mut batch, mut label, mut control) =
        (vec![Vec::new(); D], Vec::new(), Vec::new(), Vec::new());
    let mut push = |b: usize, v: [f32; D], l: &str, c: bool| {
        for f in 0..D {
            cols[f].push(v[f] + shift(b)[f]);
        }
        batch.push(format!("b{b}"));
        label.push(l.to_string());
        control.push(c);
    };
    for b in 0..BATCHES {
        for _ in 0..40 {
            push(b, [0.0; D], "DMSO", true);
        }
        for (c, rows) in shared.iter().enumerate() {
            for &v in rows {
                push(b, v, &format!("cpd{c}"), false);
            }
        }
        if b == 0 {
            for &v in &unique {
                push(b, v, "unique", false);
            }
        }
    }
    profile_table(
        batch,
        ("Metadata_Compound", label),
        ("Metadata_Control", control),
        cols,
    )
}

/// Keeps the last summary a pass reported, and the warnings.
#[derive(Debug, Default)]
struct Capture {
    summary: Mutex<Option<RunSummary>>,
    warnings: Mutex<Vec<String>>,
}

impl ProgressSink for Capture {
    fn stage_started(&self, _: &str, _: Option<u64>) {}
    fn stage_progress(&self, _: u64, _: Option<String>) {}
    fn stage_finished(&self, _: &str) {}
    fn warn(&self, message: &str) {
        self.warnings.lock().unwrap().push(message.to_string());
    }
    fn finished(&self, summary: &RunSummary) {
        *self.summary.lock().unwrap() = Some(summary.clone());
    }
}

fn config(anchor: Anchor) -> BalansConfig {
    BalansConfig {
        k: 5,
        sample_rows: None,
        anchor,
        ..BalansConfig::default()
    }
}

async fn correct(
    input: &RecordBatch,
    anchor: Anchor,
    mask: Option<&str>,
    label: Option<&str>,
    sink: Arc<Capture>,
) -> datafusion::error::Result<RecordBatch> {
    let mut spec = BalansSpec::new(
        (0..D).map(|f| format!("f{f}")).collect(),
        vec!["Metadata_Batch".into()],
        config(anchor),
        sink,
    );
    spec.fit_mask = mask.map(str::to_string);
    spec.anchor_label = label.map(str::to_string);
    let n = input.num_rows();
    let parts: Vec<Vec<RecordBatch>> = vec![
        vec![input.slice(0, n / 2)],
        vec![input.slice(n / 2, n - n / 2)],
    ];
    let source: Arc<dyn ExecutionPlan> =
        MemorySourceConfig::try_new_exec(&parts, input.schema(), None)?;
    let plan = correction_plan(source, spec)?;
    let out = collect(plan, SessionContext::new().task_ctx()).await?;
    Ok(concat_batches(&out[0].schema(), &out)?)
}

/// The unanchored correction.
async fn correct_plain(input: &RecordBatch) -> datafusion::error::Result<RecordBatch> {
    correct(input, Anchor::None, None, None, Arc::default()).await
}

/// The correction anchored on the rows flagged in `Metadata_Control`.
async fn correct_on_controls(input: &RecordBatch) -> datafusion::error::Result<RecordBatch> {
    let mask = Some("Metadata_Control");
    correct(input, Anchor::Negcon, mask, None, Arc::default()).await
}

/// Mean profile of the rows of batch `b` with compound `label`.
fn centroid(t: &RecordBatch, b: usize, label: &str) -> [f64; D] {
    let (batch, comp) = (
        str_col(t, "Metadata_Batch"),
        str_col(t, "Metadata_Compound"),
    );
    let rows: Vec<usize> = (0..t.num_rows())
        .filter(|&i| batch[i] == format!("b{b}") && comp[i] == label)
        .collect();
    assert!(!rows.is_empty());
    let mut c = [0.0f64; D];
    for (f, cf) in c.iter_mut().enumerate() {
        let col = t.column_by_name(&format!("f{f}")).unwrap();
        let col = col.as_primitive::<Float32Type>();
        *cf = rows.iter().map(|&i| col.value(i) as f64).sum::<f64>() / rows.len() as f64;
    }
    c
}

fn dist(a: [f64; D], b: [f64; D]) -> f64 {
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Distance in batch b0 from the unique compound's centroid to the controls' centroid.
fn unique_to_controls(t: &RecordBatch) -> f64 {
    dist(centroid(t, 0, "unique"), centroid(t, 0, "DMSO"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anchored_correction_removes_the_shift_and_keeps_a_batch_specific_cluster_in_place() {
    let input = toy();
    let before = unique_to_controls(&input);
    let plain = correct_plain(&input).await.unwrap();
    let anchored = correct_on_controls(&input).await.unwrap();
    // Unanchored: the unique cluster is pulled toward what other batches hold near it.
    let moved = unique_to_controls(&plain);
    assert!((moved - before).abs() > 0.05, "{before} -> {moved}");
    // Anchored: its distance to its own controls is unchanged...
    let kept = unique_to_controls(&anchored);
    assert!((kept - before).abs() < 1e-6, "{before} -> {kept}");
    // ... while the pure batch shift is gone: controls and shared compounds of every batch
    // land on each other.
    for label in ["DMSO", "cpd0", "cpd1"] {
        for b in 1..BATCHES {
            let gap = dist(centroid(&anchored, b, label), centroid(&anchored, 0, label));
            let was = dist(centroid(&input, b, label), centroid(&input, 0, label));
            assert!(was > 0.5 && gap < 1e-5, "{label} b{b}: {was} -> {gap}");
        }
    }
    // The fit-row column does not reach the output.
    assert!(anchored.column_by_name("Metadata_Control").is_none());
    assert_eq!(anchored.num_columns(), input.num_columns() - 1);
    assert_eq!(plain.num_columns(), input.num_columns());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_labels_anchor_and_single_batch_labels_are_counted() {
    let input = toy();
    let sink = Arc::new(Capture::default());
    let out = correct(
        &input,
        Anchor::Label,
        None,
        Some("Metadata_Compound"),
        sink.clone(),
    )
    .await
    .unwrap();
    assert_eq!(out.num_rows(), input.num_rows());
    let summary = sink.summary.lock().unwrap().clone().unwrap();
    // DMSO, cpd0 and cpd1 are in every batch; "unique" in batch b0 only.
    assert_eq!(summary.anchor_labels_shared, 3);
    assert_eq!(summary.anchor_labels_single_batch, 1);
    assert_eq!(summary.anchor_rows, input.num_rows() - 60);
    let warnings = sink.warnings.lock().unwrap().join("\n");
    assert!(
        warnings.contains("1 value(s) of anchor label 'Metadata_Compound' occur in one batch only"),
        "{warnings}"
    );
    // The shared labels are spread clusters, so the offsets far from them are local
    // estimates, not the exact shift; the unique cluster still moves far less than without
    // anchors.
    let plain = correct_plain(&input).await.unwrap();
    let before = unique_to_controls(&input);
    let kept = unique_to_controls(&out);
    let moved = unique_to_controls(&plain);
    assert!(
        (kept - before).abs() < 0.5 * (moved - before).abs(),
        "{before}: anchored {kept}, unanchored {moved}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anchor_predicate_that_matches_nothing_in_a_batch_names_it() {
    let input = toy();
    // Drop the controls' flag in batch b2.
    let batch = str_col(&input, "Metadata_Batch");
    let control = input
        .column_by_name("Metadata_Control")
        .unwrap()
        .as_boolean();
    let flags: BooleanArray = (0..input.num_rows())
        .map(|i| Some(control.value(i) && batch[i] != "b2"))
        .collect();
    let mut columns = input.columns().to_vec();
    columns[2] = Arc::new(flags);
    let input = RecordBatch::try_new(input.schema(), columns).unwrap();
    let err = correct_on_controls(&input).await.unwrap_err().to_string();
    assert!(err.contains("no anchor rows in batch 'b2'"), "{err}");
    assert!(!err.contains("'b0'") && !err.contains("'b1'"), "{err}");
}
