//! CPU micro-benchmarks of every mechanism (`cargo bench`). The GPU figures come
//! from `dualpriv bench-kernels --backend cuda`. After the table it prints the
//! ChaCha20 / Philox throughput ratios of the noise rows (generation, axpy, and the
//! fused noise + top-k update).
fn main() {
    // `cargo test --benches` passes --test-ish flags; only run timings under `cargo bench`.
    if std::env::args().any(|a| a == "--bench") {
        match dualpriv::cmd::bench::kernels(dualpriv::cmd::bench::Device::Cpu) {
            Ok(rows) => {
                print!("{}", dualpriv::cmd::bench::markdown(&rows));
                print!("{}", dualpriv::cmd::bench::rng_ratios(&rows));
            }
            Err(e) => {
                eprintln!("bench failed: {e}");
                std::process::exit(1);
            }
        }
    }
}
