//! CPU micro-benchmarks of every mechanism (`cargo bench`). The GPU figures come
//! from `dualpriv bench-kernels --backend cuda`.
fn main() {
    // `cargo test --benches` passes --test-ish flags; only run timings under `cargo bench`.
    if std::env::args().any(|a| a == "--bench") {
        match dualpriv::bench::run(dualpriv::bench::Device::Cpu) {
            Ok(rows) => print!("{}", dualpriv::bench::markdown(&rows)),
            Err(e) => {
                eprintln!("bench failed: {e}");
                std::process::exit(1);
            }
        }
    }
}
