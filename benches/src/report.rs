//! Aggregating per-request measurements into the figures a throughput benchmark reports, the same
//! way for `sluice-bench engine` and `sluice-bench serve`, so their numbers compare directly.
//!
//! The figures and their names follow vLLM's `bench serve`: request and token throughput, mean,
//! median, p90 and p99 of TTFT, TPOT, ITL and E2E, and goodput under service-level objectives.

use std::fmt::Write as _;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

/// How many error messages a summary keeps.
const KEPT_ERRORS: usize = 5;

/// What one request measured.
#[derive(Debug, Clone, Default)]
pub struct RequestResult {
    /// Prompt tokens (0 when the server did not report usage).
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub output_tokens: usize,
    /// Send to first token.
    pub ttft: Duration,
    /// Gaps between consecutive tokens (between content chunks, over HTTP).
    pub itl: Vec<Duration>,
    /// Send to finish.
    pub e2e: Duration,
    /// Times the request was sent again after a 429 or 503.
    pub retries: u32,
    /// The token counts were counted from the content chunks because the stream carried no usage.
    pub tokens_counted: bool,
    /// Error message, if the request failed.
    pub error: Option<String>,
}

impl RequestResult {
    /// Time per output token: `(e2e - ttft) / (output_tokens - 1)`, for requests of 2+ tokens.
    pub fn tpot(&self) -> Option<Duration> {
        let gaps = u32::try_from(self.output_tokens.checked_sub(1)?).ok().filter(|&g| g > 0)?;
        Some(self.e2e.saturating_sub(self.ttft) / gaps)
    }
}

/// Mean and percentiles of a distribution, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Dist {
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}

impl Dist {
    /// From raw durations (empty gives zeros).
    pub fn of(xs: Vec<Duration>) -> Self {
        let mut ms: Vec<f64> = xs.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        if ms.is_empty() {
            return Self::default();
        }
        ms.sort_by(f64::total_cmp);
        Self {
            mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
            p50_ms: percentile(&ms, 50.0),
            p90_ms: percentile(&ms, 90.0),
            p99_ms: percentile(&ms, 99.0),
        }
    }
}

/// The `p`th percentile of sorted, non-empty `xs`, interpolated linearly between the two nearest
/// ranks (numpy's default, which vLLM's reports use).
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    let Some(&last) = xs.last() else { return 0.0 };
    let rank = (xs.len() - 1) as f64 * (p / 100.0).clamp(0.0, 1.0);
    let (lo, frac) = (rank.floor() as usize, rank.fract());
    match xs.get(lo + 1) {
        Some(&hi) => xs[lo] + (hi - xs[lo]) * frac,
        None => last,
    }
}

/// Service-level objectives for goodput: a request counts when it meets every one that is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Slo {
    /// Most time to first token, ms.
    pub ttft_ms: Option<f64>,
    /// Most time per output token, ms.
    pub tpot_ms: Option<f64>,
    /// Most end-to-end latency, ms.
    pub e2e_ms: Option<f64>,
}

impl Slo {
    /// Whether no objective is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Whether a successful request meets every objective (a one-token request has no TPOT to miss).
    pub fn met_by(&self, r: &RequestResult) -> bool {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        self.ttft_ms.is_none_or(|t| ms(r.ttft) <= t)
            && self.e2e_ms.is_none_or(|t| ms(r.e2e) <= t)
            && self.tpot_ms.is_none_or(|t| r.tpot().is_none_or(|d| ms(d) <= t))
    }
}

impl FromStr for Slo {
    type Err = String;

    /// `ttft=500ms,tpot=50ms,e2e=2s`: each value in `ms` or `s` (a bare number is milliseconds).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut slo = Self::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| format!("`{part}` is not KEY=VALUE"))?;
            let v = value.trim();
            let parsed = match (v.strip_suffix("ms"), v.strip_suffix('s')) {
                (Some(n), _) => n.trim().parse::<f64>().ok(),
                (None, Some(n)) => n.trim().parse::<f64>().ok().map(|x| x * 1e3),
                (None, None) => v.parse::<f64>().ok(),
            };
            let ms = parsed
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| format!("`{value}` is not a positive duration such as 500ms or 2s"))?;
            match key.trim() {
                "ttft" => slo.ttft_ms = Some(ms),
                "tpot" => slo.tpot_ms = Some(ms),
                "e2e" | "e2el" => slo.e2e_ms = Some(ms),
                other => return Err(format!("unknown SLO `{other}` (expected ttft, tpot or e2e)")),
            }
        }
        Ok(slo)
    }
}

/// How a run was driven, as the summary reports it.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// What was measured: `engine` or `serve`.
    pub mode: String,
    /// The model: its file in-process, its served name over HTTP.
    pub model: String,
    /// Requests in flight at most (0: no bound).
    pub concurrency: usize,
    /// Open-loop arrival rate in requests/s; `None` for a closed loop.
    pub request_rate: Option<f64>,
    /// Objectives for goodput.
    pub slo: Slo,
}

