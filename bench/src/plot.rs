//! `--plot FILE.svg`: throughput and latency percentiles over time, one colour per scenario,
//! drawn with plotters' SVG backend (no fonts or system libraries needed).

use crate::report::ScenarioResult;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

/// Picks one latency percentile of a point.
type Pick = fn(&crate::driver::Point) -> f64;

const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("plot: {e}")
}

/// Draws `results` (their per-second series) to an SVG file.
pub(crate) fn draw(path: &Path, results: &[ScenarioResult]) -> Result<()> {
    let series: Vec<&ScenarioResult> = results.iter().filter(|r| !r.series.is_empty()).collect();
    let t_max = series
        .iter()
        .flat_map(|r| r.series.iter().map(|p| p.t_s))
        .fold(1.0f64, f64::max);
    let thr_max = series
        .iter()
        .flat_map(|r| r.series.iter().map(|p| p.throughput_per_s))
        .fold(1.0f64, f64::max)
        * 1.1;
    let lat_max = series
        .iter()
        .flat_map(|r| r.series.iter().map(|p| p.p999_ms.max(p.p99_ms)))
        .fold(0.1f64, f64::max)
        * 1.1;

    let root = SVGBackend::new(path, (1100, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically(400);

    let mut chart = ChartBuilder::on(&top)
        .caption("throughput (exchanges/s) over time", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..t_max, 0f64..thr_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("per second")
        .draw()
        .map_err(err)?;
    for (i, r) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                r.series.iter().map(|p| (p.t_s, p.throughput_per_s)),
                c.stroke_width(2),
            ))
            .map_err(err)?
            .label(r.scenario.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;

    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            "latency per second: p50 (thin), p99 (medium), p99.9 (thick), ms",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..t_max, 0f64..lat_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("ms")
        .draw()
        .map_err(err)?;
    for (i, r) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let lines: [(Pick, u32, &str); 3] = [
            (|p| p.p50_ms, 1, "p50"),
            (|p| p.p99_ms, 2, "p99"),
            (|p| p.p999_ms, 3, "p99.9"),
        ];
        for (f, w, name) in lines {
            chart
                .draw_series(LineSeries::new(
                    r.series.iter().map(|p| (p.t_s, f(p))),
                    c.stroke_width(w),
                ))
                .map_err(err)?
                .label(format!("{} {name}", r.scenario))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(w))
                });
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
