//! CellPainTR on small problems: token shapes, the masking rule, the long convolution against
//! a direct sum, gradients against finite differences, training that learns, save/load and
//! the unknown-source fallback.

mod common;

use std::sync::atomic::AtomicBool;

use balans_learned::cellpaintr::{CellPainTrConfig, CellPainTrModel, draw_mask};
use balans_learned::fftconv::{long_convolution, toeplitz_convolution};
use balans_learned::init::Initializer;
use balans_learned::{Embedder, Profiles, TrainOptions, train_cellpaintr};
use candle_core::{Device, Tensor};
use common::central_difference;
use rand::SeedableRng;

fn tiny() -> CellPainTrConfig {
    CellPainTrConfig {
        d_model: 8,
        layers: 1,
        mlp: 16,
        filter_hidden: 8,
        sources: vec!["a".into(), "b".into()],
        ..CellPainTrConfig::default()
    }
}

#[test]
fn embeddings_have_the_model_width_and_unit_length() {
    let mut init = Initializer::new(1, &Device::Cpu);
    let model = CellPainTrModel::new(5, tiny(), &mut init).unwrap();
    let x = Tensor::from_vec(init.normal(3 * 5), (3, 5), &Device::Cpu).unwrap();
    let sources = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
    let e = model.embed(&x, &sources).unwrap();
    assert_eq!(e.dims(), &[3, 8]);
    for row in e.to_vec2::<f32>().unwrap() {
        let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
    }
    // Source 2 is the unknown-source token; a source index past it is an error.
    let bad = Tensor::new(&[3u32, 0, 0], &Device::Cpu).unwrap();
    assert!(model.embed(&x, &bad).is_err());
}

#[test]
fn masking_never_hides_zeros_and_follows_the_rate() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let raw: Vec<f32> = (0..20_000)
        .map(|i| if i % 4 == 0 { 0.0 } else { 1.0 })
        .collect();
    let mask = draw_mask(&raw, 0.3, &mut rng);
    assert!(raw.iter().zip(&mask).all(|(v, m)| *v != 0.0 || *m == 0.0));
    let hidden = mask.iter().sum::<f32>() / 15_000.0;
    assert!((hidden - 0.3).abs() < 0.02, "{hidden}");
}

#[test]
fn the_fft_long_convolution_is_the_direct_sum() {
    let device = Device::Cpu;
    let mut init = Initializer::new(2, &device);
    let (b, t, d) = (2, 5, 3);
    let v = init.normal(b * t * d);
    let h = init.normal((2 * t - 1) * d);
    let vt = Tensor::from_vec(v.clone(), (b, t, d), &device).unwrap();
    let ht = Tensor::from_vec(h.clone(), (2 * t - 1, d), &device).unwrap();
    let direct = toeplitz_convolution(&vt, &ht)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let y = long_convolution(&vt, &ht)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (a, b) in y.iter().zip(&direct) {
        assert!((a - b).abs() < 1e-5, "fft {a} vs Toeplitz {b}");
    }
    for bi in 0..b {
        for ti in 0..t {
            for c in 0..d {
                let mut sum = 0f64;
                for s in 0..t {
                    let offset = ti as isize - s as isize + (t as isize - 1);
                    sum += h[offset as usize * d + c] as f64 * v[(bi * t + s) * d + c] as f64;
                }
                let got = y[(bi * t + ti) * d + c] as f64;
                assert!((got - sum).abs() < 1e-5, "{got} vs {sum}");
            }
        }
    }
}