/// The benchmark's summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// What was measured: `engine` (in-process) or `serve` (over HTTP).
    pub mode: String,
    /// The model: its file in-process, its served name over HTTP.
    pub model: String,
    /// Requests in flight at most: the closed loop's concurrency, or the open loop's cap (0: none).
    pub concurrency: usize,
    /// Open-loop arrival rate, requests/s (`null` for a closed loop).
    pub request_rate: Option<f64>,
    /// Requests that finished.
    pub completed: usize,
    /// Requests that failed.
    pub failed: usize,
    /// Re-sends after a 429 or 503, over all requests.
    pub retries: u64,
    /// Successful requests whose token counts were counted from content chunks (no usage chunk).
    pub counted_without_usage: usize,
    /// Wall time of the whole run, seconds.
    pub duration_s: f64,
    /// Total prompt tokens.
    pub total_input_tokens: usize,
    /// Total generated tokens.
    pub total_output_tokens: usize,
    /// Requests per second.
    pub request_throughput: f64,
    /// Generated tokens per second.
    pub output_throughput: f64,
    /// Prompt plus generated tokens per second.
    pub total_token_throughput: f64,
    /// The objectives goodput is measured under.
    pub slo: Slo,
    /// Requests per second that met every objective (`null` when none is set).
    pub goodput: Option<f64>,
    /// Time to first token.
    pub ttft: Dist,
    /// Time per output token, per request: (e2e - ttft) / (output - 1).
    pub tpot: Dist,
    /// Inter-token latency, over every gap.
    pub itl: Dist,
    /// End-to-end latency.
    pub e2e: Dist,
    /// The first few failures' messages.
    pub errors: Vec<String>,
}

impl Summary {
    /// Aggregates `results` of a run set up as `setup` and measured over `wall`.
    pub fn new(setup: &Setup, results: &[RequestResult], wall: Duration) -> Self {
        let ok: Vec<&RequestResult> = results.iter().filter(|r| r.error.is_none()).collect();
        let secs = wall.as_secs_f64().max(1e-9);
        let input: usize = ok.iter().map(|r| r.prompt_tokens).sum();
        let output: usize = ok.iter().map(|r| r.output_tokens).sum();
        let good = ok.iter().filter(|r| setup.slo.met_by(r)).count();
        Self {
            mode: setup.mode.clone(),
            model: setup.model.clone(),
            concurrency: setup.concurrency,
            request_rate: setup.request_rate,
            completed: ok.len(),
            failed: results.len() - ok.len(),
            retries: results.iter().map(|r| u64::from(r.retries)).sum(),
            counted_without_usage: ok.iter().filter(|r| r.tokens_counted).count(),
            duration_s: secs,
            total_input_tokens: input,
            total_output_tokens: output,
            request_throughput: ok.len() as f64 / secs,
            output_throughput: output as f64 / secs,
            total_token_throughput: (input + output) as f64 / secs,
            slo: setup.slo.clone(),
            goodput: (!setup.slo.is_empty()).then(|| good as f64 / secs),
            ttft: Dist::of(ok.iter().map(|r| r.ttft).collect()),
            tpot: Dist::of(ok.iter().filter_map(|r| r.tpot()).collect()),
            itl: Dist::of(ok.iter().flat_map(|r| r.itl.iter().copied()).collect()),
            e2e: Dist::of(ok.iter().map(|r| r.e2e).collect()),
            errors: results.iter().filter_map(|r| r.error.clone()).take(KEPT_ERRORS).collect(),
        }
    }

