//! Colours: a 20-colour categorical palette and a viridis-like sequential colour map.

/// matplotlib's tab20 reordered: the ten saturated tab10 colours first, then their ten light
/// partners, so up to ten categories get well separated hues and up to twenty stay distinct.
const CATEGORICAL: [(u8, u8, u8); 20] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
];

/// Colour of category `code`; the palette repeats after 20 categories.
pub fn categorical(code: usize) -> (u8, u8, u8) {
    CATEGORICAL[code % CATEGORICAL.len()]
}

/// Anchor colours of viridis at t = 0, 1/8, ..., 1, interpolated linearly in between.
const VIRIDIS: [(f64, f64, f64); 9] = [
    (68.0, 1.0, 84.0),
    (71.0, 44.0, 122.0),
    (59.0, 81.0, 139.0),
    (44.0, 113.0, 142.0),
    (33.0, 144.0, 141.0),
    (39.0, 173.0, 129.0),
    (92.0, 200.0, 99.0),
    (170.0, 220.0, 50.0),
    (253.0, 231.0, 37.0),
];

/// Sequential colour of `t` in `[0, 1]` (clamped; NaN maps to the low end).
pub fn sequential(t: f64) -> (u8, u8, u8) {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let scaled = t * (VIRIDIS.len() - 1) as f64;
    let lower = (scaled.floor() as usize).min(VIRIDIS.len() - 2);
    let frac = scaled - lower as f64;
    let (a, b) = (VIRIDIS[lower], VIRIDIS[lower + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * frac).round().clamp(0.0, 255.0) as u8;
    (mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}
