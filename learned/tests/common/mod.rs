//! Helpers shared by the model tests.

use candle_core::{Tensor, Var};

/// `(f(θ + h·eᵢ) − f(θ − h·eᵢ)) / 2h` for entry `i` of `var`, which is restored afterwards.
pub fn central_difference(var: &Var, i: usize, h: f32, objective: impl Fn() -> f64) -> f64 {
    let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let shape = var.as_tensor().shape().clone();
    let device = var.as_tensor().device().clone();
    let at = |delta: f32| {
        let mut v = base.clone();
        v[i] += delta;
        var.set(&Tensor::from_vec(v, shape.clone(), &device).unwrap())
            .unwrap();
        objective()
    };
    let numeric = (at(h) - at(-h)) / (2.0 * h as f64);
    var.set(&Tensor::from_vec(base.clone(), shape.clone(), &device).unwrap())
        .unwrap();
    numeric
}
