//! The report's figures, drawn with `plotters` into RGB buffers and PNG-encoded.

use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};

use crate::palette::{categorical, sequential};
use crate::{EmbeddingPanel, Heatmap, MetricGroup, MetricRow, ReportError};

/// A rendered figure: PNG bytes and their pixel size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Figure {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The PNG file contents (8-bit RGB).
    pub png: Vec<u8>,
}

/// DejaVu Sans 2.37 (see `assets/DejaVuSans-LICENSE.txt`), registered as plotters' sans-serif.
const FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FONT_FAMILY: &str = "sans-serif";

/// Legends list at most this many lines; longer ones end with a "+N more" line.
const MAX_LEGEND_LINES: usize = 20;
const LEGEND_LINE_HEIGHT: i32 = 18;
const LEGEND_WIDTH: i32 = 220;
const TITLE_SIZE: f64 = 17.0;
const LABEL_SIZE: f64 = 14.0;
const SMALL_SIZE: f64 = 12.0;

const TEXT: RGBColor = RGBColor(34, 34, 34);
const MUTED: RGBColor = RGBColor(110, 110, 110);
const FRAME: RGBColor = RGBColor(190, 190, 190);
const GRID: RGBColor = RGBColor(228, 228, 228);

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type Draw<T = ()> = Result<T, ReportError>;

/// Registers the bundled font once per process.
fn ensure_font() -> Draw {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            register_font(FONT_FAMILY, FontStyle::Normal, FONT_BYTES)
                .map_err(|_| "the bundled DejaVu Sans font could not be parsed".to_string())
        })
        .clone()
        .map_err(ReportError::Render)
}

/// Maps any plotters error into a [`ReportError::Render`].
fn draw_error<E: std::fmt::Debug>(e: E) -> ReportError {
    ReportError::Render(format!("{e:?}"))
}

/// Allocates a white `width x height` canvas, lets `paint_pixels` write raw RGB pixels, then
/// `draw` draw on it with plotters, and PNG-encodes the result.
fn render(
    width: u32,
    height: u32,
    paint_pixels: impl FnOnce(&mut [u8]),
    draw: impl FnOnce(&Area<'_>) -> Draw,
) -> Draw<Figure> {
    ensure_font()?;
    let mut pixels = vec![255u8; width as usize * height as usize * 3];
    paint_pixels(&mut pixels);
    {
        let area = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        draw(&area)?;
        area.present().map_err(draw_error)?;
    }
    let mut png_bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png_bytes, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(draw_error)?;
        writer.write_image_data(&pixels).map_err(draw_error)?;
        writer.finish().map_err(draw_error)?;
    }
    Ok(Figure {
        width,
        height,
        png: png_bytes,
    })
}

fn rgb((r, g, b): (u8, u8, u8)) -> RGBColor {
    RGBColor(r, g, b)
}

fn font(size: f64, color: &RGBColor, h: HPos, v: VPos) -> TextStyle<'static> {
    (FONT_FAMILY, size)
        .into_font()
        .color(color)
        .pos(Pos::new(h, v))
}

/// Draws `s` anchored at `(x, y)`.
fn text(area: &Area<'_>, s: &str, (x, y): (i32, i32), style: &TextStyle<'_>) -> Draw {
    area.draw(&Text::new(s.to_string(), (x, y), style.clone()))
        .map_err(draw_error)
}

/// `s`, shortened with an ellipsis so that it is at most `max_width` pixels wide.
fn fit(area: &Area<'_>, s: &str, style: &TextStyle<'_>, max_width: i32) -> Draw<String> {
    let width = |t: &str| -> Draw<i32> {
        let (w, _) = area.estimate_text_size(t, style).map_err(draw_error)?;
        Ok(i32::try_from(w).unwrap_or(i32::MAX))
    };
    if width(s)? <= max_width {
        return Ok(s.to_string());
    }
    let mut chars: Vec<char> = s.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let candidate: String = chars.iter().collect::<String>() + "…";
        if width(&candidate)? <= max_width {
            return Ok(candidate);
        }
    }
    Ok("…".to_string())
}

