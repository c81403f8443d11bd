use std::io::Write;

use clap::Parser;

use super::*;
use sluice_engine::{DeviceSampling, GpuWeights};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    settings: Settings,
}

/// A temporary file holding `text`, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("sluice-config-test-{}-{name}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn load(args: &[&str]) -> Result<ServerConfig, ConfigError> {
    let cli = Cli::try_parse_from(std::iter::once("sluice").chain(args.iter().copied())).unwrap();
    ServerConfig::load(cli.settings)
}

#[test]
fn flags_override_the_file_and_defaults_fill_the_rest() {
    let model = TempFile::new("model.gguf", "");
    let keys = TempFile::new("keys", "# ops\nsk-file-1\n\n sk-file-2 # rotated monthly\n");
    let file = TempFile::new(
        "settings.toml",
        &format!(
            "port = 9000\nhost = \"0.0.0.0\"\nrequest_timeout = \"2m\"\nbody_limit = 1024\napi_key_file = {:?}\n",
            keys.0.display().to_string()
        ),
    );
    let model_path = model.0.display().to_string();
    let config_path = file.0.display().to_string();
    let c = load(&["--model", &model_path, "--config", &config_path, "--port", "9100", "--api-keys", "a,b"]).unwrap();
    assert_eq!((c.host.as_str(), c.port), ("0.0.0.0", 9100));
    assert_eq!(c.api.request_timeout, Duration::from_secs(120));
    assert_eq!(c.api.body_limit, 1024);
    let keys: Vec<ApiKey> = ["a", "b", "sk-file-1", "sk-file-2"].map(ApiKey::new).into();
    assert_eq!(c.api.api_keys, keys);
    assert_eq!(c.api.max_prompt_tokens, 8000);
    assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    assert_eq!(c.api.served_model_name, format!("sluice-config-test-{}-model", std::process::id()));
    assert_eq!(c.engine.scheduler, SchedulerConfig::default());
}

#[test]
fn engine_settings_reach_the_engine_config() {
    let model = TempFile::new("model2.gguf", "");
    let path = model.0.display().to_string();
    let c = load(&[
        "--model",
        &path,
        "--max-batch-size",
        "4",
        "--batch-timeout",
        "20ms",
        "--max-batch-tokens",
        "64",
        "--max-waiting",
        "7",
        "--kv-cache-memory",
        "64MiB",
        "--max-model-len",
        "512",
        "--served-model-name",
        "smol",
    ])
    .unwrap();
    let s = &c.engine.scheduler;
    assert_eq!(
        (s.max_batch_size, s.batch_timeout, s.max_batch_tokens, s.max_waiting),
        (4, Duration::from_millis(20), 64, 7)
    );
    assert_eq!((c.engine.kv_cache_memory, c.engine.max_model_len), (Some(64 << 20), Some(512)));
    assert_eq!(c.api.served_model_name, "smol");
}

#[test]
fn prefix_caching_is_on_unless_turned_off() {
    let model = TempFile::new("prefix-model.gguf", "");
    let path = model.0.display().to_string();
    let caching = |args: &[&str]| {
        let mut all = vec!["--model", &path];
        all.extend_from_slice(args);
        load(&all).unwrap().engine.scheduler.prefix_caching
    };
    assert!(caching(&[]));
    assert!(!caching(&["--prefix-caching", "false"]));
    assert!(caching(&["--prefix-caching"]));
    let file = TempFile::new("prefix.toml", "prefix_caching = false\n");
    assert!(!caching(&["--config", &file.0.display().to_string()]), "from the file");
}

