//! Shared value types: neighbour lists and sparse graphs.

/// Distance used between embedding rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Distance {
    /// `1 - x.y / (|x| |y|)`.
    Cosine,
    /// `|x - y|`.
    Euclidean,
}

/// The `k` nearest neighbours of each of `n` rows, row-major, ascending distance, ties by index.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbors {
    /// Number of query rows.
    pub n: usize,
    /// Neighbours per row.
    pub k: usize,
    /// `n * k` neighbour indices.
    pub indices: Vec<u32>,
    /// `n * k` distances, matching `indices`.
    pub distances: Vec<f64>,
}

impl Neighbors {
    /// Neighbour indices of row `i`.
    pub fn indices_of(&self, i: usize) -> &[u32] {
        &self.indices[i * self.k..(i + 1) * self.k]
    }

    /// Neighbour distances of row `i`.
    pub fn distances_of(&self, i: usize) -> &[f64] {
        &self.distances[i * self.k..(i + 1) * self.k]
    }
}

/// A weighted sparse graph in compressed sparse row form (column indices sorted per row).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CsrGraph {
    /// Number of nodes.
    pub n: usize,
    /// Row offsets, `n + 1` entries.
    pub indptr: Vec<usize>,
    /// Column index of each stored entry.
    pub indices: Vec<u32>,
    /// Weight of each stored entry.
    pub weights: Vec<f64>,
}

impl CsrGraph {
    /// Columns and weights of row `i`.
    pub fn row(&self, i: usize) -> (&[u32], &[f64]) {
        let range = self.indptr[i]..self.indptr[i + 1];
        (&self.indices[range.clone()], &self.weights[range])
    }

    /// Number of stored entries.
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }
}

/// Dense integer codes `0..n_categories` for a categorical column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Codes {
    /// Code of each row.
    pub codes: Vec<u32>,
    /// Name of each code, in code order.
    pub names: Vec<String>,
}

impl Codes {
    /// Encodes values with codes in sorted name order, so codes do not depend on row order.
    pub fn from_strings<S: AsRef<str>>(values: &[S]) -> Self {
        let mut names: Vec<String> = values.iter().map(|v| v.as_ref().to_string()).collect();
        names.sort();
        names.dedup();
        let codes = values
            .iter()
            .map(|v| {
                names
                    .binary_search_by(|n| n.as_str().cmp(v.as_ref()))
                    .unwrap() as u32
            })
            .collect();
        Self { codes, names }
    }

    /// Number of distinct categories.
    pub fn n_categories(&self) -> usize {
        self.names.len()
    }

    /// The codes of `rows`, renumbered densely over the categories present among them (in
    /// the existing code order, so still sorted by name).
    pub fn subset(&self, rows: &[usize]) -> Self {
        let mut present = vec![false; self.n_categories()];
        for &r in rows {
            present[self.codes[r] as usize] = true;
        }
        let mut new_code = vec![u32::MAX; present.len()];
        let mut names = Vec::new();
        for (old, _) in present.iter().enumerate().filter(|(_, p)| **p) {
            new_code[old] = names.len() as u32;
            names.push(self.names[old].clone());
        }
        Self {
            codes: rows
                .iter()
                .map(|&r| new_code[self.codes[r] as usize])
                .collect(),
            names,
        }
    }
}

/// The rows `rows` of the row-major `x` (`d` columns), in that order, as a new matrix.
pub fn gather_rows(x: &[f64], d: usize, rows: &[usize]) -> Vec<f64> {
    let mut out = Vec::with_capacity(rows.len() * d);
    for &r in rows {
        out.extend_from_slice(&x[r * d..(r + 1) * d]);
    }
    out
}
