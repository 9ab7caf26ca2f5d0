//! ABRA end to end on small problems: gradients against finite differences, training that
//! learns, save/load round trips, determinism across thread counts, and bad input.

mod common;

use std::sync::atomic::AtomicBool;

use balans_learned::abra::{AbraConfig, AbraModel};
use balans_learned::init::Initializer;
use balans_learned::train::nearest_neighbour_accuracy;
use balans_learned::{Embedder, Profiles, TrainOptions, train_abra};
use candle_core::{Device, Tensor};
use common::central_difference;

/// `labels` classes x `batches` batches x `per` rows: a label signal on the first features, a
/// batch shift on all features, and noise.
fn toy(labels: usize, batches: usize, per: usize, d: usize, seed: u64) -> Profiles {
    let mut init = Initializer::new(seed, &Device::Cpu);
    let mut x = Vec::new();
    let (mut batch_names, mut label_names) = (Vec::new(), Vec::new());
    let shifts = init.normal(batches * d);
    let signal = init.normal(labels * d);
    for b in 0..batches {
        for l in 0..labels {
            for _ in 0..per {
                let noise = init.normal(d);
                for j in 0..d {
                    x.push(2.0 * signal[l * d + j] + 3.0 * shifts[b * d + j] + 0.5 * noise[j]);
                }
                batch_names.push(format!("batch{b}"));
                label_names.push(format!("compound{l}"));
            }
        }
    }
    Profiles {
        x,
        features: (0..d).map(|j| format!("f{j}")).collect(),
        batches: batch_names,
        labels: label_names,
    }
}

fn small_config() -> AbraConfig {
    AbraConfig {
        hidden: 32,
        embedding: 8,
        ..AbraConfig::default()
    }
}

fn options(seed: u64) -> TrainOptions {
    TrainOptions {
        epochs: 15,
        batch_size: 32,
        learning_rate: 3e-3,
        patience: 15,
        seed,
        validation_batches: Some(1),
        batch_column: "Metadata_Batch".into(),
        label_column: "Metadata_Compound".into(),
        ..TrainOptions::default()
    }
}