#[test]
fn the_fft_convolution_has_the_gradients_of_the_direct_one() {
    let device = Device::Cpu;
    let mut init = Initializer::new(8, &device);
    let (b, t, d) = (3, 7, 4);
    let v = candle_core::Var::from_tensor(
        &Tensor::from_vec(init.normal(b * t * d), (b, t, d), &device).unwrap(),
    )
    .unwrap();
    let h = candle_core::Var::from_tensor(
        &Tensor::from_vec(init.normal((2 * t - 1) * d), (2 * t - 1, d), &device).unwrap(),
    )
    .unwrap();
    let weights = Tensor::from_vec(init.normal(b * t * d), (b, t, d), &device).unwrap();
    let grads = |y: Tensor| {
        let g = (y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let flat = |x: &candle_core::Var| -> Vec<f32> {
            g.get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        (flat(&v), flat(&h))
    };
    let (fv, fh) = grads(long_convolution(v.as_tensor(), h.as_tensor()).unwrap());
    let (dv, dh) = grads(toeplitz_convolution(v.as_tensor(), h.as_tensor()).unwrap());
    for (a, b) in fv.iter().zip(&dv).chain(fh.iter().zip(&dh)) {
        assert!((a - b).abs() < 1e-4, "fft {a} vs Toeplitz {b}");
    }
}

#[test]
fn gradients_match_finite_differences() {
    let device = Device::Cpu;
    let mut init = Initializer::new(5, &device);
    let model = CellPainTrModel::new(4, tiny(), &mut init).unwrap();
    let x = Tensor::from_vec(init.normal(4 * 4), (4, 4), &device).unwrap();
    let mask = Tensor::from_vec(
        vec![
            1f32, 0., 0., 1., 0., 1., 0., 0., 0., 0., 1., 0., 1., 0., 0., 1.,
        ],
        (4, 4),
        &device,
    )
    .unwrap();
    let sources = Tensor::new(&[0u32, 1, 2, 0], &device).unwrap();
    let labels = [0u32, 0, 1, 1];
    let objective = || -> f64 {
        let (loss, _) = model.objective(&x, &mask, &sources, Some(&labels)).unwrap();
        loss.to_scalar::<f32>().unwrap() as f64
    };
    let (loss, _) = model.objective(&x, &mask, &sources, Some(&labels)).unwrap();
    let grads = loss.backward().unwrap();
    let mut checked = 0;
    for var in model.vars() {
        let Some(g) = grads.get(var.as_tensor()) else {
            continue;
        };
        let analytic: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let i = analytic
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap()
            .0;
        let numeric = central_difference(&var, i, 1e-2, objective);
        let a = analytic[i] as f64;
        assert!(
            (a - numeric).abs() <= 5e-2 * a.abs().max(numeric.abs()) + 5e-3,
            "largest gradient entry {i}: backprop {a}, finite difference {numeric}"
        );
        checked += 1;
    }
    assert!(checked >= 20, "{checked}");
}

fn toy(seed: u64) -> Profiles {
    let mut init = Initializer::new(seed, &Device::Cpu);
    let (labels, batches, per, d) = (3, 4, 8, 6);
    let signal = init.normal(labels * d);
    let shift = init.normal(batches * d);
    let mut p = Profiles {
        x: Vec::new(),
        features: (0..d).map(|j| format!("f{j}")).collect(),
        batches: Vec::new(),
        labels: Vec::new(),
    };
    for b in 0..batches {
        for l in 0..labels {
            for _ in 0..per {
                let noise = init.normal(d);
                for j in 0..d {
                    p.x.push(2.0 * signal[l * d + j] + 2.0 * shift[b * d + j] + 0.3 * noise[j]);
                }
                p.batches.push(format!("batch{b}"));
                p.labels.push(format!("compound{l}"));
            }
        }
    }
    p
}

#[test]
fn three_stage_training_learns_and_round_trips() {
    let data = toy(3);
    let dir = tempfile::tempdir().unwrap();
    let mut epochs = Vec::new();
    let options = TrainOptions {
        epochs: 10,
        batch_size: 16,
        learning_rate: 1e-3,
        patience: 10,
        seed: 1,
        validation_batches: Some(1),
        batch_column: "Metadata_Batch".into(),
        label_column: "Metadata_Compound".into(),
        ..TrainOptions::default()
    };
    let config = CellPainTrConfig {
        d_model: 16,
        layers: 1,
        mlp: 32,
        filter_hidden: 16,
        ..CellPainTrConfig::default()
    };
    let outcome = train_cellpaintr(
        &data,
        config,
        &options,
        dir.path(),
        &mut |e| epochs.push(e.clone()),
        &AtomicBool::new(false),
    )
    .unwrap();
    let stages: Vec<&str> = epochs.iter().map(|e| e.stage.as_str()).collect();
    assert_eq!(&stages[..10], &["masked"; 10]);
    assert_eq!(&stages[10..20], &["intra-source"; 10]);
    assert_eq!(&stages[20..], &["inter-source"; 10]);
    // The masked-value error falls during stage 1, and SupCon falls in stage 3 (the mean of
    // its last three epochs against its first).
    let tail = |k: usize| epochs[27..30].iter().map(|e| e.parts[k]).sum::<f64>() / 3.0;
    assert!(epochs[9].parts[0] < epochs[0].parts[0], "{epochs:?}");
    assert!(tail(1) < epochs[20].parts[1], "{epochs:?}");
    // Three labels: chance is 1/3.
    assert!(
        outcome.card.best_validation >= 0.6,
        "{}",
        outcome.card.best_validation
    );

    let model = Embedder::load(dir.path()).unwrap();
    assert!(model.uses_sources());
    let a = model.embed(&data.x, Some(&data.batches)).unwrap();
    let b = Embedder::load(dir.path())
        .unwrap()
        .embed(&data.x, Some(&data.batches))
        .unwrap();
    assert_eq!(a, b);
    // The held-out batch is an unseen source: it gets the unknown-source token, as does
    // a name never seen and no source at all.
    let held_out = &outcome.card.split.validation[0];
    let rows = 2 * 6;
    let x = &data.x[..rows];
    let unseen = model
        .embed(x, Some(&[held_out.clone(), held_out.clone()]))
        .unwrap();
    let never = model
        .embed(x, Some(&["no such source".into(), "other".into()]))
        .unwrap();
    let none = model.embed(x, None).unwrap();
    assert_eq!(unseen, never);
    assert_eq!(unseen, none);
}

#[test]
fn training_gives_the_same_weights_whatever_the_thread_count() {
    let data = toy(4);
    let run = |threads: usize| {
        let dir = tempfile::tempdir().unwrap();
        let options = TrainOptions {
            epochs: 2,
            batch_size: 16,
            seed: 2,
            validation_batches: Some(1),
            ..TrainOptions::default()
        };
        // Training sets the sources from the batches.
        let config = tiny();
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                train_cellpaintr(
                    &data,
                    config,
                    &options,
                    dir.path(),
                    &mut |_| {},
                    &AtomicBool::new(false),
                )
            })
            .unwrap();
        std::fs::read(dir.path().join("model.safetensors")).unwrap()
    };
    assert_eq!(run(1), run(3));
}
