//! Correction parameters by name, as text: the one parser behind `balans tune --grid` and the
//! SQL table functions (`balans((...), k => 10)`).

use balans_operators::config::{Metric, PcaSetting};
use balans_operators::{
    Anchor, BalansConfig, ElbowRule, Estimator, Method, NanPolicy, OutputSpace, SpheringMethod,
    Variant,
};

use crate::error::{PlannerError, Result};

/// Every parameter name [`set_parameter`] accepts (`-` and `_` are interchangeable).
pub const PARAMETERS: &str = "method, variant, k, iterations, strength, batch-knn-floor, tau, \
     block, pca, elbow, metric, estimator, output-space, seed, max-landmarks, sample-rows, nan, \
     sphering, epsilon, clusters, theta, sigma, harmony-iterations, anchor";

/// Parses a `--pca` value: `auto`, `off` (or `none`, `0`) or a component count.
pub fn pca_setting(text: &str) -> Result<PcaSetting> {
    Ok(match text {
        "auto" => PcaSetting::Auto,
        "off" | "none" | "0" => PcaSetting::Off,
        n => PcaSetting::Components(n.parse().map_err(|_| {
            PlannerError::InvalidArgument(format!("pca takes auto, off or a number, not '{n}'"))
        })?),
    })
}

/// Sets parameter `name` of `config` from `value`. `variant` first resets every BALANS
/// parameter to that variant's defaults (keeping the method and seed), so give it before
/// the others.
pub fn set_parameter(config: &mut BalansConfig, name: &str, value: &str) -> Result<()> {
    let key = name.trim().to_ascii_lowercase().replace('_', "-");
    let text = value.trim();
    let word = text.to_ascii_lowercase().replace('_', "-");
    let bad = |expected: &str| {
        PlannerError::InvalidArgument(format!("{name} => '{value}': expected {expected}"))
    };
    let count = || text.parse::<usize>().map_err(|_| bad("a whole number"));
    let real = || text.parse::<f64>().map_err(|_| bad("a number"));
    match key.as_str() {
        "method" => {
            config.method = match word.as_str() {
                "balans" => Method::Balans,
                "combat" => Method::ComBat,
                "sphering" => Method::Sphering,
                "harmony" => Method::Harmony,
                _ => return Err(bad("balans, combat, sphering or harmony")),
            }
        }
        "variant" => {
            let variant = match word.as_str() {
                "residual" => Variant::Residual,
                "balanced" => Variant::Balanced,
                "paper" => Variant::Paper,
                _ => return Err(bad("residual, balanced or paper")),
            };
            *config = BalansConfig {
                method: config.method,
                seed: config.seed,
                anchor: config.anchor,
                ..BalansConfig::for_variant(variant)
            };
        }
        "k" => config.k = count()?,
        "iterations" => config.iterations = count()?,
        "strength" => config.strength = real()?,
        "batch-knn-floor" => {
            config.batch_knn_floor = match word.as_str() {
                "true" => true,
                "false" => false,
                _ => return Err(bad("true or false")),
            }
        }
        "tau" => config.tau = count()?,
        "block" => config.block = count()?,
        "pca" => config.pca = pca_setting(&word)?,
        "elbow" => {
            config.elbow = match word.as_str() {
                "kneedle" => ElbowRule::Kneedle,
                "kneedle-sorted" => ElbowRule::KneedleSorted,
                "max-gap" => ElbowRule::MaxGap,
                "max-log-gap" => ElbowRule::MaxLogGap,
                _ => return Err(bad("kneedle, kneedle-sorted, max-gap or max-log-gap")),
            }
        }
        "metric" => {
            config.metric = match word.as_str() {
                "euclidean" => Metric::Euclidean,
                "cosine" => Metric::Cosine,
                _ => return Err(bad("euclidean or cosine")),
            }
        }
        "estimator" => {
            config.estimator = match word.as_str() {
                "smooth" => Estimator::Smooth,
                "nystrom" => Estimator::Nystrom,
                _ => return Err(bad("smooth or nystrom")),
            }
        }
        "output-space" => {
            config.output_space = match word.as_str() {
                "features" => OutputSpace::Features,
                "pca" => OutputSpace::Pca,
                _ => return Err(bad("features or pca")),
            }
        }
        "seed" => config.seed = text.parse().map_err(|_| bad("a whole number"))?,
        "max-landmarks" => config.max_landmarks = Some(count()?),
        "anchor" => {
            config.anchor = match word.as_str() {
                "none" => Anchor::None,
                "negcon" => Anchor::Negcon,
                "label" => Anchor::Label,
                "both" => Anchor::Both,
                _ => return Err(bad("none, negcon, label or both")),
            }
        }
        "sample-rows" => {
            config.sample_rows = match word.as_str() {
                "all" => None,
                _ => Some(count()?),
            }
        }
        "nan" => {
            config.nan = match word.as_str() {
                "error" => NanPolicy::Error,
                "drop-rows" => NanPolicy::DropRows,
                "zero" => NanPolicy::Zero,
                _ => return Err(bad("error, drop-rows or zero")),
            }
        }
        "sphering" => {
            config.sphering = match word.as_str() {
                "zca" => SpheringMethod::Zca,
                "zca-cor" => SpheringMethod::ZcaCor,
                _ => return Err(bad("zca or zca-cor")),
            }
        }
        "epsilon" => config.epsilon = real()?,
        "clusters" => config.harmony.clusters = Some(count()?),
        "theta" => config.harmony.theta = real()?,
        "sigma" => config.harmony.sigma = real()?,
        "harmony-iterations" => config.harmony.max_iterations = count()?,
        _ => {
            return Err(PlannerError::InvalidArgument(format!(
                "unknown parameter '{name}' (one of: {PARAMETERS})"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_every_kind_of_parameter() {
        let mut c = BalansConfig::default();
        set_parameter(&mut c, "seed", "7").unwrap();
        set_parameter(&mut c, "variant", "paper").unwrap();
        assert_eq!((c.variant, c.k, c.seed), (Variant::Paper, 10, 7));
        set_parameter(&mut c, "K", "12").unwrap();
        set_parameter(&mut c, "batch_knn_floor", "true").unwrap();
        set_parameter(&mut c, "pca", "20").unwrap();
        set_parameter(&mut c, "elbow", "max_gap").unwrap();
        set_parameter(&mut c, "method", "Harmony").unwrap();
        set_parameter(&mut c, "clusters", "5").unwrap();
        set_parameter(&mut c, "sphering", "zca").unwrap();
        assert_eq!(c.k, 12);
        assert!(c.batch_knn_floor);
        assert_eq!(c.pca, PcaSetting::Components(20));
        assert_eq!(c.elbow, ElbowRule::MaxGap);
        assert_eq!(c.method, Method::Harmony);
        assert_eq!(c.harmony.clusters, Some(5));
        assert_eq!(c.sphering, SpheringMethod::Zca);
        for (name, value) in [("k", "ten"), ("variant", "best"), ("colour", "red")] {
            let err = set_parameter(&mut c, name, value).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
    }
}
