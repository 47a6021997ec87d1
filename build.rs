//! Compiles every `kernels/*.cu` into one fatbin per file when the `cuda` feature is on.
//!
//! The fatbins hold sm_80 and sm_90 cubins plus compute_90 PTX (override with
//! `DUALPRIV_CUDA_ARCHS`, e.g. `80,90`), and are embedded with `include_bytes!`
//! through `$OUT_DIR/kernels.rs`. Without the feature nothing CUDA is touched.
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=DUALPRIV_CUDA_ARCHS");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = find_nvcc().unwrap_or_else(|| {
        panic!(
            "\n\nthe `cuda` feature needs nvcc 13.0, and none was found through $NVCC, \
             $CUDA_HOME/bin or $PATH.\nInstall the pinned toolchain with\n    \
             bash scripts/install-cuda-tools.sh\nand export the line it prints \
             (CUDA_HOME=... NVCC=...), then build again.\n"
        )
    });
    let archs = archs();
    let mut sources: Vec<PathBuf> = fs::read_dir("kernels")
        .expect("kernels/ folder exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();

    let mut table = String::from("/// Embedded fatbins, one per `kernels/*.cu`: (stem, bytes).\n");
    table.push_str("pub(crate) const FATBINS: &[(&str, &[u8])] = &[\n");
    let mut handles = String::new();
    for src in &sources {
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        let dst = out.join(format!("{stem}.fatbin"));
        compile(&nvcc, src, &dst, &archs);
        table.push_str(&format!(
            "    ({stem:?}, include_bytes!({:?})),\n",
            dst.to_string_lossy()
        ));
        let text =
            fs::read_to_string(src).unwrap_or_else(|e| panic!("reading {}: {e}", src.display()));
        handles.push_str(&kernel_handles(&stem, &text));
    }
    table.push_str("];\n");
    table.push_str(&handles);
    fs::write(out.join("kernels.rs"), table).expect("write kernels.rs");
}

/// One module per `.cu` file with a [`Kernel`] constant per `extern "C" __global__`
/// entry point, so a renamed or deleted kernel fails at compile time instead of at
/// the first launch. `rmsnorm_fwd_f32` in `norms.cu` becomes `norms::RMSNORM_FWD_F32`.
fn kernel_handles(stem: &str, text: &str) -> String {
    let mut names = entry_points(text);
    names.sort();
    names.dedup();
    let mut s = format!("/// Kernels of `kernels/{stem}.cu`.\npub mod {stem} {{\n");
    s.push_str(&format!(
        "    /// The module name of `kernels/{stem}.cu`.\n    pub const MODULE: &str = {stem:?};\n"
    ));
    for n in &names {
        s.push_str(&format!(
            "    /// `{n}` in `kernels/{stem}.cu`.\n    pub const {}: super::Kernel = \
             super::Kernel {{ module: {stem:?}, name: {n:?} }};\n",
            n.to_uppercase()
        ));
    }
    s.push_str("}\n");
    s
}

/// Names of the `extern "C" __global__` functions in a CUDA source, skipping the
/// return type and any `__launch_bounds__(...)`. Line comments are ignored.
fn entry_points(text: &str) -> Vec<String> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let marker = "extern \"C\" __global__";
    let mut names = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find(marker) {
        rest = &rest[at + marker.len()..];
        let mut s = rest.trim_start();
        loop {
            if let Some(t) = s.strip_prefix("void") {
                s = t.trim_start();
            } else if let Some(t) = s.strip_prefix("__launch_bounds__") {
                let close = t.find(')').expect("__launch_bounds__ without ')'");
                s = t[close + 1..].trim_start();
            } else {
                break;
            }
        }
        let name: String = s
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            !name.is_empty() && s[name.len()..].trim_start().starts_with('('),
            "could not read a kernel name after `{marker}`: {:?}",
            &s[..s.len().min(60)]
        );
        names.push(name);
    }
    names
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
    }
    if let Some(home) = env::var_os("CUDA_HOME") {
        let p = Path::new(&home).join("bin").join("nvcc");
        if p.is_file() {
            return Some(p);
        }
    }
    env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|d| d.join("nvcc"))
            .find(|p| p.is_file())
    })
}

/// `-gencode` flags: cubins for every arch, plus PTX for the highest one so newer
/// GPUs can JIT it.
fn archs() -> Vec<String> {
    let spec = env::var("DUALPRIV_CUDA_ARCHS").unwrap_or_else(|_| "80,90".to_string());
    let mut list: Vec<u32> = spec
        .split(',')
        .map(|s| {
            s.trim()
                .trim_start_matches("sm_")
                .parse()
                .unwrap_or_else(|_| panic!("DUALPRIV_CUDA_ARCHS={spec:?}: expected e.g. 80,90"))
        })
        .collect();
    list.sort();
    list.dedup();
    let top = *list.last().expect("DUALPRIV_CUDA_ARCHS is empty");
    list.iter()
        .map(|a| {
            if *a == top {
                format!("arch=compute_{a},code=[sm_{a},compute_{a}]")
            } else {
                format!("arch=compute_{a},code=sm_{a}")
            }
        })
        .collect()
}

fn compile(nvcc: &Path, src: &Path, dst: &Path, archs: &[String]) {
    let mut cmd = Command::new(nvcc);
    cmd.arg("-fatbin")
        .arg("-O3")
        .arg("-std=c++17")
        .arg("-Ikernels")
        .arg("-Xptxas")
        .arg("-v")
        .arg("-o")
        .arg(dst)
        .arg(src);
    for a in archs {
        cmd.arg("-gencode").arg(a);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run {}: {e}", nvcc.display()));
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        panic!(
            "nvcc failed on {}:\n{}{}",
            src.display(),
            String::from_utf8_lossy(&out.stdout),
            log
        );
    }
    report_spills(src, &log);
}

/// ptxas -v prints, per entry function and arch, "Compiling entry function 'f' for
/// 'sm_XX'", then "N bytes stack frame, S bytes spill stores, ...", then "Used R
/// registers". A kernel with S > 0 gets one cargo warning with both lines.
fn report_spills(src: &Path, log: &str) {
    let mut func = String::new();
    let mut spill: Option<String> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            func = rest
                .replace("' for '", " @ ")
                .trim_end_matches('\'')
                .to_string();
        } else if line.contains("spill stores") {
            let stores = line
                .split("bytes stack frame,")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            spill = (stores > 0).then(|| line.trim().to_string());
        } else if line.contains("Used") && line.contains("registers") {
            if let Some(s) = spill.take() {
                println!(
                    "cargo:warning={}: {func} spills: {s}; {}",
                    src.display(),
                    line.trim().trim_start_matches("ptxas info    : ")
                );
            }
        }
    }
}