#[test]
fn gradients_match_finite_differences() {
    let device = Device::Cpu;
    let mut init = Initializer::new(3, &device);
    let config = AbraConfig {
        hidden: 5,
        embedding: 3,
        scale: 4.0,
        adversarial_steps: 0,
        ..AbraConfig::default()
    };
    let model = AbraModel::new(4, 3, config.clone(), &mut init).unwrap();
    let x = Tensor::from_vec(init.normal(6 * 4), (6, 4), &device).unwrap();
    let labels = Tensor::new(&[0u32, 1, 2, 0, 1, 2], &device).unwrap();
    let groups = [0u32, 0, 0, 1, 1, 1];
    let noise = init.normal(2 * 2 * config.hidden);
    let objective = || -> f64 {
        let (loss, _) = model.objective(&x, &labels, &groups, 2, &noise).unwrap();
        loss.to_scalar::<f32>().unwrap() as f64
    };
    let (loss, _) = model.objective(&x, &labels, &groups, 2, &noise).unwrap();
    let grads = loss.backward().unwrap();
    let mut checked = 0;
    for var in model.vars() {
        let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
        let analytic: Vec<f32> = analytic.to_vec1().unwrap();
        for i in [0, analytic.len() / 2, analytic.len() - 1] {
            let numeric = central_difference(&var, i, 1e-2, objective);
            let a = analytic[i] as f64;
            assert!(
                (a - numeric).abs() <= 2e-2 * a.abs().max(numeric.abs()) + 2e-3,
                "parameter {i}: backprop {a}, finite difference {numeric}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 21);
}

#[test]
fn training_learns_labels_across_unseen_batches() {
    let data = toy(4, 4, 12, 10, 1);
    let dir = tempfile::tempdir().unwrap();
    let mut epochs = Vec::new();
    let outcome = train_abra(
        &data,
        small_config(),
        &TrainOptions {
            epochs: 20,
            patience: 20,
            ..options(5)
        },
        dir.path(),
        &mut |e| epochs.push(e.clone()),
        &AtomicBool::new(false),
    )
    .unwrap();
    // The same score on the standardised raw features: the batch shifts hide the labels.
    let baseline = {
        let card = &outcome.card;
        let d = data.width();
        let mut x = data.x.clone();
        card.standardizer.apply(&mut x);
        let held_out = |i: &usize| card.split.validation.contains(&data.batches[*i]);
        let (validation, training): (Vec<usize>, Vec<usize>) = (0..data.rows()).partition(held_out);
        let unit_rows = |rows: &[usize]| -> Vec<f32> {
            rows.iter()
                .flat_map(|&r| {
                    let row = &x[r * d..(r + 1) * d];
                    let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                    row.iter().map(move |v| v / norm).collect::<Vec<_>>()
                })
                .collect()
        };
        let code = |i: &usize| {
            card.labels
                .iter()
                .position(|l| *l == data.labels[*i])
                .unwrap() as u32
        };
        nearest_neighbour_accuracy(
            &unit_rows(&validation),
            &validation.iter().map(code).collect::<Vec<_>>(),
            &unit_rows(&training),
            &training.iter().map(code).collect::<Vec<_>>(),
            d,
        )
    };
    assert_eq!(epochs.len(), 20);
    let (first, last) = (&epochs[0], epochs.last().unwrap());
    assert!(
        last.loss < 0.5 * first.loss,
        "loss {} -> {}",
        first.loss,
        last.loss
    );
    assert!(
        outcome.card.best_validation >= 0.7 && outcome.card.best_validation >= baseline + 0.3,
        "held-out batch accuracy {} (raw features: {baseline})",
        outcome.card.best_validation
    );
    assert_eq!(outcome.card.split.validation.len(), 1);
    assert_eq!(outcome.card.labels.len(), 4);
}

#[test]
fn a_saved_model_embeds_the_same_after_loading_and_training_is_deterministic() {
    let data = toy(3, 3, 8, 6, 2);
    let run = |threads: usize| {
        let dir = tempfile::tempdir().unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let options = TrainOptions {
            epochs: 3,
            ..options(9)
        };
        pool.install(|| {
            train_abra(
                &data,
                small_config(),
                &options,
                dir.path(),
                &mut |_| {},
                &AtomicBool::new(false),
            )
        })
        .unwrap();
        let weights = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        (dir, weights)
    };
    let (dir, one) = run(1);
    let (_other, two) = run(2);
    assert_eq!(one, two, "weights differ between 1 and 2 threads");

    let embedder = Embedder::load(dir.path()).unwrap();
    let a = embedder.embed(&data.x, None).unwrap();
    let b = Embedder::load(dir.path())
        .unwrap()
        .embed(&data.x, None)
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), data.rows() * 8);
    // Unit-length rows.
    for row in a.chunks(8) {
        let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
    }
    // A table with other features is a clear error.
    let e = embedder
        .match_features(&["f0".to_string(), "g".to_string()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("lacks 5 of the model's 6 features"), "{e}");
    let idx = embedder
        .match_features(&(0..6).rev().map(|j| format!("f{j}")).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(idx, vec![5, 4, 3, 2, 1, 0]);
}

#[test]
fn bad_training_input_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut one_batch = toy(3, 1, 4, 4, 3);
    let run = |p: &Profiles| {
        train_abra(
            p,
            small_config(),
            &options(0),
            dir.path(),
            &mut |_| {},
            &AtomicBool::new(false),
        )
        .unwrap_err()
        .to_string()
    };
    assert!(run(&one_batch).contains("at least two batches"));
    one_batch.x[5] = f32::INFINITY;
    assert!(run(&one_batch).contains("'f1'"));
    let mut one_label = toy(1, 3, 4, 4, 3);
    one_label.labels.iter_mut().for_each(|l| *l = "same".into());
    assert!(run(&one_label).contains("at least two"));
    assert!(!dir.path().join("model.safetensors").exists());
}
