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

/// Plot `series` against the interval (seconds, log scale) into `path`.
/// `log_y` for values spanning decades (pauses).
pub fn by_interval(path: &Path, title: &str, y_desc: &str, series: &[Series], log_y: bool) -> Result<(), PlotError> {
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
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("snapshot interval (s)")
                .y_desc(y_desc)
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
    if log_y {
        let lo = (y0.max(1e-3)) / 1.5;
        let chart = b
            .build_cartesian_2d(xr, (lo..y1.max(lo * 2.0) * 1.5).log_scale())
            .map_err(err)?;
        draw!(chart);
    } else {
        let lo = y0.min(0.0);
        let hi = if y1 > lo { y1 + (y1 - lo) * 0.1 } else { lo + 1.0 };
        let chart = b.build_cartesian_2d(xr, lo..hi).map_err(err)?;
        draw!(chart);
    }
    root.present().map_err(err)
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
