//! Squared Euclidean distances between a query row and the rows of a row-major matrix.
//!
//! Differences are formed in `f64` and accumulated in `f64` in feature order, so the value for
//! a pair is bitwise the same wherever it is computed (sampling loop or smoothing passes).

use rayon::prelude::*;

/// Rows per parallel task; fixed so results do not depend on the thread count.
const PAR_ROWS: usize = 16 * 1024;

/// Squared Euclidean distance of two rows, accumulated in `f64` in index order.
///
/// On x86-64 CPUs with AVX2 the same arithmetic runs in 256-bit registers (the four
/// accumulators become one register; no fused multiply-add), so the result has the same bits
/// with or without AVX2.
#[inline]
pub fn sq_dist(a: &[f32], b: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 is available (checked above).
        return unsafe { sq_dist_avx2(a, b) };
    }
    sq_dist_body(a, b)
}

/// Whether the CPU has AVX2 (cached by the standard library).
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sq_dist_avx2(a: &[f32], b: &[f32]) -> f64 {
    sq_dist_body(a, b)
}

#[inline(always)]
fn sq_dist_body(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    // Four independent accumulators let the compiler vectorise; the grouping is fixed, so the
    // result is deterministic.
    let mut acc = [0.0f64; 4];
    let chunks = a.len() / 4;
    for c in 0..chunks {
        for l in 0..4 {
            let t = a[4 * c + l] as f64 - b[4 * c + l] as f64;
            acc[l] += t * t;
        }
    }
    let mut tail = 0.0;
    for i in 4 * chunks..a.len() {
        let t = a[i] as f64 - b[i] as f64;
        tail += t * t;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// `out[j] = sq_dist(query, row j)` for the rows of one block: four rows at a time, each with
/// exactly the arithmetic of [`sq_dist`] (the rows' independent sums overlap in the pipeline).
#[inline(always)]
fn distances_body(query: &[f32], pts: &[f32], p: usize, out: &mut [f64]) {
    const R: usize = 4;
    // The query converted once (the same values `sq_dist` converts per element).
    let q: Vec<f64> = query.iter().map(|&v| v as f64).collect();
    let chunks = p / 4;
    let mut blocks = out.chunks_exact_mut(R).zip(pts.chunks_exact(R * p));
    for (o, rows) in &mut blocks {
        let mut acc = [[0.0f64; 4]; R];
        for c in 0..chunks {
            for (k, a) in acc.iter_mut().enumerate() {
                let row = &rows[k * p..(k + 1) * p];
                for l in 0..4 {
                    let t = q[4 * c + l] - row[4 * c + l] as f64;
                    a[l] += t * t;
                }
            }
        }
        for (k, (dst, a)) in o.iter_mut().zip(&acc).enumerate() {
            let row = &rows[k * p..(k + 1) * p];
            let mut tail = 0.0;
            for i in 4 * chunks..p {
                let t = q[i] - row[i] as f64;
                tail += t * t;
            }
            *dst = (a[0] + a[1]) + (a[2] + a[3]) + tail;
        }
    }
    let done = out.len() / R * R;
    for (dst, row) in out[done..].iter_mut().zip(pts[done * p..].chunks_exact(p)) {
        *dst = sq_dist_body(query, row);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn distances_avx2(query: &[f32], pts: &[f32], p: usize, out: &mut [f64]) {
    distances_body(query, pts, p, out)
}

/// Writes `out[j] = ||query - points[j]||^2` for the `n = points.len() / p` rows of `points`.
pub fn sq_distances_to(query: &[f32], points: &[f32], p: usize, out: &mut [f64]) {
    assert_eq!(query.len(), p);
    assert_eq!(points.len(), out.len() * p);
    out.par_chunks_mut(PAR_ROWS)
        .zip(points.par_chunks(PAR_ROWS * p))
        .for_each(|(o, pts)| {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: AVX2 is available (checked above).
                unsafe { distances_avx2(query, pts, p, o) };
                return;
            }
            distances_body(query, pts, p, o)
        });
}

/// Scales every row of a row-major matrix to unit L2 norm (rows of norm 0 are left as they are).
pub fn l2_normalize_rows(points: &mut [f32], p: usize) {
    points.par_chunks_mut(p * 1024).for_each(|block| {
        for row in block.chunks_exact_mut(p) {
            let norm = row
                .iter()
                .map(|&v| (v as f64) * (v as f64))
                .sum::<f64>()
                .sqrt();
            if norm > 0.0 {
                for v in row.iter_mut() {
                    *v = (*v as f64 / norm) as f32;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn matches_brute_force() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for &(n, p) in &[(1, 1), (7, 3), (100, 13), (40_000, 5)] {
            let x: Vec<f32> = (0..n * p)
                .map(|_| rng.random::<f32>() * 4.0 - 2.0)
                .collect();
            let q: Vec<f32> = (0..p).map(|_| rng.random::<f32>()).collect();
            let mut out = vec![0.0; n];
            sq_distances_to(&q, &x, p, &mut out);
            for j in 0..n {
                let want: f64 = (0..p)
                    .map(|f| (q[f] as f64 - x[j * p + f] as f64).powi(2))
                    .sum();
                assert!((out[j] - want).abs() <= 1e-12 * want.max(1.0), "row {j}");
                assert_eq!(out[j], sq_dist(&q, &x[j * p..(j + 1) * p]));
                // The AVX2 path (where the CPU has it) computes the same bits as the plain one.
                assert_eq!(
                    out[j].to_bits(),
                    sq_dist_body(&q, &x[j * p..(j + 1) * p]).to_bits()
                );
            }
        }
    }

    #[test]
    fn normalises_rows() {
        let mut x = vec![3.0f32, 4.0, 0.0, 0.0, 1.0, 0.0];
        l2_normalize_rows(&mut x, 2);
        assert_eq!(x, vec![0.6, 0.8, 0.0, 0.0, 1.0, 0.0]);
    }
}
