//! HTML assembly: escaping, the metric table and the page around the figures.

use std::fmt::Write;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::figures::{
    Figure, display_order, embedding_figure, heatmap_figure, metrics_figure, validate_heatmap,
    validate_metrics, validate_panel,
};
use crate::{GENERATOR_MARKER, MetricRow, ReportError, ReportInput};

const CSS: &str = r#"
:root { --text: #222; --muted: #666; --line: #ddd; --best: #e3f2e1; --best-text: #1b5e20; }
* { box-sizing: border-box; }
body { margin: 0; background: #f6f6f4; color: var(--text);
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1460px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; min-height: 100vh; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 12px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.subtitle { color: var(--muted); margin: 0; }
table { border-collapse: collapse; margin: 8px 0 20px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 14px; border-bottom: 1px solid var(--line); text-align: left; }
th { font-weight: 600; background: #fafafa; }
td.num, th.num { text-align: right; }
td.best { background: var(--best); color: var(--best-text); font-weight: 600; }
td.missing { color: var(--muted); }
td.group { color: var(--muted); }
figure { margin: 12px 0 28px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; }
ul.notes li { margin: 4px 0; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"#;

/// Escapes text for HTML element content and quoted attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// An `<img>` holding the figure as a `data:image/png;base64` URI.
fn image(figure: &Figure, alt: &str) -> String {
    format!(
        r#"<img width="{}" height="{}" alt="{}" src="data:image/png;base64,{}">"#,
        figure.width,
        figure.height,
        escape(alt),
        STANDARD.encode(&figure.png)
    )
}

/// Renders the whole report as one self-contained HTML page (no external resources).
///
/// Sections: the metric table (values to 3 decimals, the best value per row highlighted when at
/// least two values are finite and differ) with its bar chart, one figure per embedding panel,
/// the heatmap, and the notes. Sections without content are left out; the output bytes depend
/// only on `input`.
///
/// Errors: [`ReportError::InvalidInput`] when there are no metrics, panels or heatmap, or when
/// any of them is inconsistent (see the figure functions); [`ReportError::Render`] when drawing
/// fails.
pub fn render_html(input: &ReportInput) -> Result<String, ReportError> {
    if input.metrics.is_empty() && input.panels.is_empty() && input.heatmaps.is_empty() {
        return Err(ReportError::InvalidInput(
            "nothing to report: no metrics, embedding panels or heatmap".into(),
        ));
    }
    // Validate everything before drawing anything.
    if !input.metrics.is_empty() {
        validate_metrics(&input.columns, &input.metrics)?;
    }
    for panel in &input.panels {
        validate_panel(panel)?;
    }
    for heatmap in &input.heatmaps {
        validate_heatmap(heatmap)?;
    }

    let title = if input.title.trim().is_empty() {
        "Batch-correction report"
    } else {
        input.title.as_str()
    };
    let mut page = String::new();
    // Writing into a String cannot fail.
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         {GENERATOR_MARKER}\n<title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n\
         <header>\n<h1>{}</h1>\n",
        escape(title),
        escape(title)
    );
    if !input.subtitle.is_empty() {
        let _ = writeln!(
            page,
            "<p class=\"subtitle\">{}</p>",
            escape(&input.subtitle)
        );
    }
    page.push_str("</header>\n");

    if !input.metrics.is_empty() {
        page.push_str("<section>\n<h2>Metrics</h2>\n");
        page.push_str(&metric_table(&input.columns, &input.metrics));
        let figure = metrics_figure(&input.columns, &input.metrics)?;
        let _ = writeln!(
            page,
            "<figure>{}</figure>",
            image(&figure, "Bar chart of the metrics")
        );
        page.push_str("</section>\n");
    }

    if !input.panels.is_empty() {
        page.push_str("<section>\n<h2>Embeddings</h2>\n");
        for panel in &input.panels {
            let figure = embedding_figure(panel)?;
            let alt = format!("{}: embedding coloured by batch and by label", panel.title);
            let _ = writeln!(
                page,
                "<figure>{}<figcaption>{} &middot; {} points, {} batches, {} labels</figcaption></figure>",
                image(&figure, &alt),
                escape(&panel.title),
                panel.coords.len(),
                panel.batch_names.len(),
                panel.label_names.len()
            );
        }
        page.push_str("</section>\n");
    }

    if !input.heatmaps.is_empty() {
        page.push_str("<section>\n<h2>Affinity heatmap</h2>\n");
        for heatmap in &input.heatmaps {
            let figure = heatmap_figure(heatmap)?;
            let _ = writeln!(
                page,
                "<figure>{}<figcaption>{}: rows ordered by {} (left bar), columns by {} (top \
                 bar); colour scale from the minimum to the 99th percentile.</figcaption>\
                 </figure>",
                image(&figure, &heatmap.title),
                escape(&heatmap.title),
                escape(&heatmap.row_label),
                escape(&heatmap.col_label)
            );
        }
        page.push_str("</section>\n");
    }

    if !input.notes.is_empty() {
        page.push_str("<section>\n<h2>Notes</h2>\n<ul class=\"notes\">\n");
        for note in &input.notes {
            let _ = writeln!(page, "<li>{}</li>", escape(note));
        }
        page.push_str("</ul>\n</section>\n");
    }
    let _ = write!(
        page,
        "<footer>Generated by balans-report {}</footer>\n</main>\n</body>\n</html>\n",
        env!("CARGO_PKG_VERSION")
    );
    Ok(page)
}

/// The metric table, rows in display order, the best value per row highlighted.
fn metric_table(columns: &[String], rows: &[MetricRow]) -> String {
    let mut table = String::from("<table>\n<thead><tr><th>Metric</th><th>Group</th>");
    for column in columns {
        let _ = write!(table, "<th class=\"num\">{}</th>", escape(column));
    }
    table.push_str("</tr></thead>\n<tbody>\n");
    for row in display_order(rows) {
        let best = best_value(row);
        let _ = write!(
            table,
            "<tr><td>{}</td><td class=\"group\">{}</td>",
            escape(&row.name),
            row.group.name()
        );
        for value in &row.values {
            match value {
                Some(v) if v.is_finite() => {
                    let class = if best == Some(*v) { "num best" } else { "num" };
                    let _ = write!(table, "<td class=\"{class}\">{v:.3}</td>");
                }
                Some(_) => table.push_str("<td class=\"num missing\">NaN</td>"),
                None => table.push_str("<td class=\"num missing\">&ndash;</td>"),
            }
        }
        table.push_str("</tr>\n");
    }
    table.push_str("</tbody>\n</table>\n");
    table
}

/// The best finite value of a row, when at least two values are finite and not all equal.
fn best_value(row: &MetricRow) -> Option<f64> {
    let finite: Vec<f64> = row
        .values
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    let first = *finite.first()?;
    if finite.len() < 2 || finite.iter().all(|&v| v == first) {
        return None;
    }
    let pick = |a: f64, b: f64| {
        if row.higher_is_better {
            a.max(b)
        } else {
            a.min(b)
        }
    };
    Some(finite.iter().copied().fold(first, pick))
}