#[test]
fn bad_settings_are_named() {
    let model = TempFile::new("model3.gguf", "");
    let path = model.0.display().to_string();
    let typo = TempFile::new("typo.toml", "prot = 8080\n");
    let typo_path = typo.0.display().to_string();
    let cases: [(Vec<&str>, &str); 15] = [
        (vec!["--model", "/nonexistent/model.gguf"], "`model`"),
        (vec!["--model", &path, "--device", "tpu"], "`device`"),
        (vec!["--model", &path, "--dtype", "f8"], "`dtype`"),
        (vec!["--model", &path, "--cpu-weights", "q4"], "`cpu_weights`"),
        (vec!["--model", &path, "--cpu-activations", "q8"], "`cpu_activations`"),
        (vec!["--model", &path, "--kv-cache-dtype", "fp8"], "`kv_cache_dtype`"),
        (vec!["--model", &path, "--gpu-weights", "q4"], "`gpu_weights`"),
        (vec!["--model", &path, "--gpu-memory-utilization", "0"], "`gpu_memory_utilization`"),
        (vec!["--model", &path, "--gpu-memory-utilization", "1.5"], "`gpu_memory_utilization`"),
        (vec!["--model", &path, "--kv-cache-memory", "0"], "`kv_cache_memory`"),
        (vec!["--model", &path, "--max-batch-size", "0"], "`max_batch_size`"),
        (vec!["--model", &path, "--request-timeout", "0s"], "`request_timeout`"),
        (vec!["--model", &path, "--log-level", "info,=["], "`log_level`"),
        (vec!["--model", &path, "--config", &typo_path], "prot"),
        (vec!["--model", &path, "--api-key-file", "/nonexistent/keys"], "`api_key_file`"),
    ];
    for (args, needle) in cases {
        let e = load(&args).expect_err(needle);
        assert!(e.0.contains(needle), "{args:?}: {e}");
    }
}

#[test]
fn malformed_values_are_refused_by_the_parser() {
    for args in [["--port", "70000"], ["--body-limit", "lots"], ["--shutdown-grace", "soon"]] {
        assert!(Cli::try_parse_from(std::iter::once("sluice").chain(args)).is_err(), "{args:?}");
    }
}

#[test]
fn breaker_settings_come_from_flags_or_the_file_and_are_checked() {
    let model = TempFile::new("breaker-model.gguf", "");
    let file = TempFile::new("breaker.toml", "breaker_threshold = 5\nbreaker_cooldown = \"250ms\"\n");
    let (model, file) = (model.0.display().to_string(), file.0.display().to_string());
    let c = load(&["--model", &model, "--config", &file]).unwrap();
    assert_eq!(c.engine.breaker, BreakerConfig { threshold: 5, cooldown: Duration::from_millis(250) });
    let c = load(&["--model", &model, "--breaker-threshold", "2"]).unwrap();
    assert_eq!(c.engine.breaker, BreakerConfig { threshold: 2, cooldown: Duration::from_secs(10) });
    let e = load(&["--model", &model, "--breaker-threshold", "0"]).unwrap_err();
    assert!(e.0.contains("`breaker_threshold`"), "{e}");
    let e = load(&["--model", &model, "--breaker-cooldown", "0s"]).unwrap_err();
    assert!(e.0.contains("`breaker_cooldown`"), "{e}");
}

#[test]
fn key_and_rate_limit_settings_come_from_flags_or_the_file() {
    let model = TempFile::new("limits-model.gguf", "");
    let keys = TempFile::new("limits-keys", "sk-a alpha priority=2 rpm=10\n");
    let file = TempFile::new(
        "limits.toml",
        &format!(
            "rate_limit_rpm = 60\nrate_limit_tpm = 5000\ntrusted_proxy = true\nmetrics_key = \"sk-m\"\napi_key_file = {:?}\n",
            keys.0.display().to_string()
        ),
    );
    let (model, file) = (model.0.display().to_string(), file.0.display().to_string());
    let c = load(&["--model", &model, "--config", &file]).unwrap();
    assert_eq!(c.api.rate_limit, RateLimitConfig { rpm: 60, tpm: 5000, trusted_proxy: true });
    assert_eq!(c.api.metrics_key.as_ref().map(|k| k.name.as_str()), Some("metrics"));
    let alpha = &c.api.api_keys[0];
    assert_eq!((alpha.name.as_str(), alpha.priority, alpha.rpm, alpha.tpm), ("alpha", Some(2), Some(10), None));
    let c = load(&["--model", &model, "--config", &file, "--rate-limit-rpm", "0", "--trusted-proxy", "false"]).unwrap();
    assert_eq!(c.api.rate_limit, RateLimitConfig { rpm: 0, tpm: 5000, trusted_proxy: false });
    let c = load(&["--model", &model, "--trusted-proxy"]).unwrap();
    assert_eq!(c.api.rate_limit, RateLimitConfig { rpm: 0, tpm: 0, trusted_proxy: true });
    // A bad line is named by file and line, and the key on it is not repeated.
    let bad = TempFile::new("limits-bad-keys", "sk-fine\nsk-secret-value rpm=fast\n");
    let e = load(&["--model", &model, "--api-key-file", &bad.0.display().to_string()]).unwrap_err();
    assert!(e.0.contains("`api_key_file`") && e.0.contains("line 2") && !e.0.contains("sk-secret"), "{e}");
}

