//! Tests of the HTML report: embedded PNGs, escaping, determinism, input errors, atomic writes.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use balans_report::{
    EMBEDDING_FIGURE_SIZE, EmbeddingPanel, HEATMAP_FIGURE_SIZE, Heatmap, METRICS_FIGURE_WIDTH,
    MetricGroup, MetricRow, ReportError, ReportInput, metrics_figure_height, render_html,
    write_html_atomic,
};

fn panel(title: &str, n_labels: usize) -> EmbeddingPanel {
    let n = 300;
    EmbeddingPanel {
        title: title.to_string(),
        coords: (0..n)
            .map(|i| {
                let t = i as f64 * 0.37;
                [
                    t.cos() * (1.0 + (i % 7) as f64),
                    t.sin() * (1.0 + (i % 5) as f64),
                ]
            })
            .collect(),
        batch: (0..n).map(|i| (i % 3) as u32).collect(),
        batch_names: vec!["b0".into(), "b1".into(), "b2".into()],
        label: (0..n).map(|i| (i % n_labels) as u32).collect(),
        label_names: (0..n_labels).map(|l| format!("compound {l}")).collect(),
    }
}

fn heatmap() -> Heatmap {
    let (n_rows, n_cols) = (12, 9);
    Heatmap {
        title: "affinities".into(),
        values: (0..n_rows * n_cols).map(|i| (i % 7) as f64 / 7.0).collect(),
        n_rows,
        n_cols,
        row_label: "batch".into(),
        col_label: "compound".into(),
        row_groups: vec![("b0".into(), 4), ("b1".into(), 8)],
        col_groups: vec![("c0".into(), 3), ("c1".into(), 3), ("c2".into(), 3)],
    }
}

fn metric(name: &str, group: MetricGroup, values: [Option<f64>; 2], higher: bool) -> MetricRow {
    MetricRow {
        name: name.into(),
        group,
        values: values.to_vec(),
        higher_is_better: higher,
    }
}

fn input() -> ReportInput {
    ReportInput {
        title: "Example".into(),
        subtitle: "synthetic".into(),
        columns: vec!["before".into(), "after".into()],
        metrics: vec![
            metric("NMI", MetricGroup::Bio, [Some(0.4), Some(0.7)], true),
            metric("iLISI", MetricGroup::Batch, [Some(0.1), None], true),
            metric("error", MetricGroup::Other, [Some(0.1), Some(0.3)], false),
            metric(
                "overall",
                MetricGroup::Aggregate,
                [Some(-0.2), Some(1.4)],
                true,
            ),
        ],
        panels: vec![panel("before", 4), panel("after", 30)],
        heatmaps: vec![heatmap()],
        notes: vec!["a note".into()],
    }
}

/// The `(width attribute, height attribute, decoded PNG size)` of every embedded image.
fn embedded_images(html: &str) -> Vec<((u32, u32), (u32, u32))> {
    let mut found = Vec::new();
    for chunk in html.split("<img ").skip(1) {
        let attr = |name: &str| -> u32 {
            let start = chunk.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
            chunk[start..start + chunk[start..].find('"').unwrap()]
                .parse()
                .unwrap()
        };
        let prefix = "src=\"data:image/png;base64,";
        let start = chunk.find(prefix).expect("image is not a PNG data URI") + prefix.len();
        let end = start + chunk[start..].find('"').unwrap();
        let bytes = STANDARD.decode(&chunk[start..end]).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let frame = reader.next_frame(&mut pixels).unwrap();
        found.push(((attr("width"), attr("height")), (frame.width, frame.height)));
    }
    found
}

#[test]
fn html_embeds_valid_pngs_of_the_expected_sizes() {
    let input = input();
    let html = render_html(&input).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "external resource"
    );
    let images = embedded_images(&html);
    assert_eq!(images.len(), 4, "metrics chart, two panels, heatmap");
    for (attributes, decoded) in &images {
        assert_eq!(attributes, decoded);
    }
    let metrics_size = (
        METRICS_FIGURE_WIDTH,
        metrics_figure_height(&input.metrics, 2),
    );
    assert_eq!(images[0].1, metrics_size);
    assert_eq!(images[1].1, EMBEDDING_FIGURE_SIZE);
    assert_eq!(images[2].1, EMBEDDING_FIGURE_SIZE);
    assert_eq!(images[3].1, HEATMAP_FIGURE_SIZE);
}

#[test]
fn sections_follow_the_input() {
    let only_heatmap = ReportInput {
        heatmaps: vec![heatmap()],
        ..Default::default()
    };
    let html = render_html(&only_heatmap).unwrap();
    assert_eq!(embedded_images(&html).len(), 1);
    assert!(!html.contains("<h2>Metrics</h2>") && !html.contains("<h2>Embeddings</h2>"));
    assert!(html.contains("<title>Batch-correction report</title>"));
}

