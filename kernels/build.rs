//! Compiles `cuda/*.cu` to PTX in `OUT_DIR` when the `cuda` feature is on; `src/cuda.rs` embeds it.
//!
//! Without the feature this does nothing and prints nothing. With it, it needs `nvcc`: from `NVCC`,
//! else `$CUDA_HOME/bin/nvcc`, else `nvcc` on `PATH` (`scripts/cuda-toolkit.sh` provides one). The
//! target is `sm_$CUDA_COMPUTE_CAP`, 90 (H100/H200) when unset; PTX is JIT-compiled by the driver,
//! so it also runs on newer cards.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// The kernel sources, each compiled to `<name>.ptx`.
const KERNELS: [&str; 5] = ["reshape_and_cache", "paged_attention", "fused", "sampling", "gemv"];
/// Included by every kernel.
const HEADERS: [&str; 1] = ["common.cuh"];

fn main() -> Result<(), String> {
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return Ok(());
    }
    println!("cargo:rerun-if-changed=build.rs");
    for file in KERNELS.iter().map(|k| format!("{k}.cu")).chain(HEADERS.iter().map(|h| h.to_string())) {
        println!("cargo:rerun-if-changed=cuda/{file}");
    }
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let arch = compute_cap()?;
    let nvcc = nvcc();
    for kernel in KERNELS {
        let ptx = out_dir.join(format!("{kernel}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=sm_{arch}"), "-o"])
            .arg(&ptx)
            .arg(format!("cuda/{kernel}.cu"))
            .status()
            .map_err(|e| format!("cannot run {} ({e}); run `make check-cuda` or set NVCC", nvcc.display()))?;
        if !status.success() {
            return Err(format!("nvcc failed on cuda/{kernel}.cu ({status})"));
        }
    }
    Ok(())
}

/// `CUDA_COMPUTE_CAP` as nvcc's `sm_` suffix ("90", "8.9" → "89", "90a"), 90 when unset.
fn compute_cap() -> Result<String, String> {
    let raw = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap: String = raw.chars().filter(|&c| c != '.').collect();
    let digits = cap.trim_end_matches(|c: char| c.is_ascii_lowercase());
    if digits.len() < 2 || !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("CUDA_COMPUTE_CAP must look like 90, 8.9 or 90a, got `{raw}`"));
    }
    Ok(cap)
}

/// The nvcc to run: `NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` from `PATH`.
fn nvcc() -> PathBuf {
    if let Some(nvcc) = env::var_os("NVCC") {
        return nvcc.into();
    }
    match env::var_os("CUDA_HOME") {
        Some(home) => PathBuf::from(home).join("bin").join("nvcc"),
        None => "nvcc".into(),
    }
}
