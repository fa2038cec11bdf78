//! `accuracy.svg`: test accuracy and loss per round.

use std::path::Path;

use anyhow::{Result, anyhow};
use ferry_engine::record::RoundRecord;
use plotters::prelude::*;

/// Draws accuracy (top) and loss (bottom) against the round number.
pub fn draw(path: &Path, rounds: &[RoundRecord], title: &str) -> Result<()> {
    let fail = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| fail(&e))?;
    let (top, bottom) = root.split_vertically(310);
    let last = rounds.last().map_or(1, |r| r.round).max(1);
    let acc_lo = rounds
        .iter()
        .map(|r| r.accuracy)
        .fold(1.0, f64::min)
        .min(0.9)
        .max(0.0);
    let max_loss = rounds.iter().map(|r| r.loss).fold(0.0, f64::max).max(1e-3) * 1.1;
    let panels: [(
        &DrawingArea<_, _>,
        &str,
        std::ops::Range<f64>,
        fn(&RoundRecord) -> f64,
        RGBColor,
    ); 2] = [
        (
            &top,
            "test accuracy",
            (acc_lo - 0.02).max(0.0)..1.0,
            |r| r.accuracy,
            BLUE,
        ),
        (&bottom, "test loss", 0.0..max_loss, |r| r.loss, RED),
    ];
    for (area, label, range, value, color) in panels {
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(1u32..last.max(2), range)
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .x_desc("round")
            .y_desc(label)
            .draw()
            .map_err(|e| fail(&e))?;
        chart
            .draw_series(LineSeries::new(
                rounds.iter().map(|r| (r.round, value(r))),
                color.stroke_width(2),
            ))
            .map_err(|e| fail(&e))?;
        chart
            .draw_series(
                rounds
                    .iter()
                    .map(|r| Circle::new((r.round, value(r)), 3, color.filled())),
            )
            .map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}
