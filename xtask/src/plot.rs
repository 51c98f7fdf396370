//! The bench's migration curves: remaining bytes and the guest's dirty rate (post-copy:
//! its work rate) over time, ours and QEMU's, as SVG.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use crate::run::Run;

/// Draws one scenario: remaining MiB (left) and dirty pages/s (right) over time.
///
/// # Errors
/// The file cannot be written.
pub fn scenario(path: &Path, title: &str, ours: Option<&Run>, qemu: Option<&Run>) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 380)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 18))?;
    let (left, right) = root.split_horizontally(500);
    let runs: Vec<(&Run, RGBColor, &str)> = [(ours, BLUE, "ours"), (qemu, RED, "QEMU")]
        .into_iter()
        .filter_map(|(r, c, n)| r.map(|r| (r, c, n)))
        .collect();
    let tmax = runs
        .iter()
        .flat_map(|(r, _, _)| r.series.iter().map(|p| p.0))
        .fold(100.0, f64::max);
    // Post-copy: the guest's own work rate says more than its dirty rate (it runs at the
    // destination after the switch, waiting for pages it lacks).
    let postcopy = runs.iter().any(|(r, _, _)| r.postcopy.is_some());
    let right_label = if postcopy {
        "guest passes/s (where it runs)"
    } else {
        "guest dirty rate (kpages/s)"
    };
    for (area, label, value) in [
        (&left, "remaining (MiB)", 0usize),
        (&right, right_label, 1usize),
    ] {
        let points = |r: &Run| -> Vec<(f64, f64)> {
            match (value, &r.postcopy) {
                (0, _) => r
                    .series
                    .iter()
                    .map(|p| (p.0, p.1 as f64 / (1 << 20) as f64))
                    .collect(),
                (_, Some(pc)) => work_rate(&pc.work),
                _ => r.series.iter().map(|p| (p.0, p.2 as f64 / 1e3)).collect(),
            }
        };
        let ymax = runs
            .iter()
            .flat_map(|(r, _, _)| points(r).into_iter().map(|p| p.1))
            .fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(area)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..tmax, 0.0..ymax * 1.05)?;
        chart
            .configure_mesh()
            .x_desc("ms since migrate")
            .y_desc(label)
            .draw()?;
        for (r, color, name) in &runs {
            chart
                .draw_series(LineSeries::new(points(r), color.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Passes per second from (ms, passes so far) samples, over windows of 200 ms at least.
fn work_rate(samples: &[(f64, u64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut from = 0;
    for (i, &(t, n)) in samples.iter().enumerate() {
        let (t0, n0) = samples[from];
        if t - t0 >= 200.0 {
            out.push((t, n.saturating_sub(n0) as f64 / ((t - t0) / 1e3)));
            from = i;
        }
    }
    out
}

/// Draws total time against guest size: one line per side through the medians, every
/// round as a dot. `points` are (side, GiB, total ms).
///
/// # Errors
/// The file cannot be written.
pub fn scaling(path: &Path, points: &[(&str, f64, f64)]) -> Result<()> {
    let root = SVGBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let xmax = points.iter().map(|p| p.1).fold(1.0, f64::max);
    let ymax = points.iter().map(|p| p.2).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption("fill: total time by guest size", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..xmax * 1.05, 0.0..ymax * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("guest GiB")
        .y_desc("total ms")
        .draw()?;
    for (side, color, name) in [("ours", BLUE, "ours"), ("qemu", RED, "QEMU")] {
        let mine: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.0 == side)
            .map(|p| (p.1, p.2))
            .collect();
        let mut sizes: Vec<f64> = mine.iter().map(|p| p.0).collect();
        sizes.sort_by(f64::total_cmp);
        sizes.dedup();
        let medians: Vec<(f64, f64)> = sizes
            .iter()
            .filter_map(|&g| {
                let at: Vec<f64> = mine.iter().filter(|p| p.0 == g).map(|p| p.1).collect();
                crate::stats::median(&at).map(|m| (g, m))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(medians, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(mine.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