#[test]
fn best_value_per_row_is_highlighted() {
    let html = render_html(&input()).unwrap();
    assert!(html.contains(r#"<td class="num best">0.700</td>"#));
    // Lower is better for "error".
    assert!(html.contains(r#"<td class="num best">0.100</td><td class="num">0.300</td>"#));
    // A single finite value is not highlighted; a missing one is shown as a dash.
    assert!(html.contains(r#"<td class="num">0.100</td><td class="num missing">&ndash;</td>"#));
    // Rows are grouped: batch before bio before aggregate before other.
    let position = |name: &str| html.find(&format!("<tr><td>{name}</td>")).unwrap();
    assert!(position("iLISI") < position("NMI"));
    assert!(position("NMI") < position("overall"));
    assert!(position("overall") < position("error"));
}

#[test]
fn names_are_escaped() {
    let evil = "<script>alert('x')</script> & \"q\"";
    let mut input = input();
    input.title = evil.into();
    input.subtitle = evil.into();
    input.columns[0] = evil.into();
    input.metrics[0].name = evil.into();
    input.panels[0].title = evil.into();
    input.panels[0].label_names[0] = evil.into();
    input.notes = vec![evil.into()];
    if let Some(h) = input.heatmaps.first_mut() {
        h.title = evil.into();
        h.row_label = evil.into();
    }
    let html = render_html(&input).unwrap();
    assert!(!html.contains("<script>"));
    assert!(!html.contains("\"q\""));
    assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"));
}

#[test]
fn output_is_deterministic() {
    let first = render_html(&input()).unwrap();
    let second = render_html(&input()).unwrap();
    assert_eq!(first.as_bytes(), second.as_bytes());
}

fn assert_invalid(input: &ReportInput, needle: &str) {
    match render_html(input) {
        Err(ReportError::InvalidInput(message)) => {
            assert!(message.contains(needle), "{message:?} lacks {needle:?}")
        }
        other => panic!("expected InvalidInput({needle:?}), got {other:?}"),
    }
}

#[test]
fn bad_inputs_give_clear_errors() {
    assert_invalid(&ReportInput::default(), "nothing to report");

    let mut no_columns = input();
    no_columns.columns.clear();
    assert_invalid(&no_columns, "no column names");

    let mut short_row = input();
    short_row.metrics[1].values.pop();
    assert_invalid(&short_row, "has 1 values for 2 columns");

    let mut empty_panel = input();
    empty_panel.panels[0].coords.clear();
    assert_invalid(&empty_panel, "no points");

    let mut lengths = input();
    lengths.panels[1].batch.pop();
    assert_invalid(&lengths, "300 points but 299 batch codes");

    let mut codes = input();
    codes.panels[0].label[5] = 9;
    assert_invalid(&codes, "label code 9 has no name");

    let mut coords = input();
    coords.panels[0].coords[3][1] = f64::NAN;
    assert_invalid(&coords, "non-finite coordinates at row 3");

    let mut shape = input();
    shape.heatmaps.first_mut().unwrap().values.pop();
    assert_invalid(&shape, "107 values for a 12 x 9 matrix");

    let mut groups = input();
    groups.heatmaps.first_mut().unwrap().row_groups[1].1 = 7;
    assert_invalid(&groups, "row group sizes sum to 11, expected 12");

    let mut empty_heatmap = input();
    let h = empty_heatmap.heatmaps.first_mut().unwrap();
    h.n_rows = 0;
    h.values.clear();
    assert_invalid(&empty_heatmap, "empty shape");

    let mut non_finite = input();
    non_finite.heatmaps.first_mut().unwrap().values[10] = f64::INFINITY;
    assert_invalid(&non_finite, "non-finite value at row 1, column 1");
}

#[test]
fn constant_and_single_point_inputs_render() {
    let mut degenerate = input();
    let p = &mut degenerate.panels[0];
    p.coords = vec![[2.0, 2.0]];
    p.batch = vec![0];
    p.label = vec![0];
    let h = degenerate.heatmaps.first_mut().unwrap();
    h.values.iter_mut().for_each(|v| *v = 0.5);
    degenerate.metrics = vec![metric("m", MetricGroup::Bio, [None, None], true)];
    let html = render_html(&degenerate).unwrap();
    assert_eq!(embedded_images(&html).len(), 4);
}

#[test]
fn atomic_write_replaces_reports_only() {
    let dir = tempfile::tempdir().unwrap();
    let html = render_html(&input()).unwrap();
    let path = dir.path().join("report.html");
    write_html_atomic(&path, &html).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), html);
    // A previous report is replaced.
    let mut other = input();
    other.title = "second".into();
    let second = render_html(&other).unwrap();
    write_html_atomic(&path, &second).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), second);

    // Anything else is left alone.
    let data = dir.path().join("profiles.parquet");
    std::fs::write(&data, b"PAR1 not a report").unwrap();
    assert!(matches!(
        write_html_atomic(&data, &html),
        Err(ReportError::WouldOverwrite(_))
    ));
    assert_eq!(std::fs::read(&data).unwrap(), b"PAR1 not a report");
    // Only rendered reports are written.
    assert!(matches!(
        write_html_atomic(&dir.path().join("x.html"), "<html></html>"),
        Err(ReportError::InvalidInput(_))
    ));
    // No temporary files are left behind.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["profiles.parquet", "report.html"]);
}
