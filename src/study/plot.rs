//! The study's plots, each as PNG and SVG (plotters): accuracy vs ε per method
//! with ±1 std error bars, accuracy vs keep_frac, accuracy vs visual tokens, and
//! peak memory and step time per method. Text is drawn with the committed Open
//! Sans subset (`src/study/font/`) through ab_glyph, so no system font is needed.
use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use super::report::{epsilon_series, keep_frac_series, nonprivate, resources, token_series, Point};
use super::results::{Record, StudyFile};
use super::stats::Summary;
use crate::train::method::Method;
use crate::{Error, Result};

/// The font every plot's text is drawn with.
static FONT: &[u8] = include_bytes!("font/OpenSans-Subset.ttf");
/// The family name the plots ask for.
const FAMILY: &str = "sans-serif";
static REGISTER: Once = Once::new();

/// Pixel size of every plot.
const SIZE: (u32, u32) = (800, 500);

fn register_font() -> Result<()> {
    let mut ok = true;
    REGISTER.call_once(|| {
        ok = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok();
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Internal(
            "the committed plot font src/study/font/OpenSans-Subset.ttf does not parse".into(),
        ))
    }
}

/// A method's colour, the same in every plot.
fn colour(m: Method) -> RGBColor {
    match m {
        Method::Nonprivate => RGBColor(90, 90, 90),
        Method::Dpsgd => RGBColor(31, 119, 180),
        Method::Ghost => RGBColor(44, 160, 44),
        Method::Dualpriv => RGBColor(214, 39, 40),
        Method::Dpzo => RGBColor(148, 103, 189),
    }
}

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Writes `name.png` and `name.svg` in `dir`, running the drawing code `body` once
/// on each backend (a macro: the code is generic over the backend, a closure is not).
macro_rules! both {
    ($dir:expr, $name:expr, |$root:ident| $body:block) => {{
        let (dir, name): (&Path, &str) = ($dir, $name);
        let err = |what: &str, e: String| Error::Io {
            path: dir.join(format!("{name}.{what}")).display().to_string(),
            message: format!("drawing the plot failed: {e}"),
        };
        let svg = dir.join(format!("{name}.svg"));
        {
            let $root = SVGBackend::new(&svg, SIZE).into_drawing_area();
            let r: DrawResult<SVGBackend> = (|| $body)();
            r.map_err(|e| err("svg", e.to_string()))?;
        }
        let mut buf = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
        {
            let $root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
            let r: DrawResult<BitMapBackend> = (|| $body)();
            r.map_err(|e| err("png", e.to_string()))?;
        }
        let png = dir.join(format!("{name}.png"));
        image::save_buffer(&png, &buf, SIZE.0, SIZE.1, image::ColorType::Rgb8).map_err(|e| {
            Error::Io {
                path: png.display().to_string(),
                message: format!("writing the PNG failed: {e}"),
            }
        })?;
    }};
}

/// The y range that holds every mean ± std of `pts` (and `extra`), padded.
fn y_range<'a>(pts: impl Iterator<Item = &'a Summary>) -> std::ops::Range<f64> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for s in pts {
        let sd = if s.std.is_finite() { s.std } else { 0.0 };
        lo = lo.min(s.mean - sd);
        hi = hi.max(s.mean + sd);
    }
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.15).max(0.01);
    (lo - pad).max(0.0)..(hi + pad).min(1.0)
}

/// The label of category tick `v` (categories sit at x = 0, 1, …): its name at an
/// integer, nothing between.
fn category_label(v: f64, names: &[String]) -> String {
    let i = v.round();
    if (v - i).abs() < 1e-6 && i >= 0.0 {
        names.get(i as usize).cloned().unwrap_or_default()
    } else {
        String::new()
    }
}

fn bar(s: &Summary) -> (f64, f64) {
    let sd = if s.std.is_finite() { s.std } else { 0.0 };
    (s.mean - sd, s.mean + sd)
}

/// Draws one accuracy-vs-x series with error bars.
fn series<DB: DrawingBackend, CT>(
    chart: &mut ChartContext<'_, DB, CT>,
    pts: &[Point],
    c: RGBColor,
    name: &str,
) -> DrawResult<DB>
where
    CT: CoordTranslate<From = (f64, f64)>,
{
    chart
        .draw_series(LineSeries::new(
            pts.iter().map(|(x, s)| (*x, s.mean)),
            c.stroke_width(2),
        ))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    chart.draw_series(pts.iter().map(|(x, s)| {
        let (lo, hi) = bar(s);
        ErrorBar::new_vertical(*x, lo, s.mean, hi, c.filled(), 8)
    }))?;
    Ok(())
}

