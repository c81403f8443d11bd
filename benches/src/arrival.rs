//! Open-loop arrival schedules: when each request is sent, independent of when others finish.
//!
//! As in vLLM's `bench serve`: inter-arrival gaps are drawn from a gamma distribution of shape
//! `burstiness` and mean `1 / rate`. Burstiness 1 gives exponential gaps (a Poisson process); below
//! 1 arrivals bunch up, above 1 they are more even.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};

/// Send times, as offsets from the start of the run, of `n` requests arriving at `rate` requests/s
/// with gamma-distributed gaps of shape `burstiness`, seeded by `seed`. The first request goes at
/// once; an infinite rate sends everything at once.
pub fn schedule(n: usize, rate: f64, burstiness: f64, seed: u64) -> Result<Vec<Duration>, String> {
    if rate.is_nan() || rate <= 0.0 {
        return Err(format!("`--request-rate` must be > 0, got {rate}"));
    }
    if !burstiness.is_finite() || burstiness <= 0.0 {
        return Err(format!("`--burstiness` must be a finite number > 0, got {burstiness}"));
    }
    if rate.is_infinite() {
        return Ok(vec![Duration::ZERO; n]);
    }
    let gaps = Gamma::new(burstiness, 1.0 / (rate * burstiness)).map_err(|e| e.to_string())?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = 0.0f64;
    Ok((0..n)
        .map(|i| {
            if i > 0 {
                t += gaps.sample(&mut rng);
            }
            Duration::from_secs_f64(t)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_and_cv(s: &[Duration]) -> (f64, f64) {
        let gaps: Vec<f64> = s.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        (mean, var.sqrt() / mean)
    }

    #[test]
    fn same_seed_gives_the_same_schedule() {
        let a = schedule(100, 4.0, 1.0, 7).expect("valid");
        assert_eq!(a, schedule(100, 4.0, 1.0, 7).expect("valid"));
        assert_ne!(a, schedule(100, 4.0, 1.0, 8).expect("valid"));
        assert_eq!(a[0], Duration::ZERO);
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn gaps_have_mean_one_over_rate_and_burstiness_sets_their_spread() {
        let n = 40_000;
        // Poisson: exponential gaps, coefficient of variation 1.
        let (mean, cv) = mean_and_cv(&schedule(n, 8.0, 1.0, 1).expect("valid"));
        assert!((mean - 0.125).abs() < 0.125 * 0.03, "mean gap {mean}");
        assert!((cv - 1.0).abs() < 0.05, "cv {cv}");
        // Gamma of shape k: same mean, coefficient of variation 1/sqrt(k).
        let (mean, cv) = mean_and_cv(&schedule(n, 8.0, 0.25, 1).expect("valid"));
        assert!((mean - 0.125).abs() < 0.125 * 0.05, "bursty mean gap {mean}");
        assert!((cv - 2.0).abs() < 0.15, "bursty cv {cv}");
        let (_, cv) = mean_and_cv(&schedule(n, 8.0, 4.0, 1).expect("valid"));
        assert!((cv - 0.5).abs() < 0.05, "even cv {cv}");
    }

    #[test]
    fn infinite_rate_sends_at_once_and_bad_values_are_errors() {
        assert_eq!(schedule(3, f64::INFINITY, 1.0, 0), Ok(vec![Duration::ZERO; 3]));
        assert!(schedule(3, 0.0, 1.0, 0).unwrap_err().contains("--request-rate"));
        assert!(schedule(3, f64::NAN, 1.0, 0).is_err());
        assert!(schedule(3, 1.0, 0.0, 0).unwrap_err().contains("--burstiness"));
    }
}
