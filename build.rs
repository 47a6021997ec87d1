//! Compiles every `kernels/*.cu` into one fatbin per file when the `cuda` feature is on.
//!
//! The fatbins hold sm_80 and sm_90 cubins plus compute_90 PTX (override with
//! `DUALPRIV_CUDA_ARCHS`, e.g. `80,90`), and are embedded with `include_bytes!`
//! through `$OUT_DIR/kernels.rs`. Without the feature nothing CUDA is touched.
//!
//! `kernels/abi.h` (the DP kernels' launch ABI) becomes `$OUT_DIR/abi.rs`: its
//! constants, and the C layout of each of its structs, which `src/gpu/abi.rs` checks
//! its `#[repr(C)]` mirrors against; nvcc compiles the same layouts as `static_assert`s.
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

    // The launch ABI: Rust constants and layout tables from kernels/abi.h, and the same
    // layouts as static_asserts that nvcc must accept (so a wrong table cannot pass).
    let abi_path = Path::new("kernels/abi.h");
    let abi_text = fs::read_to_string(abi_path).expect("reading kernels/abi.h");
    let abi = abi_h::parse(&abi_text);
    fs::write(out.join("abi.rs"), abi_h::rust(&abi)).expect("write abi.rs");
    let check = out.join("abi_layout_check.cu");
    fs::write(&check, abi_h::static_asserts(&abi)).expect("write abi_layout_check.cu");
    compile(
        &nvcc,
        &check,
        &out.join("abi_layout_check.fatbin"),
        &archs[..1],
    );
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

/// A reader for `kernels/abi.h`, which keeps to the subset its header describes:
/// `constexpr` scalars and plain (optionally `template <typename E>`) structs. The C
/// layout rules used here (each field at the next multiple of its alignment, the size
/// rounded up to the largest alignment) hold for these types on every CUDA host and
/// device; nvcc re-checks every number through [`static_asserts`].
mod abi_h {
    use std::collections::HashMap;

    /// A `constexpr` constant.
    pub struct Const {
        pub name: String,
        pub rust_ty: &'static str,
        pub value: String,
        pub doc: Vec<String>,
    }

    /// A field: name, offset, size.
    pub struct Field {
        pub name: String,
        pub offset: usize,
        pub size: usize,
    }

    /// A struct with its computed C layout.
    pub struct Struct {
        pub name: String,
        pub templated: bool,
        pub size: usize,
        pub align: usize,
        pub fields: Vec<Field>,
        pub doc: Vec<String>,
    }

    pub struct Abi {
        pub consts: Vec<Const>,
        pub structs: Vec<Struct>,
    }

    /// (size, alignment, Rust type) of a C scalar spelling.
    fn scalar(ty: &str) -> Option<(usize, usize, &'static str)> {
        Some(match ty {
            "int" | "int32_t" => (4, 4, "i32"),
            "unsigned" | "unsigned int" | "uint32_t" => (4, 4, "u32"),
            "long long" | "int64_t" => (8, 8, "i64"),
            "unsigned long long" | "uint64_t" => (8, 8, "u64"),
            "float" => (4, 4, "f32"),
            "double" => (8, 8, "f64"),
            _ => return None,
        })
    }

