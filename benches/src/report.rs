//! Aggregating per-request measurements into the figures a throughput benchmark reports.

use std::time::Duration;

use serde::Serialize;

/// What one request measured.
#[derive(Debug, Clone, Default)]
pub struct RequestResult {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub output_tokens: usize,
    /// Send to first token.
    pub ttft: Duration,
    /// Gaps between consecutive tokens.
    pub itl: Vec<Duration>,
    /// Send to finish.
    pub e2e: Duration,
    /// Error message, if the request failed.
    pub error: Option<String>,
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
    pub fn of(mut xs: Vec<Duration>) -> Self {
        if xs.is_empty() {
            return Self::default();
        }
        xs.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let pct = |p: f64| ms(xs[((xs.len() - 1) as f64 * p).round() as usize]);
        Self {
            mean_ms: xs.iter().map(|d| ms(*d)).sum::<f64>() / xs.len() as f64,
            p50_ms: pct(0.5),
            p90_ms: pct(0.9),
            p99_ms: pct(0.99),
        }
    }
}

/// The benchmark's summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// What was measured (e.g. `engine`).
    pub mode: String,
    /// Concurrent requests in the closed loop.
    pub concurrency: usize,
    /// Requests that finished.
    pub completed: usize,
    /// Requests that failed.
    pub failed: usize,
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
    /// Time to first token.
    pub ttft: Dist,
    /// Time per output token, per request: (e2e - ttft) / (output - 1).
    pub tpot: Dist,
    /// Inter-token latency, over every gap.
    pub itl: Dist,
    /// End-to-end latency.
    pub e2e: Dist,
}

impl Summary {
    /// Aggregates `results` measured over `wall`.
    pub fn new(mode: &str, concurrency: usize, results: &[RequestResult], wall: Duration) -> Self {
        let ok: Vec<&RequestResult> = results.iter().filter(|r| r.error.is_none()).collect();
        let secs = wall.as_secs_f64().max(1e-9);
        let input: usize = ok.iter().map(|r| r.prompt_tokens).sum();
        let output: usize = ok.iter().map(|r| r.output_tokens).sum();
        let tpot = ok
            .iter()
            .filter(|r| r.output_tokens > 1)
            .map(|r| r.e2e.saturating_sub(r.ttft) / (r.output_tokens as u32 - 1))
            .collect();
        Self {
            mode: mode.to_string(),
            concurrency,
            completed: ok.len(),
            failed: results.len() - ok.len(),
            duration_s: secs,
            total_input_tokens: input,
            total_output_tokens: output,
            request_throughput: ok.len() as f64 / secs,
            output_throughput: output as f64 / secs,
            total_token_throughput: (input + output) as f64 / secs,
            ttft: Dist::of(ok.iter().map(|r| r.ttft).collect()),
            tpot: Dist::of(tpot),
            itl: Dist::of(ok.iter().flat_map(|r| r.itl.iter().copied()).collect()),
            e2e: Dist::of(ok.iter().map(|r| r.e2e).collect()),
        }
    }

    /// A readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let line = |s: &mut String, k: &str, v: String| s.push_str(&format!("{k:<34}{v:>14}\n"));
        s.push_str(&format!("{:=^48}\n", format!(" {} benchmark ", self.mode)));
        line(&mut s, "Concurrency:", self.concurrency.to_string());
        line(&mut s, "Successful requests:", self.completed.to_string());
        line(&mut s, "Failed requests:", self.failed.to_string());
        line(&mut s, "Duration (s):", format!("{:.2}", self.duration_s));
        line(&mut s, "Total input tokens:", self.total_input_tokens.to_string());
        line(&mut s, "Total generated tokens:", self.total_output_tokens.to_string());
        line(&mut s, "Request throughput (req/s):", format!("{:.2}", self.request_throughput));
        line(&mut s, "Output token throughput (tok/s):", format!("{:.2}", self.output_throughput));
        line(&mut s, "Total token throughput (tok/s):", format!("{:.2}", self.total_token_throughput));
        for (name, d) in [("TTFT", &self.ttft), ("TPOT", &self.tpot), ("ITL", &self.itl), ("E2E", &self.e2e)] {
            s.push_str(&format!("{:-^48}\n", format!(" {name} ")));
            line(&mut s, &format!("Mean {name} (ms):"), format!("{:.2}", d.mean_ms));
            line(&mut s, &format!("Median {name} (ms):"), format!("{:.2}", d.p50_ms));
            line(&mut s, &format!("P90 {name} (ms):"), format!("{:.2}", d.p90_ms));
            line(&mut s, &format!("P99 {name} (ms):"), format!("{:.2}", d.p99_ms));
        }
        s.push_str(&"=".repeat(48));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_throughput() {
        let d = Dist::of((1..=100).map(Duration::from_millis).collect());
        assert_eq!(d.p50_ms.round(), 51.0);
        assert_eq!(d.p99_ms.round(), 99.0);
        assert!((d.mean_ms - 50.5).abs() < 1e-9);
        let r = RequestResult {
            prompt_tokens: 10,
            output_tokens: 11,
            ttft: Duration::from_millis(100),
            itl: vec![Duration::from_millis(10); 10],
            e2e: Duration::from_millis(200),
            error: None,
        };
        let failed = RequestResult { error: Some("boom".into()), ..RequestResult::default() };
        let s = Summary::new("engine", 2, &[r.clone(), r, failed], Duration::from_secs(2));
        assert_eq!((s.completed, s.failed), (2, 1));
        assert!((s.output_throughput - 11.0).abs() < 1e-9);
        assert!((s.tpot.p50_ms - 10.0).abs() < 1e-6);
    }
}
