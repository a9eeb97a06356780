//! Line charts as PNG, drawn directly into an RGB buffer with a built-in 5×7 pixel font.
//!
//! Drawing our own keeps plots byte-for-byte reproducible and free of system fonts (a font
//! lookup is what makes plotting libraries fail on headless machines and in CI).

use std::path::Path;

use anyhow::Result;

use crate::data::media::{write_png, Frame};

const W: u32 = 720;
const H: u32 = 420;
const LEFT: i64 = 70;
const RIGHT: i64 = 190;
const TOP: i64 = 34;
const BOTTOM: i64 = 46;

/// Distinct line colours (Okabe & Ito's colour-blind-safe palette).
const PALETTE: [[u8; 3]; 7] = [
    [0, 114, 178],
    [213, 94, 0],
    [0, 158, 115],
    [204, 121, 167],
    [230, 159, 0],
    [86, 180, 233],
    [0, 0, 0],
];

/// 5×7 glyphs, one `u8` a row (low 5 bits, MSB left).
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        'A' => [14, 17, 17, 31, 17, 17, 17],
        'B' => [30, 17, 17, 30, 17, 17, 30],
        'C' => [14, 17, 16, 16, 16, 17, 14],
        'D' => [28, 18, 17, 17, 17, 18, 28],
        'E' => [31, 16, 16, 30, 16, 16, 31],
        'F' => [31, 16, 16, 30, 16, 16, 16],
        'G' => [14, 17, 16, 23, 17, 17, 15],
        'H' => [17, 17, 17, 31, 17, 17, 17],
        'I' => [14, 4, 4, 4, 4, 4, 14],
        'J' => [7, 2, 2, 2, 2, 18, 12],
        'K' => [17, 18, 20, 24, 20, 18, 17],
        'L' => [16, 16, 16, 16, 16, 16, 31],
        'M' => [17, 27, 21, 21, 17, 17, 17],
        'N' => [17, 17, 25, 21, 19, 17, 17],
        'O' => [14, 17, 17, 17, 17, 17, 14],
        'P' => [30, 17, 17, 30, 16, 16, 16],
        'Q' => [14, 17, 17, 17, 21, 18, 13],
        'R' => [30, 17, 17, 30, 20, 18, 17],
        'S' => [15, 16, 16, 14, 1, 1, 30],
        'T' => [31, 4, 4, 4, 4, 4, 4],
        'U' => [17, 17, 17, 17, 17, 17, 14],
        'V' => [17, 17, 17, 17, 17, 10, 4],
        'W' => [17, 17, 17, 21, 21, 21, 10],
        'X' => [17, 17, 10, 4, 10, 17, 17],
        'Y' => [17, 17, 17, 10, 4, 4, 4],
        'Z' => [31, 1, 2, 4, 8, 16, 31],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        ',' => [0, 0, 0, 0, 12, 4, 8],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '+' => [0, 4, 4, 31, 4, 4, 0],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        '%' => [24, 25, 2, 4, 8, 19, 3],
        '/' => [0, 1, 2, 4, 8, 16, 0],
        '_' => [0, 0, 0, 0, 0, 0, 31],
        '=' => [0, 0, 31, 0, 31, 0, 0],
        '|' => [4, 4, 4, 4, 4, 4, 4],
        _ => [0; 7],
    }
}

struct Canvas {
    frame: Frame,
}

impl Canvas {
    fn new() -> Self {
        Self {
            frame: Frame {
                width: W,
                height: H,
                rgb: vec![255; (W * H * 3) as usize],
            },
        }
    }

    fn px(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && x < i64::from(W) && y < i64::from(H) {
            let i = ((y as u32 * W + x as u32) * 3) as usize;
            self.frame.rgb[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Bresenham line, `thick` pixels wide.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3], thick: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for ox in 0..thick {
                for oy in 0..thick {
                    self.px(x + ox, y + oy, c);
                }
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (16 >> col) != 0 {
                        self.px(x + i as i64 * 6 + col, y + row as i64, c);
                    }
                }
            }
        }
    }
}

fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-2..1e4).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// One named series of `(x, y)` points (non-finite points are left out).
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points in x order.
    pub points: Vec<(f64, f64)>,
}

/// Renders a line chart to `path`.
pub fn line_chart(path: &Path, title: &str, x_label: &str, series: &[Series]) -> Result<()> {
    let mut cv = Canvas::new();
    let finite: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = (0.0f64, 1.0f64, 0.0f64, 1.0f64);
    if let Some(&(x, y)) = finite.first() {
        (x0, x1, y0, y1) = (x, x, y, y);
        for &(x, y) in &finite {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    (y0, y1) = (y0 - pad, y1 + pad);
    let (pw, ph) = (i64::from(W) - LEFT - RIGHT, i64::from(H) - TOP - BOTTOM);
    let map = |x: f64, y: f64| -> (i64, i64) {
        (
            LEFT + ((x - x0) / (x1 - x0) * pw as f64).round() as i64,
            TOP + ph - ((y - y0) / (y1 - y0) * ph as f64).round() as i64,
        )
    };
    let grey = [200, 200, 200];
    let black = [0, 0, 0];
    for i in 0..=4 {
        let fy = y0 + (y1 - y0) * f64::from(i) / 4.0;
        let (_, py) = map(x0, fy);
        cv.line((LEFT, py), (LEFT + pw, py), grey, 1);
        cv.text(4, py - 3, &fmt_tick(fy), black);
        let fx = x0 + (x1 - x0) * f64::from(i) / 4.0;
        let (px, _) = map(fx, y0);
        cv.line((px, TOP), (px, TOP + ph), grey, 1);
        let label = fmt_tick(fx);
        cv.text(px - label.len() as i64 * 3, TOP + ph + 6, &label, black);
    }
    cv.line((LEFT, TOP), (LEFT, TOP + ph), black, 1);
    cv.line((LEFT, TOP + ph), (LEFT + pw, TOP + ph), black, 1);
    cv.text(LEFT, 12, title, black);
    cv.text(
        LEFT + pw / 2 - x_label.len() as i64 * 3,
        i64::from(H) - 16,
        x_label,
        black,
    );
    for (i, s) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let pts: Vec<(i64, i64)> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| map(x, y))
            .collect();
        for w in pts.windows(2) {
            cv.line(w[0], w[1], c, 2);
        }
        if pts.len() == 1 {
            cv.line(pts[0], pts[0], c, 4);
        }
        let ly = TOP + 6 + i as i64 * 14;
        let lx = LEFT + pw + 12;
        cv.line((lx, ly + 3), (lx + 16, ly + 3), c, 2);
        cv.text(lx + 22, ly, &s.label, black);
    }
    write_png(path, &cv.frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_is_a_png_with_coloured_series_and_is_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let series = vec![
            Series {
                label: "opsd".into(),
                points: (0..20)
                    .map(|i| (i as f64, (i as f64 * 0.3).sin()))
                    .collect(),
            },
            Series {
                label: "label-sft".into(),
                points: vec![(0.0, f64::NAN), (5.0, 0.2), (19.0, -0.5)],
            },
        ];
        let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
        line_chart(&a, "loss", "step", &series).unwrap();
        line_chart(&b, "loss", "step", &series).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let frame = crate::data::media::read_png(&a).unwrap();
        assert_eq!((frame.width, frame.height), (W, H));
        for c in &PALETTE[..2] {
            assert!(
                frame.rgb.chunks_exact(3).any(|p| p == c),
                "series colour {c:?} drawn"
            );
        }
    }
}
