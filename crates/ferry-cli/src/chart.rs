//! Charts: `accuracy.svg` (test accuracy and loss per round) and the privacy-utility chart of
//! `ferry bench dp`.

use std::{ops::Range, path::Path};

use anyhow::{Result, anyhow};
use ferry_engine::record::RoundRecord;
use plotters::{
    coord::{Shift, types::RangedCoordf64},
    prelude::*,
};

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Draws accuracy (top) and loss (bottom) against the round number.
pub fn draw(path: &Path, rounds: &[RoundRecord], title: &str) -> Result<()> {
    let fail = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| fail(&e))?;
    let (top, bottom) = root.split_vertically(310);
    // Rounds not evaluated centrally (NaN) have no point.
    let accuracy: Vec<(u32, f64)> = rounds
        .iter()
        .map(|r| (r.round, r.accuracy))
        .filter(|p| !p.1.is_nan())
        .collect();
    let loss: Vec<(u32, f64)> = rounds
        .iter()
        .map(|r| (r.round, r.loss))
        .filter(|p| !p.1.is_nan())
        .collect();
    let lowest_accuracy = accuracy.iter().map(|p| p.1).fold(0.9, f64::min);
    let accuracy_floor = (lowest_accuracy - 0.02).clamp(0.0, 0.9);
    let max_loss = loss.iter().map(|p| p.1).fold(1e-3, f64::max) * 1.1;
    panel(&top, "test accuracy", accuracy_floor..1.0, &accuracy, BLUE).map_err(|e| fail(&e))?;
    panel(&bottom, "test loss", 0.0..max_loss, &loss, RED).map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

/// One line chart of `points` (round, value) with markers.
fn panel(
    area: &Area<'_>,
    label: &str,
    range: Range<f64>,
    points: &[(u32, f64)],
    color: RGBColor,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let last = points.last().map_or(2, |p| p.0.max(2));
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(1u32..last, range)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc(label)
        .draw()?;
    chart.draw_series(LineSeries::new(
        points.iter().copied(),
        color.stroke_width(2),
    ))?;
    chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    Ok(())
}

/// Draws final accuracy against epsilon, one marker per noise multiplier (`(z, epsilon,
/// accuracy)`), with the non-private accuracy as a dashed reference line.
pub fn draw_privacy_utility(
    path: &Path,
    points: &[(f64, f64, f64)],
    reference: Option<f64>,
    title: &str,
) -> Result<()> {
    let fail = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let max_eps = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let mut sorted = points.to_vec();
    sorted.sort_by(|a, b| a.1.total_cmp(&b.1));
    let draw = || -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
        let mut chart = captioned(&root, title, 0.0..max_eps, 0.0..1.0)?;
        chart
            .configure_mesh()
            .x_desc("epsilon")
            .y_desc("final test accuracy")
            .draw()?;
        if let Some(acc) = reference {
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, acc), (max_eps, acc)],
                    8,
                    6,
                    BLACK.stroke_width(1),
                ))?
                .label(format!("no privacy: {acc:.3}"))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
        }
        chart
            .draw_series(LineSeries::new(
                sorted.iter().map(|p| (p.1, p.2)),
                BLUE.stroke_width(2),
            ))?
            .label("DP-FedAvg")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
        chart.draw_series(
            sorted
                .iter()
                .map(|p| Circle::new((p.1, p.2), 4, BLUE.filled())),
        )?;
        chart.draw_series(sorted.iter().map(|p| {
            Text::new(
                format!("z={}", p.0),
                (p.1, p.2 + 0.03),
                ("sans-serif", 14).into_font(),
            )
        }))?;
        legend(&mut chart)?;
        root.present()
    };
    draw().map_err(|e| fail(&e))
}

/// Draws one accuracy line per run against a shared x axis (simulated time, or bytes), each
/// run's points `(x, accuracy)` in order, with a legend.
pub fn draw_lines(
    path: &Path,
    runs: &[(String, Vec<(f64, f64)>)],
    x_desc: &str,
    title: &str,
) -> Result<()> {
    let fail = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let points = runs.iter().flat_map(|r| r.1.iter());
    let max_x = points.clone().map(|p| p.0).fold(1.0, f64::max) * 1.02;
    let low = points.map(|p| p.1).fold(0.9, f64::min);
    let floor = (low - 0.02).clamp(0.0, 0.9);
    let colors = [
        BLUE,
        RED,
        GREEN,
        MAGENTA,
        CYAN,
        BLACK,
        RGBColor(230, 140, 0),
        RGBColor(120, 60, 160),
    ];
    let draw = || -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
        let mut chart = captioned(&root, title, 0.0..max_x, floor..1.0)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("test accuracy")
            .draw()?;
        for (i, (name, line)) in runs.iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(line.iter().copied(), color.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
        legend(&mut chart)?;
        root.present()
    };
    draw().map_err(|e| fail(&e))
}

/// The series' names in a box at the lower right.
fn legend<'a, 'b: 'a>(
    chart: &mut ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
}

/// A chart over `x` and `y` with `title` above it, filling `root`.
fn captioned<'a, 'b: 'a>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    title: &str,
    x: Range<f64>,
    y: Range<f64>,
) -> Result<
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    DrawingAreaErrorKind<std::io::Error>,
> {
    ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x, y)
}
