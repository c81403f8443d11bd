//! `--plot out.svg` (or `.png`): throughput against latency across the runs of a sweep, and the
//! latency distributions of each run.
//!
//! Four panels: TTFT p50/p99 and TPOT p50/p99 against output throughput (one point per run,
//! labelled with its concurrency or rate), and the CDFs of E2E latency and TTFT (one line per run).
//! Text is laid out with a TrueType font found on the system (DejaVu, Liberation, Noto, Arial...)
//! or named by `SLUICE_BENCH_FONT`.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::{RequestResult, Summary};

/// Fonts tried in turn when `SLUICE_BENCH_FONT` is not set.
const FONTS: [&str; 9] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// One run of a sweep: its summary and its requests.
pub type Run = (Summary, Vec<RequestResult>);

/// Draws `runs` into `path`, SVG or PNG by its extension.
pub fn write(path: &Path, runs: &[Run]) -> anyhow::Result<()> {
    let size = (1280, 960);
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("svg") => {
            load_font()?;
            draw(SVGBackend::new(path, size).into_drawing_area(), runs).map_err(|e| anyhow!("drawing: {e}"))
        }
        Some("png") => {
            load_font()?;
            draw(BitMapBackend::new(path, size).into_drawing_area(), runs).map_err(|e| anyhow!("drawing: {e}"))
        }
        _ => bail!("`--plot` must end in .svg or .png, got {}", path.display()),
    }
}

/// Registers a system font as `sans-serif`, once per process.
fn load_font() -> anyhow::Result<()> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    let loaded = LOADED.get_or_init(|| {
        let chosen = std::env::var("SLUICE_BENCH_FONT").ok();
        let candidates: Vec<&str> = match &chosen {
            Some(path) => vec![path.as_str()],
            None => FONTS.to_vec(),
        };
        for path in &candidates {
            let Ok(bytes) = std::fs::read(path) else { continue };
            // The font registry keeps `'static` references; one font per process is leaked on purpose.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return Ok(());
            }
        }
        Err(format!(
            "no TrueType font found for the plot's text (tried {}); set SLUICE_BENCH_FONT=/path/to/font.ttf",
            candidates.join(", ")
        ))
    });
    loaded.clone().map_err(|e| anyhow!(e))
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, runs: &[Run]) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 2));
    let point = |s: &Summary, y: f64| (s.output_throughput, y);
    let ttft = [
        ("TTFT p50", runs.iter().map(|(s, _)| point(s, s.ttft.p50_ms)).collect::<Vec<_>>()),
        ("TTFT p99", runs.iter().map(|(s, _)| point(s, s.ttft.p99_ms)).collect()),
    ];
    let tpot = [
        ("TPOT p50", runs.iter().map(|(s, _)| point(s, s.tpot.p50_ms)).collect::<Vec<_>>()),
        ("TPOT p99", runs.iter().map(|(s, _)| point(s, s.tpot.p99_ms)).collect()),
    ];
    let labels: Vec<String> = runs.iter().map(|(s, _)| label(s)).collect();
    versus_throughput(&panels[0], "Time to first token vs throughput", &ttft, &labels)?;
    versus_throughput(&panels[1], "Time per output token vs throughput", &tpot, &labels)?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let e2e: Vec<(String, Vec<f64>)> = runs
        .iter()
        .map(|(s, rs)| (label(s), rs.iter().filter(|r| r.error.is_none()).map(|r| ms(r.e2e)).collect()))
        .collect();
    let first: Vec<(String, Vec<f64>)> = runs
        .iter()
        .map(|(s, rs)| (label(s), rs.iter().filter(|r| r.error.is_none()).map(|r| ms(r.ttft)).collect()))
        .collect();
    cdf(&panels[2], "End-to-end latency (CDF)", &e2e)?;
    cdf(&panels[3], "Time to first token (CDF)", &first)?;
    root.present()
}

/// A run's name on the plot: its concurrency, or its rate (and cap) for an open loop.
fn label(s: &Summary) -> String {
    match (s.request_rate, s.concurrency) {
        (Some(rate), 0) => format!("{rate} req/s"),
        (Some(rate), cap) => format!("{rate} req/s, cap {cap}"),
        (None, c) => format!("c={c}"),
    }
}

/// The upper end of an axis holding `values`.
fn top(values: impl Iterator<Item = f64>) -> f64 {
    let max = values.filter(|v| v.is_finite()).fold(0.0, f64::max);
    if max > 0.0 {
        max * 1.15
    } else {
        1.0
    }
}

fn versus_throughput<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    labels: &[String],
) -> DrawResult<DB> {
    let all = || series.iter().flat_map(|(_, pts)| pts.iter());
    let (x_max, y_max) = (top(all().map(|p| p.0)), top(all().map(|p| p.1)));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart.configure_mesh().x_desc("output tokens/s").y_desc("ms").draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    if let Some((_, pts)) = series.first() {
        let text = ("sans-serif", 13).into_font();
        chart.draw_series(pts.iter().zip(labels).map(|(&p, l)| Text::new(l.clone(), p, text.clone())))?;
    }
    // Latency grows with throughput, so the upper left stays clear of the lines.
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

fn cdf<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, title: &str, runs: &[(String, Vec<f64>)]) -> DrawResult<DB> {
    let x_max = top(runs.iter().flat_map(|(_, xs)| xs.iter().copied()));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..1.0)?;
    chart.configure_mesh().x_desc("ms").y_desc("fraction of requests").draw()?;
    for (i, (name, xs)) in runs.iter().enumerate() {
        let mut xs = xs.clone();
        xs.sort_by(f64::total_cmp);
        let n = xs.len() as f64;
        // A step function: the fraction at or below each measured value.
        let steps = xs.iter().enumerate().flat_map(|(k, &x)| [(x, k as f64 / n), (x, (k + 1) as f64 / n)]);
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(steps, color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::report::Setup;

    fn run(concurrency: usize, scale: u64) -> Run {
        let results: Vec<RequestResult> = (1..=20)
            .map(|i| RequestResult {
                prompt_tokens: 40,
                output_tokens: 16,
                ttft: Duration::from_millis(scale * i),
                itl: vec![Duration::from_millis(scale); 15],
                e2e: Duration::from_millis(scale * (i + 15)),
                ..RequestResult::default()
            })
            .collect();
        let setup = Setup { mode: "serve".into(), concurrency, ..Setup::default() };
        (Summary::new(&setup, &results, Duration::from_secs(2 * scale)), results)
    }

    #[test]
    fn a_sweep_draws_to_svg_and_png_and_other_extensions_are_refused() {
        let dir = std::env::temp_dir().join(format!("sluice-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let runs = [run(1, 10), run(8, 20), run(32, 40)];
        let svg = dir.join("sweep.svg");
        write(&svg, &runs).expect("draws an SVG");
        let text = std::fs::read_to_string(&svg).expect("written");
        assert!(text.starts_with("<svg") && text.contains("Time to first token vs throughput"));
        assert!(text.contains("c=8") && text.contains("TPOT p99") && text.contains("End-to-end latency (CDF)"));
        let png = dir.join("sweep.PNG");
        write(&png, &runs[..1]).expect("draws a PNG");
        assert!(std::fs::read(&png).expect("written").starts_with(b"\x89PNG"));
        assert!(write(&dir.join("sweep.pdf"), &runs).unwrap_err().to_string().contains(".svg or .png"));
        std::fs::remove_dir_all(&dir).expect("cleaned up");
    }
}
