//! `graft jobs plot`: training and validation loss (or an objective's step metrics, such
//! as an RL job's reward and KL) against the step, as a PNG with axes, labels and a legend. The text is drawn with DejaVu Sans embedded in the binary, so the
//! command needs no system font.

use std::{path::Path, sync::Once};

use plotters::prelude::*;

pub const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
pub const EVAL_COLOR: RGBColor = RGBColor(255, 127, 14);

fn register_font() -> anyhow::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        )
        .map_err(|_| anyhow::anyhow!("the embedded font does not load"));
    });
    result
}

/// Draws `train` and `eval` (step, loss) series into `out` (800 x 480 PNG) under `title`;
/// returns the plotted ranges `(max step, min loss, max loss)`.
pub fn loss_png(
    title: &str,
    train: &[(f64, f64)],
    eval: &[(f64, f64)],
    out: &Path,
) -> anyhow::Result<(f64, f64, f64)> {
    anyhow::ensure!(
        !train.is_empty() || !eval.is_empty(),
        "the job has no loss to plot yet"
    );
    series_png(
        title,
        "loss",
        &[(train, "training", false), (eval, "validation", true)],
        out,
    )
}

/// The colours of a plot's series, in order.
const COLORS: [RGBColor; 4] = [
    TRAIN_COLOR,
    EVAL_COLOR,
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// One series of a plot: its (step, value) points, its label, whether each point gets a dot.
pub type Series<'a> = (&'a [(f64, f64)], &'a str, bool);

/// Draws `(points, label, marked)` series (step, value) into `out` (800 x 480 PNG) with
/// `y` as the value axis' name; marked series get a dot per point. Returns the plotted
/// ranges `(max step, min value, max value)`.
pub fn series_png(
    title: &str,
    y: &str,
    series: &[Series<'_>],
    out: &Path,
) -> anyhow::Result<(f64, f64, f64)> {
    anyhow::ensure!(
        series.iter().any(|s| !s.0.is_empty()),
        "the job has no {y} to plot yet"
    );
    register_font()?;
    let all = series.iter().flat_map(|s| s.0.iter());
    let max_step = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = all
        .map(|p| p.1)
        .filter(|l| l.is_finite())
        .fold((f64::MAX, f64::MIN), |(a, b), l| (a.min(l), b.max(l)));
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let (lo, hi) = (lo - pad, hi + pad);
    let root = BitMapBackend::new(out, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..max_step, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(y)
        .light_line_style(RGBColor(235, 235, 235))
        .label_style(("sans-serif", 14))
        .draw()?;
    for (&(points, label, marked), color) in series.iter().zip(COLORS.iter().cycle()) {
        if points.is_empty() {
            continue;
        }
        let color = *color;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        if marked {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok((max_step, lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_both_curves_into_a_png() {
        let dir = std::env::temp_dir().join(format!("graft-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let out = dir.join("loss.png");
        let train: Vec<(f64, f64)> = (1..=50)
            .map(|s| (s as f64, 3.0 / (s as f64).sqrt()))
            .collect();
        let eval = vec![(10.0, 1.2), (20.0, 0.9), (50.0, 0.7)];
        let (max_step, lo, hi) = loss_png("Loss", &train, &eval, &out).expect("plot");
        assert_eq!(max_step, 50.0);
        assert!(lo < 0.43 && hi > 3.0);
        let bytes = std::fs::read(&out).expect("png");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // Width and height from the IHDR chunk.
        assert_eq!(
            u32::from_be_bytes(bytes[16..20].try_into().expect("w")),
            800
        );
        assert_eq!(
            u32::from_be_bytes(bytes[20..24].try_into().expect("h")),
            480
        );
        assert!(loss_png("Loss", &[], &[], &out).is_err());
    }
}