fn filled_rect(
    area: &Area<'_>,
    (x0, y0): (i32, i32),
    (x1, y1): (i32, i32),
    color: RGBColor,
) -> Draw {
    area.draw(&Rectangle::new([(x0, y0), (x1, y1)], color.filled()))
        .map_err(draw_error)
}

fn outline_rect(
    area: &Area<'_>,
    (x0, y0): (i32, i32),
    (x1, y1): (i32, i32),
    color: RGBColor,
) -> Draw {
    area.draw(&Rectangle::new([(x0, y0), (x1, y1)], color.stroke_width(1)))
        .map_err(draw_error)
}

fn line(area: &Area<'_>, from: (i32, i32), to: (i32, i32), color: RGBColor) -> Draw {
    area.draw(&PathElement::new(vec![from, to], color.stroke_width(1)))
        .map_err(draw_error)
}

/// One legend entry: a colour swatch and a name.
struct LegendEntry {
    name: String,
    color: (u8, u8, u8),
}

/// Draws a legend with a header at `(x, y)`, at most [`MAX_LEGEND_LINES`] entry lines (the last
/// one "+N more" when entries are left out); returns the height used.
fn legend(area: &Area<'_>, (x, y): (i32, i32), header: &str, entries: &[LegendEntry]) -> Draw<i32> {
    let header_style = font(LABEL_SIZE, &TEXT, HPos::Left, VPos::Center);
    let entry_style = font(SMALL_SIZE, &TEXT, HPos::Left, VPos::Center);
    let header = fit(area, header, &header_style, LEGEND_WIDTH)?;
    text(
        area,
        &header,
        (x, y + LEGEND_LINE_HEIGHT / 2),
        &header_style,
    )?;
    let shown = if entries.len() > MAX_LEGEND_LINES {
        MAX_LEGEND_LINES - 1
    } else {
        entries.len()
    };
    let mut line_y = y + LEGEND_LINE_HEIGHT + 4;
    for entry in &entries[..shown] {
        let mid = line_y + LEGEND_LINE_HEIGHT / 2;
        filled_rect(area, (x, mid - 5), (x + 10, mid + 5), rgb(entry.color))?;
        let name = fit(area, &entry.name, &entry_style, LEGEND_WIDTH - 18)?;
        text(area, &name, (x + 16, mid), &entry_style)?;
        line_y += LEGEND_LINE_HEIGHT;
    }
    if shown < entries.len() {
        let more = format!("+{} more", entries.len() - shown);
        let muted = font(SMALL_SIZE, &MUTED, HPos::Left, VPos::Center);
        text(
            area,
            &more,
            (x + 16, line_y + LEGEND_LINE_HEIGHT / 2),
            &muted,
        )?;
        line_y += LEGEND_LINE_HEIGHT;
    }
    Ok(line_y - y)
}

// ---------------------------------------------------------------------------------------------
// Embedding scatter plots.

const SCATTER_PAD: i32 = 16;
const SCATTER_PLOT: i32 = 440;
const SCATTER_TITLE: i32 = 40;
/// Width of one scatter plot with its legend.
const SCATTER_BLOCK: i32 = SCATTER_PAD + SCATTER_PLOT + 14 + LEGEND_WIDTH;

/// Pixel size of every [`embedding_figure`].
pub const EMBEDDING_FIGURE_SIZE: (u32, u32) = (
    (2 * SCATTER_BLOCK + SCATTER_PAD) as u32,
    (SCATTER_TITLE + SCATTER_PLOT + 2 * SCATTER_PAD) as u32,
);

