//! The correction operators over several input partitions: the same bytes for 1, 3 and 7
//! partitions, every operator against its kernel, `EXPLAIN` of the chain, cancellation and
//! working-file clean-up.

mod common;

use std::sync::Arc;

use balans_operators::NoProgress;
use balans_operators::config::{Anchor, BalansConfig, Method, PcaSetting, Variant};
use balans_operators::exec::{BalansSpec, correction_plan};
use balans_operators::kernels::combat::{BatchMoments, fit_combat};
use balans_operators::kernels::elbow::ElbowParams;
use balans_operators::kernels::landmark::{RowBlocks, SamplingParams, sample_landmarks};
use balans_operators::kernels::smooth::{SmoothAccumulator, SmoothOptions};
use common::{profile_table, str_col};
use datafusion::arrow::array::{AsArray, Float32Array, RecordBatch};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{Float32Type, SchemaRef};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::{ExecutionPlan, collect, displayable, execute_stream};
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const D: usize = 6;

/// `n` rows: `D` features (three clusters, batch shifts), batch and label columns, and a
/// negative-control flag column.
fn table(n: usize, batches: usize, seed: u64) -> RecordBatch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut cols: Vec<Vec<f32>> = (0..D).map(|_| Vec::with_capacity(n)).collect();
    let mut batch = Vec::with_capacity(n);
    let mut label = Vec::with_capacity(n);
    let mut negcon = Vec::with_capacity(n);
    for i in 0..n {
        let b = i % batches;
        let c = (i / batches) % 3;
        for (f, col) in cols.iter_mut().enumerate() {
            let shift = b as f32 * 0.8 * if f % 2 == 0 { 1.0 } else { -0.5 };
            col.push(c as f32 * 4.0 + shift + rng.random::<f32>() * 1.5 + 100.0);
        }
        batch.push(format!("b{b}"));
        label.push(format!("c{c}"));
        negcon.push(c == 0);
    }
    profile_table(batch, ("Metadata_Label", label), ("fit", negcon), cols)
}

/// The batch codes of a table made by `table`: 0 for `b0`, 1 for `b1`, ...
fn batch_codes(input: &RecordBatch) -> Vec<usize> {
    str_col(input, "Metadata_Batch")
        .iter()
        .map(|v| v[1..].parse().unwrap())
        .collect()
}

/// `batch` split into `parts` contiguous partitions of uneven sizes.
fn partitioned(batch: &RecordBatch, parts: usize) -> Arc<dyn ExecutionPlan> {
    let n = batch.num_rows();
    let mut cuts: Vec<usize> = (0..=parts).map(|k| k * n / parts).collect();
    // Uneven: move inner cuts a little.
    for c in cuts.iter_mut().skip(1).take(parts.saturating_sub(1)) {
        *c = (*c + 7).min(n);
    }
    let partitions: Vec<Vec<RecordBatch>> = cuts
        .windows(2)
        .map(|w| {
            // Several record batches per partition.
            let mut out = Vec::new();
            let mut s = w[0];
            while s < w[1] {
                let e = (s + 97).min(w[1]);
                out.push(batch.slice(s, e - s));
                s = e;
            }
            out
        })
        .collect();
    MemorySourceConfig::try_new_exec(&partitions, batch.schema(), None).unwrap()
}

fn spec(config: BalansConfig) -> BalansSpec {
    let mut s = BalansSpec::new(
        (0..D).map(|f| format!("f{f}")).collect(),
        vec!["Metadata_Batch".into()],
        config,
        Arc::new(NoProgress),
    );
    if s.config.method == Method::Sphering || s.config.anchor.negcon() {
        s.fit_mask = Some("fit".into());
    }
    if s.config.anchor.label() {
        s.anchor_label = Some("Metadata_Label".into());
    }
    s
}

fn session() -> SessionContext {
    session_in(&temp_root("shared"))
}

fn session_in(dir: &std::path::Path) -> SessionContext {
    let runtime = RuntimeEnvBuilder::new()
        .with_temp_file_path(dir)
        .build_arc()
        .unwrap();
    SessionContext::new_with_config_rt(SessionConfig::new().with_target_partitions(1), runtime)
}

