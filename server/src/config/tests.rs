use std::io::Write;

use clap::Parser;

use super::*;

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
    assert_eq!(c.api.api_keys, ["a", "b", "sk-file-1", "sk-file-2"]);
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
    assert_eq!((c.engine.kv_cache_memory, c.engine.max_model_len), (64 << 20, Some(512)));
    assert_eq!(c.api.served_model_name, "smol");
}

#[test]
fn bad_settings_are_named() {
    let model = TempFile::new("model3.gguf", "");
    let path = model.0.display().to_string();
    let typo = TempFile::new("typo.toml", "prot = 8080\n");
    let typo_path = typo.0.display().to_string();
    let cases: [(Vec<&str>, &str); 8] = [
        (vec!["--model", "/nonexistent/model.gguf"], "`model`"),
        (vec!["--model", &path, "--device", "tpu"], "`device`"),
        (vec!["--model", &path, "--dtype", "f8"], "`dtype`"),
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