/// Checks an embedding panel's lengths, codes and coordinates.
pub(crate) fn validate_panel(panel: &EmbeddingPanel) -> Draw {
    let n = panel.coords.len();
    let context =
        |what: String| ReportError::InvalidInput(format!("panel {:?}: {what}", panel.title));
    if n == 0 {
        return Err(context("no points".into()));
    }
    if panel.batch.len() != n || panel.label.len() != n {
        return Err(context(format!(
            "{n} points but {} batch codes and {} label codes",
            panel.batch.len(),
            panel.label.len()
        )));
    }
    for (codes, names, what) in [
        (&panel.batch, &panel.batch_names, "batch"),
        (&panel.label, &panel.label_names, "label"),
    ] {
        if let Some(&bad) = codes.iter().find(|&&c| c as usize >= names.len()) {
            return Err(context(format!(
                "{what} code {bad} has no name ({} {what} names)",
                names.len()
            )));
        }
    }
    if let Some(row) = panel
        .coords
        .iter()
        .position(|p| !p[0].is_finite() || !p[1].is_finite())
    {
        return Err(context(format!("non-finite coordinates at row {row}")));
    }
    Ok(())
}

/// Draws an embedding twice, side by side: coloured by batch and coloured by label, each with
/// its legend (categories present in the data, in code order, at most 20 lines).
///
/// Points are drawn in a fixed pseudo-random order so that no category systematically hides
/// another; axes are scaled equally. Colours follow the codes, so two panels over the same
/// codes use the same colour per category. The figure is always [`EMBEDDING_FIGURE_SIZE`].
pub fn embedding_figure(panel: &EmbeddingPanel) -> Result<Figure, ReportError> {
    validate_panel(panel)?;
    let (width, height) = EMBEDDING_FIGURE_SIZE;
    render(
        width,
        height,
        |_| {},
        |area| {
            let order = draw_order(panel.coords.len());
            let transform = EqualAspect::fit(&panel.coords, SCATTER_PLOT);
            for (block, (codes, names, what)) in [
                (&panel.batch, &panel.batch_names, "batch"),
                (&panel.label, &panel.label_names, "label"),
            ]
            .into_iter()
            .enumerate()
            {
                let x0 = SCATTER_PAD + block as i32 * SCATTER_BLOCK;
                let y0 = SCATTER_TITLE;
                let title_style = font(TITLE_SIZE, &TEXT, HPos::Left, VPos::Center);
                let title = fit(
                    area,
                    &format!("{}, coloured by {what}", panel.title),
                    &title_style,
                    SCATTER_PLOT + LEGEND_WIDTH,
                )?;
                text(area, &title, (x0, SCATTER_TITLE / 2), &title_style)?;
                outline_rect(
                    area,
                    (x0, y0),
                    (x0 + SCATTER_PLOT, y0 + SCATTER_PLOT),
                    FRAME,
                )?;
                scatter(area, (x0, y0), &panel.coords, codes, &order, &transform)?;

                let mut counts = vec![0usize; names.len()];
                for &c in codes.iter() {
                    counts[c as usize] += 1;
                }
                let entries: Vec<LegendEntry> = names
                    .iter()
                    .enumerate()
                    .filter(|(code, _)| counts[*code] > 0)
                    .map(|(code, name)| LegendEntry {
                        name: name.clone(),
                        color: categorical(code),
                    })
                    .collect();
                let header = format!("{what} ({})", entries.len());
                legend(area, (x0 + SCATTER_PLOT + 14, y0), &header, &entries)?;
            }
            Ok(())
        },
    )
}

/// A fixed pseudo-random permutation of `0..n` (sorted by a multiplicative hash).
fn draw_order(n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16, i));
    order
}

/// Maps data coordinates into a square plot of `size` pixels, equal scale on both axes.
struct EqualAspect {
    centre: [f64; 2],
    scale: f64,
    size: i32,
}

impl EqualAspect {
    fn fit(coords: &[[f64; 2]], size: i32) -> Self {
        let mut lo = [f64::INFINITY; 2];
        let mut hi = [f64::NEG_INFINITY; 2];
        for p in coords {
            for k in 0..2 {
                lo[k] = lo[k].min(p[k]);
                hi[k] = hi[k].max(p[k]);
            }
        }
        let span = (hi[0] - lo[0]).max(hi[1] - lo[1]);
        let usable = f64::from(size) * 0.94;
        let scale = if span > 0.0 { usable / span } else { 1.0 };
        Self {
            centre: [(lo[0] + hi[0]) / 2.0, (lo[1] + hi[1]) / 2.0],
            scale,
            size,
        }
    }