/// A temporary directory of this test process (one per test that counts files in it).
fn temp_root(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("balans-exec-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn run(batch: &RecordBatch, parts: usize, config: BalansConfig) -> RecordBatch {
    let plan = correction_plan(partitioned(batch, parts), spec(config)).unwrap();
    let out = collect(plan, session().task_ctx()).await.unwrap();
    concat_batches(&out[0].schema(), &out).unwrap()
}

fn features(b: &RecordBatch) -> Vec<f32> {
    let n = b.num_rows();
    let mut x = vec![0.0f32; n * D];
    for f in 0..D {
        let col = b.column_by_name(&format!("f{f}")).unwrap();
        let col = col.as_primitive::<Float32Type>();
        for i in 0..n {
            x[i * D + f] = col.value(i);
        }
    }
    x
}

/// The default configuration with another correction method.
fn with_method(method: Method) -> BalansConfig {
    BalansConfig {
        method,
        ..BalansConfig::default()
    }
}

fn configs() -> Vec<(&'static str, BalansConfig)> {
    let small = |c: BalansConfig| BalansConfig {
        k: 8,
        tau: 20,
        leaf_rows: 128,
        chunk_rows: 50,
        ..c
    };
    vec![
        ("balans", small(BalansConfig::default())),
        (
            "balans, row sample",
            small(BalansConfig {
                sample_rows: Some(300),
                ..BalansConfig::default()
            }),
        ),
        (
            "balans, anchored on controls, row sample",
            small(BalansConfig {
                sample_rows: Some(300),
                anchor: Anchor::Negcon,
                ..BalansConfig::default()
            }),
        ),
        (
            "balans, anchored on shared labels",
            small(BalansConfig {
                anchor: Anchor::Label,
                ..BalansConfig::default()
            }),
        ),
        ("paper", small(BalansConfig::paper())),
        (
            "pca",
            small(BalansConfig {
                pca: PcaSetting::Components(3),
                iterations: 1,
                ..BalansConfig::default()
            }),
        ),
        ("combat", small(with_method(Method::ComBat))),
        ("sphering", small(with_method(Method::Sphering))),
        ("harmony", small(with_method(Method::Harmony))),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_count_does_not_change_the_bytes() {
    let input = table(1000, 4, 1);
    for (name, config) in configs() {
        let one = run(&input, 1, config.clone()).await;
        assert_eq!(one.num_rows(), 1000, "{name}");
        for parts in [3, 7] {
            let many = run(&input, parts, config.clone()).await;
            assert_eq!(one, many, "{name}: {parts} partitions");
        }
        // Metadata passes through in input order.
        assert_eq!(
            one.column_by_name("Metadata_Label").unwrap(),
            input.column_by_name("Metadata_Label").unwrap(),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balans_operators_match_the_kernels() {
    // One pass, every row sampled: the operators compute exactly what the kernels do.
    let input = table(600, 3, 2);
    let config = BalansConfig {
        k: 8,
        tau: 20,
        iterations: 1,
        leaf_rows: 1 << 20,
        ..BalansConfig::default()
    };
    let out = run(&input, 3, config.clone()).await;
    let x = features(&input);
    let n = input.num_rows();
    // Kernel path: batch-grouped order (stable by batch code), landmarks, smoothing.
    let codes = batch_codes(&input);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (codes[i], i));
    let grouped: Vec<f32> = order
        .iter()
        .flat_map(|&i| x[i * D..(i + 1) * D].iter().copied())
        .collect();
    let offsets = vec![0, 200, 400, 600];
    let params = SamplingParams {
        k: config.k,
        block: config.block,
        tau: config.tau,
        max_landmarks: usize::MAX,
        seed: config.seed,
        elbow: ElbowParams {
            rule: config.elbow,
            a_min: config.a_min,
            bins: config.bins,
            r_min: config.r_min(),
            min_threshold: config.min_threshold(),
        },
    };
    let z = RowBlocks::new(vec![&grouped], D);
    let sampled = sample_landmarks(&z, &offsets, &params, None, &|| false, &mut |_, _| {}).unwrap();
    let batch_u32: Vec<u32> = codes.iter().map(|&c| c as u32).collect();
    let mut acc = SmoothAccumulator::new(&sampled.landmarks, D, Variant::Residual);
    acc.add_rows(&sampled.landmarks, &x, &batch_u32, &x);
    let options = SmoothOptions {
        nearest_fallback: false,
        ..config.smooth_options()
    };
    let fit = acc.finish(&options, &sampled.landmarks, |g| {
        offsets.partition_point(|&o| o <= g) - 1
    });
    let mut want = vec![0.0f32; n * D];
    let mut covered = vec![false; n];
    fit.apply_rows(
        &sampled.landmarks,
        &x,
        &batch_u32,
        &x,
        &mut want,
        &mut covered,
    );
    let got = features(&out);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| ((a - b).abs() / b.abs().max(1.0)) as f64)
        .fold(0.0, f64::max);
    assert!(worst <= 1e-6, "operators vs kernels: {worst:e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combat_operators_match_the_kernel() {
    let input = table(500, 3, 3);
    let out = run(
        &input,
        7,
        BalansConfig {
            method: Method::ComBat,
            leaf_rows: 64,
            ..BalansConfig::default()
        },
    )
    .await;
    let x = features(&input);
    let codes = batch_codes(&input);
    let mut moments = BatchMoments::new(3, D);
    for (i, &b) in codes.iter().enumerate() {
        let row: Vec<f64> = x[i * D..(i + 1) * D].iter().map(|&v| v as f64).collect();
        moments.add_row(b, &row);
    }
    let names: Vec<String> = (0..3).map(|b| format!("b{b}")).collect();
    let model = fit_combat(&moments, &names).unwrap();
    let got = features(&out);
    let mut o = vec![0.0; D];
    for (i, &b) in codes.iter().enumerate() {
        let row: Vec<f64> = x[i * D..(i + 1) * D].iter().map(|&v| v as f64).collect();
        model.apply_row(b, &row, &mut o);
        for f in 0..D {
            let (g, w) = (got[i * D + f] as f64, o[f]);
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                "row {i} f{f}: {g} vs {w}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_every_step_with_its_partitions() {
    let input = table(300, 3, 4);
    let config = BalansConfig {
        pca: PcaSetting::Components(3),
        ..BalansConfig::default()
    };
    let plan = correction_plan(partitioned(&input, 3), spec(config)).unwrap();
    let shown = displayable(plan.as_ref()).indent(true).to_string();
    for step in [
        "OrderedConcatExec: partitions=3 in order",
        "BalansApplyExec: pass 2/2 partitions=3",
        "BalansSmoothExec: pass 2/2 global",
        "BalansSmoothPartialExec: pass 2/2 partitions=3",
        "BalansLandmarkExec: pass 2/2 global",
        "BalansReduceExec: pass 2/2 partitions=3, pca=3",
        "BalansPcaExec: pass 2/2 global",
        "BalansGramExec: pass 2/2 partitions=3",
        "BalansProfileExec: pass 2/2 global",
        "BalansIngestExec: pass 2/2 partitions=3",
        "BalansApplyExec: pass 1/2 partitions=3",
        "BalansIngestExec: pass 1/2 partitions=3",
        "CoalescePartitionsExec",
    ] {
        assert!(shown.contains(step), "missing {step} in\n{shown}");
    }
    let first = shown.find("BalansApplyExec: pass 1/2").unwrap();
    let second = shown.find("BalansApplyExec: pass 2/2").unwrap();
    assert!(second < first, "pass 2 sits above pass 1:\n{shown}");
}

fn files_below(dir: &std::path::Path) -> usize {
    walk(dir)
}

fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() { walk(&p) } else { 1 }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_with_partitions_in_flight_removes_the_working_files() {
    let input = table(3000, 4, 5);
    let config = BalansConfig {
        chunk_rows: 16,
        ..BalansConfig::default()
    };
    let root = temp_root("cancel");
    let ctx = session_in(&root);
    let plan = correction_plan(partitioned(&input, 7), spec(config)).unwrap();
    let mut stream = execute_stream(plan.clone(), ctx.task_ctx()).unwrap();
    // The first corrected batch: every step of pass 2 has run, pass 2's write is in flight.
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.num_rows() > 0);
    assert!(files_below(&root) > 0, "working files exist while running");
    drop(stream);
    drop(plan);
    // Workers notice the closed channels at their next chunk and drop their files.
    let start = std::time::Instant::now();
    while files_below(&root) > 0 && start.elapsed().as_secs() < 20 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(files_below(&root), 0, "working files left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_partition_fails_the_run_with_its_error() {
    let mut input = table(400, 2, 6);
    // NaN in the last partition only.
    let mut f0: Vec<f32> = input
        .column_by_name("f0")
        .unwrap()
        .as_primitive::<Float32Type>()
        .values()
        .to_vec();
    f0[390] = f32::NAN;
    let idx = input.schema().index_of("f0").unwrap();
    let mut cols = input.columns().to_vec();
    cols[idx] = Arc::new(Float32Array::from(f0));
    let schema: SchemaRef = input.schema();
    input = RecordBatch::try_new(schema, cols).unwrap();
    let plan = correction_plan(partitioned(&input, 3), spec(BalansConfig::default())).unwrap();
    let err = collect(plan, session().task_ctx()).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("f0 (1)"), "{text}");
}
