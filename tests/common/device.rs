//! Device test helpers: [`test_device!`](crate::test_device) runs one test body on
//! the CPU and on the GPU (modelled on candle's `test_device!`), and the measures
//! the GPU-vs-CPU tests judge with.
use dualpriv::backend::Backend;

/// `test_device!(body)`, for a generic `fn body<B: Backend>(be: &B)` (or
/// `B: DpBackend`), defines the module `body` with two tests:
///
/// * `body::cpu` runs `body(&Cpu)`;
/// * `body::cuda` (with the `cuda` feature) runs it on the GPU: a strict-FP32
///   [`Cuda`](dualpriv::backend::cuda::Cuda) for op tests judged at FP32
///   tolerances, or with `test_device!(body, shipped)` the shipped defaults
///   ([`Cuda::new`](dualpriv::backend::cuda::Cuda::new), TF32 model GEMMs). Without
///   a driver it prints `skipped: no CUDA driver` and passes, unless
///   `DUALPRIV_REQUIRE_GPU=1`, where it fails.
///
/// Bodies that compare `be` with the CPU reference compare the CPU with itself in
/// `body::cpu`, which still runs every shape of the test; the CPU ops themselves are
/// judged by the finite-difference tests of the same file.
#[macro_export]
macro_rules! test_device {
    ($body:ident) => {
        $crate::test_device!(@open $body, cuda_strict_or_skip);
    };
    ($body:ident, shipped) => {
        $crate::test_device!(@open $body, cuda_or_skip);
    };
    (@open $body:ident, $open:ident) => {
        mod $body {
            #[test]
            fn cpu() {
                super::$body(&dualpriv::backend::cpu::Cpu);
            }

            #[cfg(feature = "cuda")]
            #[test]
            fn cuda() {
                if let Some(be) = dualpriv::backend::cuda::$open(concat!(module_path!(), "::cuda")) {
                    super::$body(&be);
                }
            }
        }
    };
}

/// max |a − b| / max(max |b|, 1e-12): error relative to the output's scale.
pub fn scaled_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

/// Every output of `got` within `tol` of `want` by [`scaled_err`].
pub fn assert_close(what: &str, got: &[Vec<f32>], want: &[Vec<f32>], tol: f32) {
    assert_eq!(got.len(), want.len());
    for (i, (g, c)) in got.iter().zip(want).enumerate() {
        let e = scaled_err(g, c);
        assert!(e <= tol, "{what} output {i}: error {e:.3e} > {tol:.1e}");
    }
}

/// Uploads host values.
pub fn up<B: Backend>(be: &B, v: &[f32]) -> B::Buf {
    be.upload(v).unwrap()
}

/// Downloads a buffer.
pub fn down<B: Backend>(be: &B, b: &B::Buf) -> Vec<f32> {
    be.download(b).unwrap().into_vec()
}
