//! The `sluice` binary as a child process, for tests of the command line, signals and SDKs.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// `sluice serve` on the default model at `127.0.0.1:0`, logging JSON lines.
pub struct ChildServer {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its served model name.
    pub model: String,
    lines: Receiver<String>,
}

/// The binary with no `SLUICE_*` variable from the caller's environment.
pub fn sluice() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("SLUICE_")) {
        command.env_remove(key);
    }
    command
}

impl ChildServer {
    /// Starts the server with extra flags and environment; returns once it says it is ready.
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let model = super::model_path();
        let mut child = sluice()
            .args(["serve", "--port", "0", "--log-format", "json", "--kv-cache-memory", "128MiB", "--model"])
            .arg(&model)
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sluice starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Self { child, addr: "0.0.0.0:0".parse().expect("an address"), model: String::new(), lines };
        let ready = server.wait_for_log(|v| v["message"] == "ready", Duration::from_secs(120));
        let base = ready["base_url"].as_str().expect("base_url in the ready line");
        let host_port = base.trim_start_matches("http://").trim_end_matches("/v1");
        server.addr = host_port.parse().expect("a socket address");
        let model_name = model.file_stem().expect("a file name").to_string_lossy().into_owned();
        server.model = args.windows(2).find(|w| w[0] == "--served-model-name").map_or(model_name, |w| w[1].to_string());
        server
    }

    /// Waits for a JSON log line matching `found`; panics (with what was seen) past `timeout`.
    pub fn wait_for_log(&mut self, found: impl Fn(&serde_json::Value) -> bool, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        if found(&v) {
                            return v;
                        }
                    }
                    seen.push(line);
                }
                Err(_) => panic!("no matching log line within {timeout:?}; saw:\n{}", seen.join("\n")),
            }
        }
    }

    /// `http://addr` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid");
        // SAFETY: `kill` has no memory-safety preconditions; the pid is our own child's.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for the process to exit; panics past `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "sluice did not exit within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
