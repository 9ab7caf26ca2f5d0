//! `balans train`: train a learned batch-robust embedding (ABRA or CellPainTR); its options
//! are documented in `balans train --help`.

use std::path::PathBuf;
use std::time::Instant;

use balans_engine::Result;
use balans_engine::progress::peak_rss_bytes;
use balans_engine::session::build_session;
use clap::{Args, ValueEnum};

use crate::args::{InputArgs, SessionArgs};

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    input: InputArgs,
    /// The model to train.
    #[arg(long, value_enum, default_value = "abra")]
    model: ModelArg,
    /// Batch column: validation holds out whole batches.
    #[arg(long, short)]
    batch: String,
    /// Label column the classifier learns (perturbation, compound or MoA).
    #[arg(long)]
    label: String,
    /// Model directory to write (model.safetensors + config.json).
    #[arg(long, short)]
    output: PathBuf,
    /// Largest number of epochs.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Rows per mini-batch.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Stop after this many epochs without a better validation score.
    #[arg(long, default_value_t = 5)]
    patience: usize,
    /// Batches held out for validation [default: a fifth, at least one].
    #[arg(long)]
    validation_batches: Option<usize>,
    /// Seed of initialisation, the validation split and sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Hidden width.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Embedding width.
    #[arg(long, default_value_t = 64)]
    embedding: usize,
    /// ArcFace scale s.
    #[arg(long, default_value_t = 16.0)]
    scale: f64,
    /// ArcFace additive angular margin (radians).
    #[arg(long, default_value_t = 0.3)]
    margin: f64,
    /// Weight of the clean/perturbed alignment term.
    #[arg(long, default_value_t = 1.0)]
    alignment_weight: f64,
    /// Bound of the batch-statistics perturbation coefficients (0 turns it off).
    #[arg(long, default_value_t = 2.0)]
    perturbation_bound: f64,
    /// Gradient-ascent steps that choose the perturbation.
    #[arg(long, default_value_t = 2)]
    adversarial_steps: usize,
    /// CellPainTR token width (the reference model uses 256).
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    /// CellPainTR residual blocks (the reference model uses 4).
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// CellPainTR MLP width [default: 4 x --d-model].
    #[arg(long)]
    mlp: Option<usize>,
    /// CellPainTR SupCon temperature.
    #[arg(long, default_value_t = 0.07)]
    temperature: f64,
    /// Where to train: cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: balans_learned::ComputeDevice,
    #[command(flatten)]
    session: SessionArgs,
    /// Replace an existing model directory.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum ModelArg {
    /// ABRA: MLP encoder, adversarial batch-statistics perturbation, ArcFace, alignment.
    Abra,
    /// CellPainTR: feature-token Hyena transformer with a source token; masked, then
    /// intra-source and inter-source supervised contrastive training (--epochs per stage).
    Cellpaintr,
}

pub async fn run(a: TrainArgs, quiet: bool) -> Result<()> {
    use balans_engine::train::{ModelSpec, TrainRequest, run_train};
    let started = Instant::now();
    let ctx = build_session(&a.session.settings()?)?;
    let model = match a.model {
        ModelArg::Abra => ModelSpec::Abra(balans_learned::AbraConfig {
            hidden: a.hidden,
            embedding: a.embedding,
            scale: a.scale,
            margin: a.margin,
            alignment_weight: a.alignment_weight,
            perturbation_bound: a.perturbation_bound,
            adversarial_steps: a.adversarial_steps,
            ..balans_learned::AbraConfig::default()
        }),
        ModelArg::Cellpaintr => ModelSpec::CellPainTr(balans_learned::CellPainTrConfig {
            d_model: a.d_model,
            layers: a.layers,
            mlp: a.mlp.unwrap_or(4 * a.d_model),
            temperature: a.temperature,
            ..balans_learned::CellPainTrConfig::default()
        }),
    };
    let request = TrainRequest {
        input: a.input.input.clone(),
        output: a.output.clone(),
        batch: a.batch.clone(),
        label: a.label.clone(),
        selection: a.input.select.selection(),
        source: a.input.select.source(),
        model,
        options: balans_learned::TrainOptions {
            epochs: a.epochs,
            batch_size: a.batch_size,
            learning_rate: a.lr,
            weight_decay: a.weight_decay,
            patience: a.patience,
            seed: a.seed,
            validation_batches: a.validation_batches,
            batch_column: a.batch.clone(),
            label_column: a.label.clone(),
            device: a.device,
            ..balans_learned::TrainOptions::default()
        },
        overwrite: a.overwrite,
    };
    // Epochs are numbered on through the stages (CellPainTR has three).
    let epochs = a.epochs
        * match a.model {
            ModelArg::Abra => 1,
            ModelArg::Cellpaintr => 3,
        };
    let best = std::sync::Arc::new(std::sync::Mutex::new(f64::NEG_INFINITY));
    let best_seen = best.clone();
    let progress = Box::new(move |e: &balans_learned::EpochRecord| {
        let mut best = best_seen.lock().expect("best");
        let marker = if e.validation > *best {
            *best = e.validation;
            "  *"
        } else {
            ""
        };
        if !quiet {
            let parts: Vec<String> = e.parts.iter().map(|p| format!("{p:.3}")).collect();
            eprintln!(
                "balans train: {} epoch {:>3}/{epochs}  loss {:.4} ({})  validation {:.4}  {:.1} s{marker}",
                e.stage,
                e.epoch,
                e.loss,
                parts.join(" / "),
                e.validation,
                e.seconds
            );
        }
    });
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outcome = run_train(&ctx, &request, progress, cancel).await?;
    let card = &outcome.card;
    eprintln!(
        "balans: wrote {} ({} features -> {} dims, {} labels); best epoch {} of {}{} with \
         {} {:.4} on held-out batches [{}]",
        a.output.display(),
        card.features.len(),
        card.architecture.embedding(),
        card.labels.len(),
        card.best_epoch,
        card.history.len(),
        if outcome.stopped_early {
            " (stopped early)"
        } else {
            ""
        },
        card.validation_metric,
        card.best_validation,
        card.split.validation.join(", ")
    );
    eprintln!(
        "balans: trained in {:.1} s{}",
        started.elapsed().as_secs_f64(),
        peak_rss_bytes()
            .map(|p| format!(
                ", peak memory (RSS) {:.1} MiB",
                p as f64 / (1024.0 * 1024.0)
            ))
            .unwrap_or_default()
    );
    Ok(())
}
