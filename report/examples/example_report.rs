//! Renders a report from synthetic data.
//!
//! `cargo run -p balans-report --example example_report -- OUT.html [FIGURE.png]`

use balans_report::{
    EmbeddingPanel, Heatmap, MetricGroup, MetricRow, ReportInput, embedding_figure, render_html,
    write_html_atomic,
};

/// A small deterministic generator (xorshift64*), enough for example data.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        bits as f64 / (1u64 << 53) as f64 - 0.5
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let html_path = args
        .next()
        .ok_or("usage: example_report OUT.html [FIGURE.png]")?;
    let figure_path = args.next();

    let batch_names: Vec<String> = [
        "source_2 / plate A",
        "source_5 / plate B",
        "source_13 / plate C",
    ]
    .map(String::from)
    .to_vec();
    let label_names: Vec<String> = [
        "DMSO",
        "aloxistatin",
        "AMG900",
        "dexamethasone",
        "FK-866",
        "LY2109761",
        "NVS-PAK1-1",
        "quinidine",
        "TC-S-7004",
        "<b>escaped</b> & 'quoted'",
    ]
    .map(String::from)
    .to_vec();
    let per_cell = 40;
    let mut noise = Noise(0x5eed);
    let (mut batch, mut label) = (Vec::new(), Vec::new());
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for b in 0..batch_names.len() {
        for l in 0..label_names.len() {
            let angle = l as f64 / label_names.len() as f64 * std::f64::consts::TAU;
            for _ in 0..per_cell {
                batch.push(b as u32);
                label.push(l as u32);
                // Before: batches dominate; after: compounds dominate.
                before.push([
                    12.0 * b as f64 + 2.0 * angle.cos() + 1.5 * noise.next(),
                    3.0 * (b % 2) as f64 + 2.0 * angle.sin() + 1.5 * noise.next(),
                ]);
                after.push([
                    8.0 * angle.cos() + 0.6 * b as f64 + 1.2 * noise.next(),
                    8.0 * angle.sin() + 1.2 * noise.next(),
                ]);
            }
        }
    }
    let panel = |title: &str, coords: Vec<[f64; 2]>| EmbeddingPanel {
        title: title.to_string(),
        coords,
        batch: batch.clone(),
        batch_names: batch_names.clone(),
        label: label.clone(),
        label_names: label_names.clone(),
    };
    let panels = vec![
        panel("Before correction", before),
        panel("After BALANS", after),
    ];

    // Affinity heatmap: rows by batch, columns by label, block structure by label.
    let n = batch.len();
    let mut rows: Vec<usize> = (0..n).collect();
    rows.sort_by_key(|&i| (batch[i], label[i]));
    let mut cols: Vec<usize> = (0..n).collect();
    cols.sort_by_key(|&i| (label[i], batch[i]));
    let mut values = Vec::with_capacity(n * n);
    for &i in &rows {
        for &j in &cols {
            let same_label = label[i] == label[j];
            let same_batch = batch[i] == batch[j];
            let base = 0.05
                + 0.6 * f64::from(u8::from(same_label))
                + 0.15 * f64::from(u8::from(same_batch));
            values.push(if i == j {
                1.0
            } else {
                base + 0.05 * noise.next()
            });
        }
    }
    let groups = |names: &[String], count: usize| -> Vec<(String, usize)> {
        names.iter().map(|name| (name.clone(), count)).collect()
    };
    let heatmap = Heatmap {
        title: "Batch-dependent affinities (after BALANS)".into(),
        values,
        n_rows: n,
        n_cols: n,
        row_label: "batch".into(),
        col_label: "compound".into(),
        row_groups: groups(&batch_names, label_names.len() * per_cell),
        col_groups: groups(&label_names, batch_names.len() * per_cell),
    };

    let metric = |name: &str, group, before: f64, after: Option<f64>| MetricRow {
        name: name.to_string(),
        group,
        values: vec![Some(before), after],
        higher_is_better: true,
    };
    let input = ReportInput {
        title: "BALANS evaluation: JUMP positive controls".into(),
        subtitle: "3 sources, 10 compounds, 1,200 profiles; k = 25 neighbours, cosine".into(),
        columns: vec!["before".into(), "after BALANS".into()],
        metrics: vec![
            metric("iLISI", MetricGroup::Batch, 0.071, Some(0.412)),
            metric("kBET acceptance", MetricGroup::Batch, 0.032, Some(0.287)),
            metric("graph connectivity", MetricGroup::Batch, 0.612, Some(0.934)),
            metric("silhouette batch", MetricGroup::Batch, 0.801, Some(0.902)),
            metric("NMI (Leiden)", MetricGroup::Bio, 0.402, Some(0.731)),
            metric("ARI (Leiden)", MetricGroup::Bio, 0.221, Some(0.584)),
            metric("silhouette label", MetricGroup::Bio, 0.473, Some(0.611)),
            metric("mAP (non-replicate)", MetricGroup::Bio, 0.118, None),
            metric(
                "overall (0.4 batch + 0.6 bio)",
                MetricGroup::Aggregate,
                0.337,
                Some(0.601),
            ),
        ],
        panels,
        heatmaps: vec![heatmap],
        notes: vec![
            "Synthetic example data.".into(),
            "mAP after correction was not computed in this example.".into(),
        ],
    };
    let html = render_html(&input)?;
    write_html_atomic(std::path::Path::new(&html_path), &html)?;
    println!("wrote {html_path} ({} bytes)", html.len());
    if let Some(figure_path) = figure_path {
        std::fs::write(&figure_path, embedding_figure(&input.panels[0])?.png)?;
        println!("wrote {figure_path}");
    }
    Ok(())
}