    /// A readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let line = |s: &mut String, k: &str, v: String| {
            let _ = writeln!(s, "{k:<34}{v:>14}");
        };
        let _ = writeln!(s, "{:=^48}", format!(" {} benchmark ", self.mode));
        line(&mut s, "Model:", self.model.clone());
        match self.request_rate {
            Some(rate) => line(&mut s, "Request rate (req/s):", format!("{rate:.2}")),
            None => line(&mut s, "Traffic:", "closed loop".into()),
        }
        let cap = if self.concurrency == 0 { "none".to_string() } else { self.concurrency.to_string() };
        line(&mut s, "Concurrency:", cap);
        line(&mut s, "Successful requests:", self.completed.to_string());
        line(&mut s, "Failed requests:", self.failed.to_string());
        line(&mut s, "Retries (429/503):", self.retries.to_string());
        line(&mut s, "Duration (s):", format!("{:.2}", self.duration_s));
        line(&mut s, "Total input tokens:", self.total_input_tokens.to_string());
        line(&mut s, "Total generated tokens:", self.total_output_tokens.to_string());
        line(&mut s, "Request throughput (req/s):", format!("{:.2}", self.request_throughput));
        line(&mut s, "Output token throughput (tok/s):", format!("{:.2}", self.output_throughput));
        line(&mut s, "Total token throughput (tok/s):", format!("{:.2}", self.total_token_throughput));
        if let Some(goodput) = self.goodput {
            line(&mut s, "Request goodput (req/s):", format!("{goodput:.2}"));
        }
        for (name, d) in [("TTFT", &self.ttft), ("TPOT", &self.tpot), ("ITL", &self.itl), ("E2E", &self.e2e)] {
            let _ = writeln!(s, "{:-^48}", format!(" {name} "));
            line(&mut s, &format!("Mean {name} (ms):"), format!("{:.2}", d.mean_ms));
            line(&mut s, &format!("Median {name} (ms):"), format!("{:.2}", d.p50_ms));
            line(&mut s, &format!("P90 {name} (ms):"), format!("{:.2}", d.p90_ms));
            line(&mut s, &format!("P99 {name} (ms):"), format!("{:.2}", d.p99_ms));
        }
        s.push_str(&"=".repeat(48));
        if self.counted_without_usage > 0 {
            let _ = write!(
                s,
                "\nNote: {} of {} requests streamed no usage; their tokens were counted as content chunks \
                 and their prompt tokens are missing.",
                self.counted_without_usage, self.completed
            );
        }
        for e in &self.errors {
            let _ = write!(s, "\nfailed: {e}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.5);
        assert!((percentile(&[1.0, 2.0, 3.0, 4.0], 90.0) - 3.7).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[1.0, 3.0], 100.0), 3.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        let d = Dist::of((1..=100).map(ms).collect());
        assert!((d.p50_ms - 50.5).abs() < 1e-9);
        assert!((d.p99_ms - 99.01).abs() < 1e-9);
        assert!((d.mean_ms - 50.5).abs() < 1e-9);
    }

    #[test]
    fn throughput_tpot_retries_and_failures() {
        let r = RequestResult {
            prompt_tokens: 10,
            output_tokens: 11,
            ttft: ms(100),
            itl: vec![ms(10); 10],
            e2e: ms(200),
            retries: 1,
            ..RequestResult::default()
        };
        let failed = RequestResult { error: Some("boom".into()), retries: 3, ..RequestResult::default() };
        let setup = Setup { mode: "serve".into(), concurrency: 2, ..Setup::default() };
        let s = Summary::new(&setup, &[r.clone(), r, failed], Duration::from_secs(2));
        assert_eq!((s.completed, s.failed, s.retries), (2, 1, 5));
        assert!((s.output_throughput - 11.0).abs() < 1e-9);
        assert!((s.total_token_throughput - 21.0).abs() < 1e-9);
        assert!((s.tpot.p50_ms - 10.0).abs() < 1e-6);
        assert_eq!(s.errors, vec!["boom".to_string()]);
        assert_eq!(s.goodput, None);
        assert!(s.table().contains("failed: boom"));
    }

    #[test]
    fn goodput_counts_requests_meeting_every_slo() {
        let fast = RequestResult { output_tokens: 11, ttft: ms(100), e2e: ms(200), ..RequestResult::default() };
        let slow_first = RequestResult { ttft: ms(900), e2e: ms(1000), ..fast.clone() };
        let slow_decode = RequestResult { e2e: ms(2100), ..fast.clone() };
        let slo: Slo = "ttft=500ms, tpot=0.05s".parse().expect("valid");
        assert_eq!((slo.ttft_ms, slo.tpot_ms, slo.e2e_ms), (Some(500.0), Some(50.0), None));
        let setup = Setup { mode: "serve".into(), slo, ..Setup::default() };
        let s = Summary::new(&setup, &[fast, slow_first, slow_decode], Duration::from_secs(1));
        assert_eq!(s.goodput, Some(1.0));
        assert!(s.table().contains("Request goodput (req/s):"));
    }

    #[test]
    fn bad_slos_are_rejected_with_the_culprit() {
        assert!("ttft".parse::<Slo>().unwrap_err().contains("KEY=VALUE"));
        assert!("ttft=fast".parse::<Slo>().unwrap_err().contains("`fast`"));
        assert!("ttft=-1ms".parse::<Slo>().is_err());
        assert!("itl=5ms".parse::<Slo>().unwrap_err().contains("`itl`"));
        assert_eq!("e2e=2".parse::<Slo>().map(|s| s.e2e_ms), Ok(Some(2.0)));
    }

    #[test]
    fn a_note_says_when_tokens_were_counted_without_usage() {
        let r = RequestResult { output_tokens: 3, tokens_counted: true, ..RequestResult::default() };
        let s = Summary::new(&Setup::default(), &[r], Duration::from_secs(1));
        assert_eq!(s.counted_without_usage, 1);
        assert!(s.table().contains("streamed no usage"));
    }
}