#[test]
fn cache_idempotency_and_filter_settings_parse_and_default() {
    let model = TempFile::new("filters-model.gguf", "");
    let path = model.0.to_str().unwrap();
    let c = load(&["--model", path]).unwrap();
    assert_eq!((c.api.response_cache_size, c.api.response_cache_ttl), (256 << 20, Duration::from_secs(3600)));
    assert_eq!((c.api.idempotency_ttl, c.api.injection_mode), (Duration::from_secs(3600), InjectionMode::Flag));
    assert_eq!(c.api.idempotency_store_size, 64 << 20);
    assert!(c.api.redact.is_off());
    let toml = "response_cache_ttl = \"10m\"\nredact = \"email,card\"\ninjection_mode = \"off\"\n";
    let file = TempFile::new("filters.toml", toml);
    let flags = ["--response-cache-size", "0", "--injection-mode", "block", "--idempotency-store-size", "8MiB"];
    let args: Vec<&str> = ["--model", path, "--config", file.0.to_str().unwrap()].into_iter().chain(flags).collect();
    let c = load(&args).unwrap();
    assert_eq!((c.api.response_cache_size, c.api.response_cache_ttl), (0, Duration::from_secs(600)));
    assert_eq!((c.api.injection_mode, c.api.redact.to_string().as_str()), (InjectionMode::Block, "card,email"));
    assert_eq!(c.api.idempotency_store_size, 8 << 20);
    let cli = Cli::try_parse_from(["sluice", "--model", path, "--redact", "phone"]);
    assert!(cli.is_err(), "an unknown redaction kind is refused");
    assert!(load(&["--model", path, "--response-cache-ttl", "0s"]).unwrap_err().0.contains("response_cache_ttl"));
}

#[test]
fn gpu_settings_default_and_reach_the_engine_config() {
    let model = TempFile::new("gpu-model.gguf", "");
    let path = model.0.display().to_string();
    let c = load(&["--model", &path]).unwrap();
    let e = &c.engine;
    assert_eq!((e.kv_cache_memory, e.gpu_memory_utilization, e.gpu_weights), (None, 0.9, GpuWeights::Quantized));
    assert!(!e.cuda_graphs);
    let file = TempFile::new("gpu.toml", "gpu_memory_utilization = 0.5\ngpu_weights = \"dense\"\ncuda_graphs = true\n");
    let c = load(&["--model", &path, "--config", &file.0.display().to_string()]).unwrap();
    assert_eq!((c.engine.gpu_memory_utilization, c.engine.gpu_weights), (0.5, GpuWeights::Dense));
    assert!(!c.engine.cuda_graphs, "no graphs on the CPU, whatever the file says");
    let cuda = |args: &[&str]| {
        let mut all = vec!["--model", &path, "--device", "cuda"];
        all.extend_from_slice(args);
        load(&all).unwrap().engine.cuda_graphs
    };
    assert!(cuda(&["--config", &file.0.display().to_string()]), "from the file");
    assert!(!cuda(&["--config", &file.0.display().to_string(), "--cuda-graphs", "false"]), "the flag beats the file");
    assert!(cuda(&["--cuda-graphs"]) && cuda(&[]), "on by default on CUDA");
    assert!(!cuda(&["--cuda-graphs", "false"]));
    assert!(e.gemv, "the GEMV kernel by default");
    let gemv = |args: &[&str]| {
        let mut all = vec!["--model", &path, "--device", "cuda"];
        all.extend_from_slice(args);
        load(&all).unwrap().engine.gemv
    };
    let off = TempFile::new("gemv.toml", "gemv = false\n");
    assert!(!gemv(&["--gemv", "false"]) && !gemv(&["--config", &off.0.display().to_string()]));
    assert!(gemv(&["--config", &off.0.display().to_string(), "--gemv"]), "the flag beats the file");
    assert_eq!(e.device_sampling, DeviceSampling::Auto);
    let c = load(&["--model", &path, "--device-sampling", "host"]).unwrap();
    assert_eq!(c.engine.device_sampling, DeviceSampling::Host);
    let err = load(&["--model", &path, "--device-sampling", "gpu"]).unwrap_err().0;
    assert!(err.contains("`device_sampling`"), "{err}");
    let c = load(&["--model", &path, "--gpu-memory-utilization", "0.75", "--kv-cache-memory", "2GiB"]).unwrap();
    assert_eq!((c.engine.gpu_memory_utilization, c.engine.kv_cache_memory), (0.75, Some(2 << 30)));
}
