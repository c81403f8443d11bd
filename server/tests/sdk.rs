//! The official `openai` Python SDK against a running `sluice`: chat, streaming, completions and
//! errors raised as the SDK's own exception classes. `make test` installs the SDK into `.venv/`;
//! without it this test fails (it never skips) and says how to install it.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::child::ChildServer;

/// `$SLUICE_TEST_PYTHON`, else the workspace's `.venv/bin/python`.
fn python() -> PathBuf {
    let path = std::env::var_os("SLUICE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    assert!(
        path.is_file(),
        "no Python with the openai SDK at {}: run `make venv` (or `make test`), or set SLUICE_TEST_PYTHON",
        path.display()
    );
    let probe = Command::new(&path).args(["-c", "import openai"]).output().expect("python runs");
    assert!(probe.status.success(), "{} cannot import openai: run `make venv`", path.display());
    path
}

#[test]
fn the_official_python_sdk_works_unchanged() {
    let python = python();
    let key = "sk-sluice-sdk-test";
    let server = ChildServer::start(&["--served-model-name", "smol"], &[("SLUICE_API_KEYS", key)]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_sdk.py");
    let out = Command::new(python)
        .arg(script)
        .args([&server.url("/v1"), key, &server.model])
        .output()
        .expect("the SDK script runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "SDK script failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all SDK checks passed"), "{stdout}");
}