/// Draws the legend of `chart` in its lower right corner.
fn legend<'a, DB: DrawingBackend + 'a, CT>(chart: &mut ChartContext<'a, DB, CT>) -> DrawResult<DB>
where
    CT: CoordTranslate<From = (f64, f64)>,
{
    chart
        .configure_series_labels()
        .label_font((FAMILY, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    Ok(())
}

/// Writes every plot the records support into `dir`; returns the (file stem,
/// title) of each one written.
pub fn write_all(
    dir: &Path,
    study: &StudyFile,
    records: &[Record],
) -> Result<Vec<(&'static str, &'static str)>> {
    register_font()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::Io {
        path: dir.display().to_string(),
        message: e.to_string(),
    })?;
    let mut made = Vec::new();
    let abl_eps = study.plan.ablation_epsilons.first().copied();

    let eps = epsilon_series(study, records);
    let np = nonprivate(study, records);
    if eps.iter().any(|(_, p)| !p.is_empty()) {
        // ε levels as categories (1, 3, 8, ∞) at x = 0, 1, 2, …; each method
        // dodged a little sideways so equal values stay visible.
        let levels = &study.plan.epsilons;
        let mut names: Vec<String> = levels.iter().map(|e| format!("ε = {e}")).collect();
        names.push("ε = ∞ (nonprivate)".into());
        let at = |e: f64| {
            levels
                .iter()
                .position(|&l| l == e)
                .map_or(0.0, |i| i as f64)
        };
        let k = eps.len().max(1) as f64;
        let yr = y_range(
            eps.iter()
                .flat_map(|(_, p)| p.iter().map(|(_, s)| s))
                .chain((np.n > 0).then_some(&np)),
        );
        let fmt = |v: &f64| category_label(*v, &names);
        both!(dir, "accuracy_vs_epsilon", |root| {
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    "Test accuracy vs ε (mean ± 1 std over repetitions)",
                    (FAMILY, 22),
                )
                .margin(12)
                .x_label_area_size(45)
                .y_label_area_size(60)
                .build_cartesian_2d(-0.5..names.len() as f64 - 0.5, yr.clone())?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(names.len())
                .x_label_formatter(&fmt)
                .x_desc("privacy level (δ = 1e-5)")
                .y_desc("test accuracy")
                .label_style((FAMILY, 15))
                .draw()?;
            for (j, (m, pts)) in eps.iter().enumerate() {
                let dx = 0.16 * (j as f64 - (k - 1.0) / 2.0) / k.max(2.0) * 2.0;
                let moved: Vec<Point> = pts.iter().map(|(e, s)| (at(*e) + dx, *s)).collect();
                series(&mut chart, &moved, colour(*m), &m.to_string())?;
            }
            if np.n > 0 {
                let c = colour(Method::Nonprivate);
                let (lo, hi) = bar(&np);
                let x = levels.len() as f64;
                chart
                    .draw_series([ErrorBar::new_vertical(x, lo, np.mean, hi, c.filled(), 8)])?
                    .label("nonprivate (ε = ∞)")
                    .legend(move |(x, y)| Circle::new((x + 10, y), 4, c.filled()));
            }
            legend(&mut chart)?;
            root.present()
        });
        made.push(("accuracy_vs_epsilon", "accuracy vs ε per method"));
    }

    if let Some(e) = abl_eps {
        let kf = keep_frac_series(study, records, e);
        if kf.len() > 1 {
            let yr = y_range(kf.iter().map(|(_, s)| s));
            both!(dir, "accuracy_vs_keep_frac", |root| {
                root.fill(&WHITE)?;
                let mut chart = ChartBuilder::on(&root)
                    .caption(
                        format!("dualpriv at ε = {e}: accuracy vs keep_frac"),
                        (FAMILY, 22),
                    )
                    .margin(12)
                    .x_label_area_size(45)
                    .y_label_area_size(60)
                    .build_cartesian_2d(0.0..1.05, yr.clone())?;
                chart
                    .configure_mesh()
                    .x_desc("keep_frac (fraction of coordinates updated per step)")
                    .y_desc("test accuracy")
                    .label_style((FAMILY, 15))
                    .draw()?;
                series(&mut chart, &kf, colour(Method::Dualpriv), "dualpriv")?;
                root.present()
            });
            made.push(("accuracy_vs_keep_frac", "dualpriv accuracy vs keep_frac"));
        }

        let (tk, none) = token_series(study, records, e);
        if tk.len() > 1 {
            let yr = y_range(
                tk.iter()
                    .map(|(_, s)| s)
                    .chain(none.as_ref().map(|(_, s)| s)),
            );
            both!(dir, "accuracy_vs_visual_tokens", |root| {
                root.fill(&WHITE)?;
                let mut chart = ChartBuilder::on(&root)
                    .caption(
                        format!("dualpriv at ε = {e}: accuracy vs visual tokens"),
                        (FAMILY, 22),
                    )
                    .margin(12)
                    .x_label_area_size(45)
                    .y_label_area_size(60)
                    .build_cartesian_2d(2.0..18.0, yr.clone())?;
                chart
                    .configure_mesh()
                    .x_desc("visual tokens per example (CLS + K + M)")
                    .y_desc("test accuracy")
                    .label_style((FAMILY, 15))
                    .draw()?;
                let c = colour(Method::Dualpriv);
                series(&mut chart, &tk, c, "token pruning (CLS + K + M)")?;
                if let Some((x, s)) = &none {
                    let g = colour(Method::Ghost);
                    let (lo, hi) = bar(s);
                    chart
                        .draw_series([ErrorBar::new_vertical(*x, lo, s.mean, hi, g.filled(), 8)])?
                        .label("no token pruning (all patches)")
                        .legend(move |(x, y)| Circle::new((x + 10, y), 4, g.filled()));
                }
                legend(&mut chart)?;
                root.present()
            });
            made.push((
                "accuracy_vs_visual_tokens",
                "dualpriv accuracy vs visual tokens",
            ));
        }
    }

    let res: Vec<_> = resources(study, records)
        .into_iter()
        .filter(|r| r.runs > 0)
        .collect();
    if !res.is_empty() {
        let panels: [(&str, Vec<(Method, Summary)>); 2] = [
            (
                "peak MiB (model + training)",
                res.iter().map(|r| (r.method, r.model_peak_mib)).collect(),
            ),
            (
                "median step time, s",
                res.iter().map(|r| (r.method, r.step_seconds)).collect(),
            ),
        ];
        both!(dir, "memory_time", |root| {
            root.fill(&WHITE)?;
            let root = root.titled("Peak memory and step time per method", (FAMILY, 22))?;
            let (l, r) = root.split_horizontally(SIZE.0 / 2);
            for (area, (title, vals)) in [l, r].iter().zip(&panels) {
                let n = vals.len();
                let top = vals
                    .iter()
                    .map(|(_, s)| bar(s).1)
                    .filter(|v| v.is_finite())
                    .fold(0.0f64, f64::max)
                    * 1.15;
                let top = if top > 0.0 { top } else { 1.0 };
                let mut chart = ChartBuilder::on(area)
                    .margin(12)
                    .x_label_area_size(40)
                    .y_label_area_size(60)
                    .caption(*title, (FAMILY, 16))
                    .build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..top)?;
                let names: Vec<String> = vals.iter().map(|(m, _)| m.to_string()).collect();
                chart
                    .configure_mesh()
                    .disable_x_mesh()
                    .x_labels(n)
                    .label_style((FAMILY, 13))
                    .x_label_formatter(&|v| category_label(*v, &names))
                    .draw()?;
                chart.draw_series(vals.iter().enumerate().map(|(i, (m, s))| {
                    let mean = if s.mean.is_finite() { s.mean } else { 0.0 };
                    let x = i as f64;
                    Rectangle::new([(x - 0.35, 0.0), (x + 0.35, mean)], colour(*m).filled())
                }))?;
                chart.draw_series(vals.iter().enumerate().filter(|(_, (_, s))| s.n > 1).map(
                    |(i, (_, s))| {
                        let (lo, hi) = bar(s);
                        ErrorBar::new_vertical(i as f64, lo, s.mean, hi, BLACK.filled(), 8)
                    },
                ))?;
            }
            root.present()
        });
        made.push(("memory_time", "peak memory and step time per method"));
    }
    Ok(made)
}
