//! SVG plots of the results (plotters, SVG backend only).

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use thiserror::Error;

/// Why a plot could not be drawn.
#[derive(Debug, Error)]
pub enum PlotError {
    /// plotters failed (the SVG file could not be written, say).
    #[error("plot {path}: {source}")]
    Draw {
        path: PathBuf,
        #[source]
        source: DrawingAreaErrorKind<std::io::Error>,
    },
}

/// One line of a plot: a label and its (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

/// How the y axis scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YAxis {
    /// Logarithmic: positive values spanning decades (pauses).
    Log,
    /// Symmetric log, in percent: linear within ±1 %, logarithmic beyond,
    /// either sign (losses from -10 % to +3,000 % on one plot, where a
    /// linear axis made everything under +100 % one flat line).
    SymLogPercent,
}

/// Plot `series` against the interval (seconds, log scale) into `path`.
pub fn by_interval(path: &Path, title: &str, y_desc: &str, series: &[Series], y: YAxis) -> Result<(), PlotError> {
    let pts = || series.iter().flat_map(|(_, p)| p.iter().copied());
    let (Some(x0), Some(x1)) = (pts().map(|p| p.0).reduce(f64::min), pts().map(|p| p.0).reduce(f64::max)) else {
        return Ok(()); // nothing to draw
    };
    let y0 = pts().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y1 = pts().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let err = |source| PlotError::Draw {
        path: path.to_path_buf(),
        source,
    };
    let root = SVGBackend::new(path, (760, 430)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64);
    let xr = (x0 / 1.5..x1 * 1.5).log_scale();
    macro_rules! draw {
        ($chart:expr, $fmt:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("snapshot interval (s)")
                .y_desc(y_desc)
                .y_label_formatter(&$fmt)
                .draw()
                .map_err(err)?;
            for (i, (label, p)) in series.iter().enumerate() {
                let color = color_of(label, i);
                chart
                    .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))
                    .map_err(err)?
                    .label(label.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
                chart
                    .draw_series(p.iter().map(|&(x, y)| Circle::new((x, y), 3, color.filled())))
                    .map_err(err)?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(err)?;
        }};
    }
    match y {
        YAxis::Log => {
            let lo = (y0.max(1e-3)) / 1.5;
            let chart = b
                .build_cartesian_2d(xr, (lo..y1.max(lo * 2.0) * 1.5).log_scale())
                .map_err(err)?;
            draw!(chart, |v: &f64| format!("{v}"));
        }
        YAxis::SymLogPercent => {
            // A decade of margin on either side, and 0 always shown.
            let lo = SymLog::inv(SymLog::t(y0.min(0.0)) - 0.15);
            let hi = SymLog::inv(SymLog::t(y1.max(1.0)) + 0.15);
            let chart = b.build_cartesian_2d(xr, SymLog { lo, hi }).map_err(err)?;
            draw!(chart, |v: &f64| if *v == 0.0 { "0".into() } else { format!("{v:+}%") });
        }
    }
    root.present().map_err(err)
}

/// A symmetric-log axis over [lo, hi]: t(v) = sign(v) log10(1 + |v|),
/// with ticks at 0 and ±10^k.
#[derive(Debug, Clone, Copy)]
struct SymLog {
    lo: f64,
    hi: f64,
}

impl SymLog {
    fn t(v: f64) -> f64 {
        v.signum() * v.abs().ln_1p() / std::f64::consts::LN_10
    }

    fn inv(t: f64) -> f64 {
        t.signum() * (10f64.powf(t.abs()) - 1.0)
    }

    /// 0 and ±10^k within the range.
    fn ticks(&self) -> Vec<f64> {
        let mut out = vec![0.0];
        for k in 0..8 {
            let v = 10f64.powi(k);
            out.extend([-v, v]);
        }
        out.retain(|v| (self.lo..=self.hi).contains(v));
        out.sort_by(f64::total_cmp);
        out
    }
}

impl plotters::coord::ranged1d::Ranged for SymLog {
    type FormatOption = plotters::coord::ranged1d::DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let (a, b) = (Self::t(self.lo), Self::t(self.hi));
        let f = (Self::t(*v) - a) / (b - a);
        limit.0 + (f * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<H: plotters::coord::ranged1d::KeyPointHint>(&self, _hint: H) -> Vec<f64> {
        self.ticks()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// A fixed color per mode, so that every plot reads the same way.
fn color_of(label: &str, i: usize) -> RGBAColor {
    match label {
        "stop-copy-full" => RGBColor(120, 120, 120).to_rgba(),
        "stop-copy" => RGBColor(214, 39, 40).to_rgba(),
        "cow" => RGBColor(31, 119, 180).to_rgba(),
        "qemu-background" => RGBColor(255, 127, 14).to_rgba(),
        "qemu-stop-copy" => RGBColor(148, 103, 189).to_rgba(),
        _ => Palette99::pick(i).to_rgba(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlog_is_monotonic_and_inverts() {
        for v in [-1000.0, -10.0, -0.5, 0.0, 0.5, 1.0, 9.0, 3277.0] {
            assert!((SymLog::inv(SymLog::t(v)) - v).abs() < 1e-6 * v.abs().max(1.0), "{v}");
        }
        let a = SymLog { lo: -20.0, hi: 4000.0 };
        let px: Vec<i32> = [-20.0, -10.0, 0.0, 5.0, 46.0, 3277.0]
            .iter()
            .map(|v| plotters::coord::ranged1d::Ranged::map(&a, v, (0, 400)))
            .collect();
        assert!(px.windows(2).all(|w| w[0] < w[1]), "{px:?}");
        // +5 % and +46 % are far apart, not squashed under +3,277 %.
        assert!(px[4] - px[3] > 50, "{px:?}");
        assert_eq!(a.ticks(), vec![-10.0, -1.0, 0.0, 1.0, 10.0, 100.0, 1000.0]);
    }

    #[test]
    fn a_loss_plot_with_a_huge_outlier_is_drawn() {
        let dir = std::env::temp_dir().join(format!("consnap-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("loss.svg");
        let series = vec![
            ("cow".to_string(), vec![(0.02, 5.0), (1.0, 5.1), (60.0, -4.1)]),
            ("stop-copy-full".to_string(), vec![(0.02, 3277.0), (1.0, 0.1)]),
        ];
        by_interval(&path, "t", "loss (%)", &series, YAxis::SymLogPercent).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(
            svg.contains("+1000%") && svg.contains("+10%"),
            "decade ticks are labelled"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
