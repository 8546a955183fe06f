//! Training curves as SVG, drawn with plotters.

use plotters::prelude::*;

use crate::error::{MonitorError, Result};

/// One named line of a chart.
#[derive(Debug, Clone)]
pub struct Series<'a> {
    /// Legend.
    pub name: &'a str,
    /// `(step, value)` points; non-finite values are skipped.
    pub points: &'a [(f64, f64)],
    /// Draw markers on the points (for sparse series such as evaluations).
    pub markers: bool,
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

fn bounds(series: &[Series<'_>]) -> Option<((f64, f64), (f64, f64))> {
    let pts = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|p| p.0.is_finite() && p.1.is_finite())
    };
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return None;
    }
    if x1 - x0 < 1.0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(y1.abs().max(1e-12) * 1e-3);
    Some(((x0, x1), (y0 - pad, y1 + pad)))
}

/// A number as a reader wants it on an axis or in a table: at most four significant digits,
/// no trailing zeros, scientific notation only for the very small and the very large
/// (`0.0002` → `2e-4`, `12345.6` → `12346`, `0.25` → `0.25`).
pub(crate) fn readable(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if a == 0.0 {
        return "0".into();
    }
    if !(1e-3..1e6).contains(&a) {
        let s = format!("{v:.2e}");
        // 2.00e-4 → 2e-4
        return match s.split_once('e') {
            Some((m, e)) => {
                let m = m.trim_end_matches('0').trim_end_matches('.');
                format!("{m}e{e}")
            }
            None => s,
        };
    }
    let digits = (3 - a.log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// An SVG line chart of `series` against the step, or `None` when there is nothing to draw.
pub fn line_chart(title: &str, y_label: &str, series: &[Series<'_>]) -> Result<Option<String>> {
    let Some(((x0, x1), (y0, y1))) = bounds(series) else {
        return Ok(None);
    };
    let err = |e: &dyn std::fmt::Display| MonitorError::Plot {
        name: title.to_string(),
        message: e.to_string(),
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        // Steps are whole numbers: a tick between two steps gets no label.
        let x_label = |x: &f64| {
            if (x - x.round()).abs() < 1e-9 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        };
        let y_label_text = |y: &f64| readable(*y);
        chart
            .configure_mesh()
            .x_desc("step")
            .x_labels(((x1 - x0).round() as usize + 1).clamp(2, 10))
            .x_label_formatter(&x_label)
            .y_label_formatter(&y_label_text)
            .y_desc(y_label)
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, s) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect();
            let line = LineSeries::new(pts.clone(), color.stroke_width(2));
            chart
                .draw_series(line)
                .map_err(|e| err(&e))?
                .label(s.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            if s.markers {
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(|e| err(&e))?;
            }
        }
        if series.len() > 1 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(RGBColor(180, 180, 180))
                .draw()
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(Some(svg))
}

#[cfg(test)]
mod readable_tests {
    use super::readable;

    #[test]
    fn numbers_read_well() {
        for (v, text) in [
            (0.0002, "2e-4"),
            (0.25, "0.25"),
            (12345.6, "12346"),
            (1.0, "1"),
            (2.71832, "2.718"),
            (0.001234, "0.001234"),
            (2.5e6, "2.5e6"),
            (0.0, "0"),
            (-0.5, "-0.5"),
        ] {
            assert_eq!(readable(v), text, "{v}");
        }
    }
}
