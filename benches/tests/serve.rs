//! `sluice-bench serve` end to end: the real `sluice` binary serving the default model on
//! `127.0.0.1:0`, measured by the real `sluice-bench` binary, closed and open loop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("benches/ sits in the workspace")
}

/// The `sluice` binary of this test's profile, built if needed: cargo builds another package's
/// binaries only for that package's own tests.
fn sluice_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    // target/<profile>/deps/<test>
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(other) => other,
    };
    let out = Command::new(env!("CARGO"))
        .args(["build", "-p", "sluice-server", "--bin", "sluice", "--profile", profile])
        .args(["--message-format", "json-render-diagnostics"])
        .current_dir(workspace())
        .stderr(Stdio::inherit())
        .output()
        .expect("cargo runs");
    assert!(out.status.success(), "building sluice failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "sluice")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .expect("cargo names the sluice executable")
}

/// `sluice serve` on the default model, killed on drop.
struct Server {
    child: Child,
    base_url: String,
}

impl Server {
    fn start() -> Self {
        let model = workspace().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(model.is_file(), "the default model is missing at {}: run `make model` first", model.display());
        let mut command = Command::new(sluice_binary());
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("SLUICE_")) {
            command.env_remove(key);
        }
        let mut child = command
            .args(["serve", "--port", "0", "--log-format", "json", "--kv-cache-memory", "128MiB", "--model"])
            .arg(&model)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sluice starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["message"] == "ready"
                        && tx.send(v["base_url"].as_str().unwrap_or_default().to_string()).is_err()
                    {
                        break;
                    }
                }
            }
        });
        let base_url = rx.recv_timeout(Duration::from_secs(180)).expect("sluice logs `ready` with its base_url");
        Self { child, base_url }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bench(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .arg("serve")
        .args(args)
        .env_remove("OPENAI_API_KEY")
        .output()
        .expect("sluice-bench runs");
    assert!(
        out.status.success(),
        "sluice-bench serve {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("the JSON file is written")).expect("valid JSON")
}

#[test]
fn serve_measures_the_real_server_closed_and_open_loop() {
    let server = Server::start();
    let dir = std::env::temp_dir().join(format!("sluice-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let (json, svg) = (dir.join("closed.json"), dir.join("closed.svg"));

    // Closed loop, synthetic chat prompts, the model name taken from /v1/models.
    let out = bench(&[
        "--url",
        &server.base_url,
        "--num-requests",
        "6",
        "--concurrency",
        "2",
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--slo",
        "ttft=60s,tpot=10s",
        "--timeout",
        "120",
        "--max-duration",
        "300",
        "--json",
        json.to_str().expect("utf-8"),
        "--plot",
        svg.to_str().expect("utf-8"),
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("serve benchmark") && table.contains("Output token throughput"), "{table}");
    let s = read_json(&json);
    assert_eq!(
        (&s["mode"], &s["concurrency"], &s["completed"], &s["failed"]),
        (&"serve".into(), &2.into(), &6.into(), &0.into()),
        "{s}"
    );
    assert_eq!(s["model"], "SmolLM2-135M-Instruct.Q4_1", "{s}");
    assert_eq!(
        (&s["total_output_tokens"], &s["counted_without_usage"]),
        (&48.into(), &0.into()),
        "8 tokens each, from usage: {s}"
    );
    assert!(s["total_input_tokens"].as_u64() > Some(6 * 20), "{s}");
    assert_eq!(s["goodput"].as_f64(), s["request_throughput"].as_f64(), "every request met the generous SLOs: {s}");
    for dist in ["ttft", "tpot", "itl", "e2e"] {
        let d = &s[dist];
        let (mean, p50, p99) = (d["mean_ms"].as_f64(), d["p50_ms"].as_f64(), d["p99_ms"].as_f64());
        assert!(mean > Some(0.0) && p50 > Some(0.0) && p99 >= p50 && d["p90_ms"].is_number(), "{dist}: {d}");
    }
    assert!(s["e2e"]["p50_ms"].as_f64() >= s["ttft"]["p50_ms"].as_f64(), "{s}");
    let plot = std::fs::read_to_string(&svg).expect("the SVG is written");
    assert!(plot.starts_with("<svg") && plot.contains("c=2"), "{}", &plot[..plot.len().min(300)]);

    // Open loop over the ShareGPT sample on /v1/completions, capped at 2 in flight.
    let json = dir.join("open.json");
    let dataset = workspace().join("benches/data/sharegpt-sample.json");
    bench(&[
        "--url",
        &format!("{}/", server.base_url),
        "--endpoint",
        "completions",
        "--dataset",
        dataset.to_str().expect("utf-8"),
        "--num-requests",
        "4",
        "--request-rate",
        "20",
        "--max-concurrency",
        "2",
        "--seed",
        "3",
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--quiet",
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    let s = read_json(&json);
    assert_eq!((&s["completed"], &s["failed"], &s["total_output_tokens"]), (&4.into(), &0.into(), &32.into()), "{s}");
    assert_eq!((s["request_rate"].as_f64(), &s["concurrency"]), (Some(20.0), &2.into()), "{s}");
    std::fs::remove_dir_all(&dir).expect("cleaned up");
}

#[test]
fn an_unreachable_server_is_an_error_message_not_a_panic() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(["serve", "--url", "http://127.0.0.1:1", "--num-requests", "1"])
        .output()
        .expect("sluice-bench runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/v1/models") && !stderr.contains("panicked"), "{stderr}");

    // With the model named, the request itself fails and is reported as failed.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(["serve", "--url", "http://127.0.0.1:1", "--model", "m", "--num-requests", "2", "--max-retries", "0"])
        .output()
        .expect("sluice-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("Failed requests:") && stdout.contains("failed: "), "{stdout}");
    let failed = stdout.lines().find(|l| l.starts_with("Failed requests:")).expect("a failed line");
    assert!(failed.trim_end().ends_with(" 2"), "{failed}");
}