    /// Pixel offset inside the plot; y grows upwards in data, downwards in pixels.
    fn apply(&self, p: [f64; 2]) -> (i32, i32) {
        let half = f64::from(self.size) / 2.0;
        let x = half + (p[0] - self.centre[0]) * self.scale;
        let y = half - (p[1] - self.centre[1]) * self.scale;
        (x.round() as i32, y.round() as i32)
    }
}

fn scatter(
    area: &Area<'_>,
    (x0, y0): (i32, i32),
    coords: &[[f64; 2]],
    codes: &[u32],
    order: &[usize],
    transform: &EqualAspect,
) -> Draw {
    let radius = match coords.len() {
        0..=2_000 => 3,
        2_001..=20_000 => 2,
        _ => 1,
    };
    let opacity = if coords.len() > 20_000 { 0.6 } else { 0.8 };
    for &i in order {
        let (x, y) = transform.apply(coords[i]);
        let color = rgb(categorical(codes[i] as usize)).mix(opacity);
        area.draw(&Circle::new((x0 + x, y0 + y), radius, color.filled()))
            .map_err(draw_error)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Metric bar chart.

const BAR_THICKNESS: i32 = 13;
const BAR_GAP: i32 = 10;
const GROUP_HEADER: i32 = 26;
const METRIC_LABEL_WIDTH: i32 = 250;
const METRIC_TOP: i32 = 64;
const METRIC_BOTTOM: i32 = 44;

/// Width of every [`metrics_figure`].
pub const METRICS_FIGURE_WIDTH: u32 = 900;

/// Metric rows in display order: grouped (batch, bio, aggregate, other), input order within.
pub(crate) fn display_order(rows: &[MetricRow]) -> Vec<&MetricRow> {
    let mut ordered: Vec<&MetricRow> = rows.iter().collect();
    ordered.sort_by_key(|r| r.group);
    ordered
}

/// Checks that metric rows and columns are consistent.
pub(crate) fn validate_metrics(columns: &[String], rows: &[MetricRow]) -> Draw {
    if rows.is_empty() {
        return Err(ReportError::InvalidInput("no metric rows".into()));
    }
    if columns.is_empty() {
        return Err(ReportError::InvalidInput(
            "metric rows given but no column names".into(),
        ));
    }
    if let Some(row) = rows.iter().find(|r| r.values.len() != columns.len()) {
        return Err(ReportError::InvalidInput(format!(
            "metric {:?} has {} values for {} columns",
            row.name,
            row.values.len(),
            columns.len()
        )));
    }
    Ok(())
}

/// Pixel height of the [`metrics_figure`] for these rows and this many columns.
pub fn metrics_figure_height(rows: &[MetricRow], n_columns: usize) -> u32 {
    let mut groups: Vec<MetricGroup> = rows.iter().map(|r| r.group).collect();
    groups.sort();
    groups.dedup();
    let row_height = metric_row_height(n_columns);
    let body = groups.len() as i32 * GROUP_HEADER + rows.len() as i32 * row_height;
    (METRIC_TOP + body + METRIC_BOTTOM) as u32
}

fn metric_row_height(n_columns: usize) -> i32 {
    n_columns as i32 * BAR_THICKNESS + BAR_GAP
}

/// Grouped horizontal bar chart of the metrics: one row per metric, one bar per column
/// (coloured by column, value printed at the bar end), rows grouped under their group name.
///
/// The value axis spans at least `[0, 1]` and widens to include every finite value. Missing or
/// non-finite values are marked "n/a". Width [`METRICS_FIGURE_WIDTH`], height
/// [`metrics_figure_height`].
pub fn metrics_figure(columns: &[String], rows: &[MetricRow]) -> Result<Figure, ReportError> {
    validate_metrics(columns, rows)?;
    let ordered = display_order(rows);
    let width = METRICS_FIGURE_WIDTH;
    let height = metrics_figure_height(rows, columns.len());
    let finite = rows
        .iter()
        .flat_map(|r| r.values.iter().flatten())
        .filter(|v| v.is_finite());
    let (min, max) = finite.fold((0.0f64, 1.0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let axis = NiceAxis::new(min, max);
    let plot_x0 = METRIC_LABEL_WIDTH + 10;
    let plot_x1 = width as i32 - 70;
    let to_x = |v: f64| {
        plot_x0
            + ((v - axis.lo) / (axis.hi - axis.lo) * f64::from(plot_x1 - plot_x0)).round() as i32
    };
    let plot_y1 = height as i32 - METRIC_BOTTOM;

    render(
        width,
        height,
        |_| {},
        |area| {
            let title_style = font(TITLE_SIZE, &TEXT, HPos::Left, VPos::Center);
            text(area, "Metrics", (16, 18), &title_style)?;
            // Column legend on one line.
            let legend_style = font(LABEL_SIZE, &TEXT, HPos::Left, VPos::Center);
            let mut x = plot_x0;
            for (c, name) in columns.iter().enumerate() {
                filled_rect(area, (x, 36), (x + 12, 48), rgb(categorical(c)))?;
                let name = fit(area, name, &legend_style, 160)?;
                text(area, &name, (x + 18, 42), &legend_style)?;
                let (w, _) = area
                    .estimate_text_size(&name, &legend_style)
                    .map_err(draw_error)?;
                x += 18 + i32::try_from(w).unwrap_or(160) + 24;
            }
            // Grid and ticks.
            let tick_style = font(SMALL_SIZE, &MUTED, HPos::Center, VPos::Top);
            for tick in axis.ticks() {
                let tx = to_x(tick);
                line(area, (tx, METRIC_TOP), (tx, plot_y1), GRID)?;
                text(area, &axis.format(tick), (tx, plot_y1 + 6), &tick_style)?;
            }
            let zero_x = to_x(0.0);
            line(area, (zero_x, METRIC_TOP), (zero_x, plot_y1), FRAME)?;
            line(area, (plot_x0, plot_y1), (plot_x1, plot_y1), FRAME)?;

            let name_style = font(LABEL_SIZE, &TEXT, HPos::Right, VPos::Center);
            let group_style = font(LABEL_SIZE, &MUTED, HPos::Left, VPos::Center);
            let value_style = font(SMALL_SIZE, &TEXT, HPos::Left, VPos::Center);
            let value_style_left = font(SMALL_SIZE, &TEXT, HPos::Right, VPos::Center);
            let row_height = metric_row_height(columns.len());
            let mut y = METRIC_TOP;
            let mut current_group = None;
            for row in ordered {
                if current_group != Some(row.group) {
                    current_group = Some(row.group);
                    text(
                        area,
                        row.group.name(),
                        (16, y + GROUP_HEADER / 2 + 2),
                        &group_style,
                    )?;
                    line(
                        area,
                        (16, y + GROUP_HEADER - 2),
                        (plot_x1, y + GROUP_HEADER - 2),
                        GRID,
                    )?;
                    y += GROUP_HEADER;
                }
                let name = fit(area, &row.name, &name_style, METRIC_LABEL_WIDTH - 24)?;
                text(
                    area,
                    &name,
                    (METRIC_LABEL_WIDTH, y + (row_height - BAR_GAP) / 2),
                    &name_style,
                )?;
                for (c, value) in row.values.iter().enumerate() {
                    let top = y + c as i32 * BAR_THICKNESS;
                    let mid = top + BAR_THICKNESS / 2;
                    match value.filter(|v| v.is_finite()) {
                        Some(v) => {
                            let end = to_x(v);
                            let (a, b) = (zero_x.min(end), zero_x.max(end));
                            filled_rect(
                                area,
                                (a, top + 1),
                                (b.max(a + 1), top + BAR_THICKNESS - 1),
                                rgb(categorical(c)),
                            )?;
                            let label = format!("{v:.3}");
                            if v >= 0.0 {
                                text(area, &label, (b + 4, mid), &value_style)?;
                            } else {
                                text(area, &label, (a - 4, mid), &value_style_left)?;
                            }
                        }
                        None => {
                            let muted = font(SMALL_SIZE, &MUTED, HPos::Left, VPos::Center);
                            text(area, "n/a", (zero_x + 4, mid), &muted)?;
                        }
                    }
                }
                y += row_height;
            }
            Ok(())
        },
    )
}

/// A value axis with round tick steps.
struct NiceAxis {
    lo: f64,
    hi: f64,
    step: f64,
}

impl NiceAxis {
    fn new(min: f64, max: f64) -> Self {
        let raw = (max - min).max(f64::MIN_POSITIVE) / 5.0;
        let magnitude = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0]
            .iter()
            .map(|m| m * magnitude)
            .find(|&s| s >= raw)
            .unwrap_or(10.0 * magnitude);
        Self {
            lo: (min / step).floor() * step,
            hi: (max / step).ceil() * step,
            step,
        }
    }

    fn ticks(&self) -> Vec<f64> {
        let n = ((self.hi - self.lo) / self.step).round() as i64;
        (0..=n).map(|i| self.lo + i as f64 * self.step).collect()
    }

    fn format(&self, v: f64) -> String {
        let mut decimals = 0;
        while decimals < 6 {
            let scaled = self.step * 10f64.powi(decimals);
            if (scaled - scaled.round()).abs() < 1e-9 {
                break;
            }
            decimals += 1;
        }
        let v = if v.abs() < self.step * 1e-9 { 0.0 } else { v };
        format!("{v:.prec$}", prec = decimals as usize)
    }
}

// ---------------------------------------------------------------------------------------------
// Affinity heatmap.

const HEAT_SIZE: i32 = 600;
const HEAT_LEFT: i32 = 24;
const HEAT_TOP: i32 = 48;
const GROUP_BAR: i32 = 14;
/// Boundary lines are drawn only when groups are at least this many pixels apart on average.
const MIN_PIXELS_PER_GROUP: i32 = 4;

/// Pixel size of every [`heatmap_figure`].
pub const HEATMAP_FIGURE_SIZE: (u32, u32) = (
    (HEAT_LEFT + GROUP_BAR + 4 + HEAT_SIZE + 24 + 20 + 70 + 2 * (LEGEND_WIDTH + 16)) as u32,
    (HEAT_TOP + GROUP_BAR + 4 + HEAT_SIZE + 24) as u32,
);

/// Checks the heatmap's shape, values and groups.
pub(crate) fn validate_heatmap(heatmap: &Heatmap) -> Draw {
    let context =
        |what: String| ReportError::InvalidInput(format!("heatmap {:?}: {what}", heatmap.title));
    if heatmap.n_rows == 0 || heatmap.n_cols == 0 {
        return Err(context(format!(
            "empty shape {} x {}",
            heatmap.n_rows, heatmap.n_cols
        )));
    }
    if heatmap.n_rows.checked_mul(heatmap.n_cols) != Some(heatmap.values.len()) {
        return Err(context(format!(
            "{} values for a {} x {} matrix",
            heatmap.values.len(),
            heatmap.n_rows,
            heatmap.n_cols
        )));
    }
    if let Some(i) = heatmap.values.iter().position(|v| !v.is_finite()) {
        return Err(context(format!(
            "non-finite value at row {}, column {}",
            i / heatmap.n_cols,
            i % heatmap.n_cols
        )));
    }
    for (groups, total, what) in [
        (&heatmap.row_groups, heatmap.n_rows, "row"),
        (&heatmap.col_groups, heatmap.n_cols, "column"),
    ] {
        if groups.iter().any(|(_, count)| *count == 0) {
            return Err(context(format!("a {what} group is empty")));
        }
        let sum: usize = groups.iter().map(|(_, count)| count).sum();
        if sum != total {
            return Err(context(format!(
                "{what} group sizes sum to {sum}, expected {total}"
            )));
        }
    }
    Ok(())
}

/// The affinity heatmap as in the BALANS paper's Figure 1: rows ordered by batch with a
/// batch colour bar on the left, columns ordered by label with a label colour bar on top, thin
/// white lines at group boundaries (when groups are at least 4 pixels wide on average), a colour
/// scale and the two group legends.
///
/// The matrix is resampled to a 600 x 600 pixel square (block averages when larger, nearest
/// cells when smaller). The colour scale runs from the minimum to the 99th percentile of the
/// values (larger values saturate), so a few large entries such as self-affinities on the
/// diagonal do not wash out the block structure. The figure is always [`HEATMAP_FIGURE_SIZE`].
pub fn heatmap_figure(heatmap: &Heatmap) -> Result<Figure, ReportError> {
    validate_heatmap(heatmap)?;
    let (width, height) = HEATMAP_FIGURE_SIZE;
    let (vmin, vmax) = colour_range(&heatmap.values);
    let heat_x0 = HEAT_LEFT + GROUP_BAR + 4;
    let heat_y0 = HEAT_TOP + GROUP_BAR + 4;
    let row_ranges = pixel_ranges(heatmap.n_rows);
    let col_ranges = pixel_ranges(heatmap.n_cols);

    let paint = |pixels: &mut [u8]| {
        let mut sums = vec![0.0f64; HEAT_SIZE as usize];
        for (py, &(r0, r1)) in row_ranges.iter().enumerate().take(HEAT_SIZE as usize) {
            sums.iter_mut().for_each(|s| *s = 0.0);
            for r in r0..r1 {
                let row = &heatmap.values[r * heatmap.n_cols..(r + 1) * heatmap.n_cols];
                for (sum, &(c0, c1)) in sums.iter_mut().zip(&col_ranges) {
                    *sum += row[c0..c1].iter().sum::<f64>();
                }
            }
            for (px, (sum, &(c0, c1))) in sums.iter().zip(&col_ranges).enumerate() {
                let cells = ((r1 - r0) * (c1 - c0)) as f64;
                let (r, g, b) = sequential((sum / cells - vmin) / (vmax - vmin));
                let offset = ((heat_y0 as usize + py) * width as usize + heat_x0 as usize + px) * 3;
                pixels[offset..offset + 3].copy_from_slice(&[r, g, b]);
            }
        }
    };

    render(width, height, paint, |area| {
        let title_style = font(TITLE_SIZE, &TEXT, HPos::Left, VPos::Center);
        let title = fit(
            area,
            &heatmap.title,
            &title_style,
            width as i32 - 2 * HEAT_LEFT,
        )?;
        text(area, &title, (HEAT_LEFT, 20), &title_style)?;

        let to_pixel = |index: usize, total: usize| -> i32 {
            (index as f64 * f64::from(HEAT_SIZE) / total as f64).round() as i32
        };
        // Group colour bars and boundaries.
        let mut start = 0;
        let draw_row_lines =
            HEAT_SIZE / heatmap.row_groups.len().max(1) as i32 >= MIN_PIXELS_PER_GROUP;
        for (g, (_, count)) in heatmap.row_groups.iter().enumerate() {
            let (a, b) = (
                to_pixel(start, heatmap.n_rows),
                to_pixel(start + count, heatmap.n_rows),
            );
            filled_rect(
                area,
                (HEAT_LEFT, heat_y0 + a),
                (HEAT_LEFT + GROUP_BAR, heat_y0 + b.max(a + 1)),
                rgb(categorical(g)),
            )?;
            if start > 0 && draw_row_lines {
                line(
                    area,
                    (heat_x0, heat_y0 + a),
                    (heat_x0 + HEAT_SIZE, heat_y0 + a),
                    WHITE,
                )?;
            }
            start += count;
        }
        let mut start = 0;
        let draw_col_lines =
            HEAT_SIZE / heatmap.col_groups.len().max(1) as i32 >= MIN_PIXELS_PER_GROUP;
        for (g, (_, count)) in heatmap.col_groups.iter().enumerate() {
            let (a, b) = (
                to_pixel(start, heatmap.n_cols),
                to_pixel(start + count, heatmap.n_cols),
            );
            filled_rect(
                area,
                (heat_x0 + a, HEAT_TOP),
                (heat_x0 + b.max(a + 1), HEAT_TOP + GROUP_BAR),
                rgb(categorical(g)),
            )?;
            if start > 0 && draw_col_lines {
                line(
                    area,
                    (heat_x0 + a, heat_y0),
                    (heat_x0 + a, heat_y0 + HEAT_SIZE),
                    WHITE,
                )?;
            }
            start += count;
        }
        outline_rect(
            area,
            (heat_x0 - 1, heat_y0 - 1),
            (heat_x0 + HEAT_SIZE, heat_y0 + HEAT_SIZE),
            FRAME,
        )?;
        let axis_style = font(SMALL_SIZE, &MUTED, HPos::Left, VPos::Top);
        text(
            area,
            &format!(
                "rows: {} ({}), columns: {} ({})",
                heatmap.row_label, heatmap.n_rows, heatmap.col_label, heatmap.n_cols
            ),
            (heat_x0, heat_y0 + HEAT_SIZE + 6),
            &axis_style,
        )?;

        // Colour scale.
        let bar_x = heat_x0 + HEAT_SIZE + 24;
        for py in 0..HEAT_SIZE {
            let t = 1.0 - f64::from(py) / f64::from(HEAT_SIZE - 1);
            filled_rect(
                area,
                (bar_x, heat_y0 + py),
                (bar_x + 20, heat_y0 + py + 1),
                rgb(sequential(t)),
            )?;
        }
        outline_rect(
            area,
            (bar_x, heat_y0),
            (bar_x + 20, heat_y0 + HEAT_SIZE),
            FRAME,
        )?;
        let tick_style = font(SMALL_SIZE, &TEXT, HPos::Left, VPos::Center);
        for k in 0..=4 {
            let t = f64::from(k) / 4.0;
            let y = heat_y0 + ((1.0 - t) * f64::from(HEAT_SIZE - 1)).round() as i32;
            line(area, (bar_x + 20, y), (bar_x + 24, y), TEXT)?;
            let value = vmin + t * (vmax - vmin);
            let label = if k == 4 {
                format!("≥{}", short_number(value))
            } else {
                short_number(value)
            };
            text(area, &label, (bar_x + 27, y), &tick_style)?;
        }

        // Group legends.
        let legend_x = bar_x + 20 + 70;
        for (column, (groups, what)) in [
            (&heatmap.row_groups, &heatmap.row_label),
            (&heatmap.col_groups, &heatmap.col_label),
        ]
        .into_iter()
        .enumerate()
        {
            let entries: Vec<LegendEntry> = groups
                .iter()
                .enumerate()
                .map(|(g, (name, _))| LegendEntry {
                    name: name.clone(),
                    color: categorical(g),
                })
                .collect();
            let side = if column == 0 { "left bar" } else { "top bar" };
            legend(
                area,
                (legend_x + column as i32 * (LEGEND_WIDTH + 16), heat_y0),
                &format!("{what} ({side})"),
                &entries,
            )?;
        }
        Ok(())
    })
}

/// Minimum and 99th percentile of the values (widened when they coincide).
fn colour_range(values: &[f64]) -> (f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let vmin = sorted[0];
    let rank = ((sorted.len() - 1) as f64 * 0.99).round() as usize;
    let mut vmax = sorted[rank];
    if vmax <= vmin {
        vmax = sorted[sorted.len() - 1];
    }
    if vmax <= vmin {
        vmax = vmin + 1.0;
    }
    (vmin, vmax)
}

/// The matrix index range `[start, end)` shown by each of the `HEAT_SIZE` pixels along an axis of
/// `total` cells: blocks when `total >= HEAT_SIZE`, the nearest single cell otherwise.
fn pixel_ranges(total: usize) -> Vec<(usize, usize)> {
    let size = HEAT_SIZE as usize;
    (0..size)
        .map(|p| {
            let start = p * total / size;
            let end = if total >= size {
                (p + 1) * total / size
            } else {
                start + 1
            };
            (start, end)
        })
        .collect()
}

/// Compact number for tick labels: 3 significant digits.
fn short_number(v: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    let magnitude = v.abs().log10().floor() as i32;
    if (-3..4).contains(&magnitude) {
        let decimals = (2 - magnitude).max(0) as usize;
        format!("{v:.decimals$}")
    } else {
        format!("{v:.2e}")
    }
}