    /// A C literal as a Rust literal of type `rust_ty`: integer suffixes and a float's
    /// `f` dropped; anything else is refused.
    fn literal(v: &str, rust_ty: &str, line: &str) -> String {
        let float = rust_ty.starts_with('f');
        let body = if float {
            v.strip_suffix(['f', 'F']).unwrap_or(v)
        } else {
            v.trim_end_matches(['u', 'U', 'l', 'L'])
        };
        let ok = if float {
            body.parse::<f64>().is_ok()
        } else if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
            u64::from_str_radix(h, 16).is_ok()
        } else {
            body.parse::<u64>().is_ok()
        };
        assert!(ok, "kernels/abi.h: not a plain literal in `{line}`");
        body.to_string()
    }

    /// Comment text of a line that is only a `//` comment.
    fn comment(line: &str) -> Option<&str> {
        line.trim().strip_prefix("//").map(str::trim)
    }

    pub fn parse(text: &str) -> Abi {
        let mut consts = Vec::new();
        let mut structs: Vec<Struct> = Vec::new();
        let mut values: HashMap<String, u64> = HashMap::new();
        let mut doc: Vec<String> = Vec::new();
        let mut template = false;
        let mut lines = text.lines();
        while let Some(raw) = lines.next() {
            if let Some(c) = comment(raw) {
                doc.push(c.to_string());
                continue;
            }
            let line = raw.split("//").next().unwrap_or("").trim();
            if line.is_empty() {
                doc.clear();
                continue;
            }
            if let Some(rest) = line.strip_prefix("constexpr ") {
                let (lhs, rhs) = rest
                    .trim_end_matches(';')
                    .split_once('=')
                    .unwrap_or_else(|| panic!("kernels/abi.h: `{line}` has no `=`"));
                let lhs = lhs.trim();
                let (ty, name) = lhs.rsplit_once(' ').expect("constexpr TYPE NAME");
                let (_, _, rust_ty) = scalar(ty.trim())
                    .unwrap_or_else(|| panic!("kernels/abi.h: unsupported type in `{line}`"));
                let value = literal(rhs.trim(), rust_ty, line);
                assert!(
                    !doc.is_empty(),
                    "kernels/abi.h: `{name}` needs a comment above it"
                );
                if !rust_ty.starts_with('f') {
                    let v = match value
                        .strip_prefix("0x")
                        .or_else(|| value.strip_prefix("0X"))
                    {
                        Some(h) => u64::from_str_radix(h, 16).unwrap(),
                        None => value.parse().unwrap(),
                    };
                    values.insert(name.to_string(), v);
                }
                consts.push(Const {
                    name: name.to_string(),
                    rust_ty,
                    value,
                    doc: std::mem::take(&mut doc),
                });
                continue;
            }
            if line == "template <typename E>" {
                template = true;
                continue;
            }
            if let Some(rest) = line.strip_prefix("struct ") {
                let name = rest.trim_end_matches('{').trim().to_string();
                assert!(
                    rest.ends_with('{') && !name.contains(' '),
                    "kernels/abi.h: expected `struct Name {{`, got `{line}`"
                );
                let mut s = Struct {
                    name,
                    templated: std::mem::take(&mut template),
                    size: 0,
                    align: 1,
                    fields: Vec::new(),
                    doc: std::mem::take(&mut doc),
                };
                assert!(
                    !s.doc.is_empty(),
                    "kernels/abi.h: struct {} needs a comment",
                    s.name
                );
                let mut off = 0usize;
                loop {
                    let raw = lines
                        .next()
                        .unwrap_or_else(|| panic!("kernels/abi.h: struct {} never ends", s.name));
                    if comment(raw).is_some() {
                        continue;
                    }
                    let l = raw.split("//").next().unwrap_or("").trim();
                    if l.is_empty() {
                        continue;
                    }
                    if l == "};" {
                        break;
                    }
                    for (fname, size, align) in fields(l, &structs, &values) {
                        off = off.next_multiple_of(align);
                        s.fields.push(Field {
                            name: fname,
                            offset: off,
                            size,
                        });
                        off += size;
                        s.align = s.align.max(align);
                    }
                }
                s.size = off.next_multiple_of(s.align);
                structs.push(s);
                continue;
            }
            assert!(
                line.starts_with('#') || line.starts_with("namespace") || line.starts_with('}'),
                "kernels/abi.h: line outside the supported subset: `{line}`"
            );
            doc.clear();
        }
        Abi { consts, structs }
    }

    /// The (name, size, alignment) of each name declared on one field line.
    fn fields(
        line: &str,
        structs: &[Struct],
        values: &HashMap<String, u64>,
    ) -> Vec<(String, usize, usize)> {
        let decl = line
            .strip_suffix(';')
            .unwrap_or_else(|| panic!("kernels/abi.h: field line without `;`: `{line}`"));
        if let Some((_, name)) = decl.rsplit_once('*') {
            let name = name.trim();
            assert!(
                !decl.contains(',') && !name.contains('['),
                "kernels/abi.h: one plain pointer per line: `{line}`"
            );
            return vec![(name.to_string(), 8, 8)];
        }
        let (first, more) = decl.split_once(',').unwrap_or((decl, ""));
        let (ty, name0) = first
            .trim()
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("kernels/abi.h: `TYPE name` expected: `{line}`"));
        let ty = ty.trim();
        let (size, align) = match scalar(ty) {
            Some((s, a, _)) => (s, a),
            None => {
                let base = ty.split('<').next().unwrap_or(ty);
                let s = structs
                    .iter()
                    .find(|s| s.name == base)
                    .unwrap_or_else(|| panic!("kernels/abi.h: unknown type `{ty}` in `{line}`"));
                (s.size, s.align)
            }
        };
        let mut out = Vec::new();
        for n in std::iter::once(name0).chain(more.split(',').filter(|n| !n.trim().is_empty())) {
            let n = n.trim();
            let (n, count) = match n.split_once('[') {
                None => (n, 1),
                Some((n, len)) => {
                    let len = len.trim_end_matches(']').trim();
                    let count = len
                        .parse::<u64>()
                        .ok()
                        .or_else(|| values.get(len).copied())
                        .unwrap_or_else(|| {
                            panic!(
                                "kernels/abi.h: array length `{len}` is not a literal or constant"
                            )
                        });
                    (n, count as usize)
                }
            };
            out.push((n.to_string(), size * count, align));
        }
        out
    }

    /// `NoiseAxpyArgs` -> `NOISE_AXPY_ARGS`.
    fn screaming(name: &str) -> String {
        let mut s = String::new();
        for (i, c) in name.chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                s.push('_');
            }
            s.push(c.to_ascii_uppercase());
        }
        s
    }

    /// The comment as rustdoc lines (brackets escaped: they are not intra-doc links).
    fn rustdoc(doc: &[String], indent: &str) -> String {
        doc.iter()
            .map(|l| {
                format!(
                    "{indent}/// {}\n",
                    l.replace('[', "\\[").replace(']', "\\]")
                )
            })
            .collect()
    }

    pub fn rust(abi: &Abi) -> String {
        let mut s = String::from("// Generated by build.rs from kernels/abi.h.\n");
        for c in &abi.consts {
            s.push_str(&rustdoc(&c.doc, ""));
            s.push_str(&format!(
                "pub const {}: {} = {};\n",
                c.name, c.rust_ty, c.value
            ));
        }
        s.push_str(
            "/// The C layouts of the structs in `kernels/abi.h` (templated ones at \
             `E = float`),\n/// which the `#[repr(C)]` mirrors are checked against.\n\
             pub mod layout {\n    use super::{Field, Layout};\n",
        );
        for st in &abi.structs {
            s.push_str(&rustdoc(&st.doc, "    "));
            s.push_str(&format!(
                "    pub const {}: Layout = Layout {{\n        name: {:?},\n        size: {},\n        \
                 align: {},\n        fields: &[\n",
                screaming(&st.name),
                st.name,
                st.size,
                st.align
            ));
            for f in &st.fields {
                s.push_str(&format!(
                    "            Field {{ name: {:?}, offset: {}, size: {} }},\n",
                    f.name, f.offset, f.size
                ));
            }
            s.push_str("        ],\n    };\n");
        }
        s.push_str("}\n");
        s
    }

    pub fn static_asserts(abi: &Abi) -> String {
        let mut s = String::from(
            "// Generated by build.rs: the layouts it computed from abi.h, checked by nvcc.\n\
             #include <stddef.h>\n#include \"abi.h\"\n",
        );
        for st in &abi.structs {
            let ty = if st.templated {
                format!("dp::{}<float>", st.name)
            } else {
                format!("dp::{}", st.name)
            };
            s.push_str(&format!(
                "static_assert(sizeof({ty}) == {} && alignof({ty}) == {}, \"{} layout\");\n",
                st.size, st.align, st.name
            ));
            for f in &st.fields {
                s.push_str(&format!(
                    "static_assert(offsetof({ty}, {n}) == {} && sizeof((({ty}*)0)->{n}) == {}, \
                     \"{}::{n}\");\n",
                    f.offset,
                    f.size,
                    st.name,
                    n = f.name
                ));
            }
        }
        s
    }
}
