//! Issue 18, part 6: every kernel on a GPU against its CPU reference.
//!
//! Without a CUDA driver (every CI machine here) each test prints `skipped: …` and passes; with
//! `LIKENESS_REQUIRE_GPU=1` (scripts/device_checks.sh on a lent H100) a missing or unusable GPU
//! is a failure, so a device run cannot pass by skipping.
//!
//! Tolerances (u = 2⁻²⁴; u_T the storage's unit roundoff): kernels and references sum in the
//! same order with the same FMAs, so f32 results differ only where NVRTC contracts a scalar
//! epilogue (`b + s·a` → one FMA) that Rust rounds twice: a few u of the terms' magnitude. The
//! bound is 16u·Σ|terms|, with Σ|terms| from the reference run on |inputs| (it bounds every sum
//! of products and their propagation through h and g); a stored T output may in addition land on
//! the other side of a rounding boundary: + 2u_T·|y|. AdamW has no contraction (`_rn`
//! intrinsics) and must match bit for bit.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use likeness_kernels::adamw::{self, AdamwHyper, AdamwScalars, AdamwTensor};
use likeness_kernels::embed::{self, NORMALIZE_EPS};
use likeness_kernels::half::{bf16, f16};
use likeness_kernels::lora::{self, BackwardBuffers, ForwardBuffers, LoraShape};
use likeness_kernels::mask::Dropout;
use likeness_kernels::{cuda_driver_present, Element, Kernels};
use likeness_sdk::testing::uniform_f32;

const U: f64 = 1.0 / (1u64 << 24) as f64;

/// The device, or a skip line (a failure with LIKENESS_REQUIRE_GPU=1).
fn gpu_or_skip(test: &str) -> Option<(Kernels, Arc<CudaStream>)> {
    let why = if !cuda_driver_present() {
        "a CUDA driver (libcuda.so.1 could not be loaded)".to_string()
    } else {
        match Kernels::new(0) {
            Ok(k) => {
                let s = k.context().default_stream();
                return Some((k, s));
            }
            Err(e) => format!("a usable GPU ({e})"),
        }
    };
    if std::env::var("LIKENESS_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("{test} needs {why}; LIKENESS_REQUIRE_GPU=1, so that is a failure, not a skip");
    }
    use std::io::Write;
    let _ =
        writeln!(std::io::stderr().lock(), "skipped: {test} needs {why} (set LIKENESS_REQUIRE_GPU=1 on a GPU machine)");
    None
}

/// Device memory of any plain storage type (f32, f16, bf16, i32), as bytes.
struct Buf(CudaSlice<u8>);

fn bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: T is a plain number type (no padding, every bit pattern valid as bytes).
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn up<T: Copy>(s: &Arc<CudaStream>, v: &[T]) -> Buf {
    Buf(s.clone_htod(bytes(v)).unwrap())
}

fn zeros<T>(s: &Arc<CudaStream>, n: usize) -> Buf {
    Buf(s.alloc_zeros::<u8>((n * std::mem::size_of::<T>()).max(4)).unwrap())
}

impl Buf {
    fn ptr(&self, s: &Arc<CudaStream>) -> u64 {
        self.0.device_ptr(s).0
    }

    fn down<T: Copy>(&self, s: &Arc<CudaStream>) -> Vec<T> {
        let b = s.clone_dtoh(&self.0).unwrap();
        // SAFETY: reading plain numbers back from their bytes (unaligned reads).
        b.chunks_exact(std::mem::size_of::<T>())
            .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr() as *const T) })
            .collect()
    }
}

fn close(what: &str, got: &[f32], want: &[f32], tol: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (g as f64 - w as f64).abs();
        assert!(e <= tol(i), "{what}[{i}]: GPU {g}, reference {w} (|Δ| {e:.3e} > {:.3e})", tol(i));
        worst = worst.max(e / tol(i).max(f64::MIN_POSITIVE));
    }
    eprintln!("{what}: worst |Δ| {worst:.3} of its bound");
}

fn f32s<T: Element>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

fn data<T: Element>(seed: u64, n: usize) -> Vec<T> {
    uniform_f32(seed, n, -1.0, 1.0).into_iter().map(T::from_f32).collect()
}

fn abs<T: Element>(v: &[T]) -> Vec<T> {
    v.iter().map(|x| T::from_f32(x.to_f32().abs())).collect()
}

fn lora_case<T: Element>(k: &Kernels, s: &Arc<CudaStream>, sh: LoraShape) {
    let label = format!("{:?} r={} p={}", T::DTYPE, sh.r, sh.drop.p);
    let (x, a, b) = (data::<T>(1, sh.n * sh.k), data::<T>(2, sh.r * sh.k), data::<T>(3, sh.m * sh.r));
    let (y0, dy, dxb) = (data::<T>(4, sh.n * sh.m), data::<T>(5, sh.n * sh.m), data::<T>(6, sh.n * sh.k));
    let (y_ref, h_ref) = lora::forward(&sh, &x, &y0, &a, &b);
    let g_ref = lora::backward(&sh, &x, &dy, &dxb, &a, &b, &h_ref);
    // Σ|terms| of every output: the references on |inputs|.
    let (y_abs, h_abs) = lora::forward(&sh, &abs(&x), &abs(&y0), &abs(&a), &abs(&b));
    let g_abs = lora::backward(&sh, &abs(&x), &abs(&dy), &abs(&dxb), &abs(&a), &abs(&b), &h_abs);

    let (dx_, da_, db_, xb, ab, bb) =
        (up(s, &dxb), zeros::<f32>(s, sh.r * sh.k), zeros::<f32>(s, sh.m * sh.r), up(s, &x), up(s, &a), up(s, &b));
    let (y, h, g, dyb) = (up(s, &y0), zeros::<f32>(s, sh.n * sh.r), zeros::<f32>(s, sh.n * sh.r), up(s, &dy));
    let ws = zeros::<f32>(s, lora::workspace_len(&sh));
    let p = |b: &Buf| b.ptr(s);
    let fw = ForwardBuffers { x: p(&xb), a: p(&ab), b: p(&bb), y0: p(&y), y: p(&y), h: p(&h) };
    let bw = BackwardBuffers {
        x: p(&xb),
        a: p(&ab),
        b: p(&bb),
        h: p(&h),
        dy: p(&dyb),
        dx: p(&dx_),
        g: p(&g),
        da: p(&da_),
        db: p(&db_),
        workspace: p(&ws),
    };
    // SAFETY: every buffer above is allocated with its documented shape on this stream.
    unsafe {
        lora::forward_gpu(k, s, T::DTYPE, &sh, &fw).unwrap();
        lora::backward_gpu(k, s, T::DTYPE, &sh, &bw).unwrap();
    }
    let ut = T::DTYPE.unit_roundoff();
    let stored = |r: &[T], a: &[T]| {
        let (r, a) = (f32s(r), f32s(a));
        move |i: usize| 2.0 * ut * r[i].abs() as f64 + 16.0 * U * a[i] as f64 + 1e-30
    };
    close(&format!("{label} h"), &h.down::<f32>(s), &h_ref, |i| 16.0 * U * h_abs[i] as f64 + 1e-30);
    close(&format!("{label} y"), &f32s(&y.down::<T>(s)), &f32s(&y_ref), stored(&y_ref, &y_abs));
    close(&format!("{label} dx"), &f32s(&dx_.down::<T>(s)), &f32s(&g_ref.dx), stored(&g_ref.dx, &g_abs.dx));
    close(&format!("{label} dA"), &da_.down::<f32>(s), &g_ref.da, |i| 16.0 * U * g_abs.da[i] as f64 + 1e-30);
    close(&format!("{label} dB"), &db_.down::<f32>(s), &g_ref.db, |i| 16.0 * U * g_abs.db[i] as f64 + 1e-30);
}

#[test]
fn issue18_gpu_fused_lora_matches_reference() {
    let Some((k, s)) = gpu_or_skip("issue18_gpu_fused_lora_matches_reference") else { return };
    let drop = Dropout { p: 0.1, seed: 0xface, offset: 77 };
    // Odd sizes: every tile has a ragged edge; n spans several reduction splits.
    let sh = LoraShape { n: 601, k: 200, m: 136, r: 16, scale: 2.0, drop, rows_per_split: lora::rows_per_split(601) };
    assert!(sh.n.div_ceil(sh.rows_per_split) > 1);
    lora_case::<f32>(&k, &s, sh);
    lora_case::<f16>(&k, &s, sh);
    lora_case::<bf16>(&k, &s, sh);
    let wide = LoraShape { n: 65, k: 96, m: 70, r: 64, drop: Dropout::NONE, rows_per_split: 32, ..sh };
    lora_case::<bf16>(&k, &s, wide);
    lora_case::<f32>(&k, &s, LoraShape { r: 1, ..wide });
}

fn embed_case<T: Element>(k: &Kernels, s: &Arc<CudaStream>, n: usize, m: usize, d: usize) {
    let label = format!("{:?}", T::DTYPE);
    let (a, b) = (data::<T>(11, n * d), data::<T>(12, m * d));
    let (an_ref, na_ref) = embed::l2_normalize_ref(&a, n, d, NORMALIZE_EPS);
    let (bn_ref, _) = embed::l2_normalize_ref(&b, m, d, NORMALIZE_EPS);
    let (ab, bb, an, bn, na, nb) =
        (up(s, &a), up(s, &b), zeros::<f32>(s, n * d), zeros::<f32>(s, m * d), zeros::<f32>(s, n), zeros::<f32>(s, m));
    let (loss, grad, cos) = (zeros::<f32>(s, 1), zeros::<f32>(s, n * d), zeros::<f32>(s, n));
    let p = |b: &Buf| b.ptr(s);
    // SAFETY: buffers allocated with the documented shapes on this stream.
    unsafe {
        embed::l2_normalize(k, s, T::DTYPE, p(&ab), n, d, p(&an), p(&na)).unwrap();
        embed::l2_normalize(k, s, T::DTYPE, p(&bb), m, d, p(&bn), p(&nb)).unwrap();
        embed::identity_loss(k, s, T::DTYPE, p(&ab), p(&bb), n, d, p(&loss), p(&grad), p(&cos)).unwrap();
    }
    let norm_tol = |_| 4.0 * U;
    close(&format!("{label} â"), &an.down::<f32>(s), &an_ref, norm_tol);
    close(&format!("{label} b̂"), &bn.down::<f32>(s), &bn_ref, norm_tol);
    close(&format!("{label} ‖a‖"), &na.down::<f32>(s), &na_ref, |i| 4.0 * U * na_ref[i] as f64);
    let r = embed::identity_loss_ref(&a, &b[..n * d], n, d, NORMALIZE_EPS);
    close(&format!("{label} cos"), &cos.down::<f32>(s), &r.cos, |_| 8.0 * U);
    close(&format!("{label} loss"), &loss.down::<f32>(s), &[r.loss], |_| 8.0 * U);
    close(&format!("{label} dL/da"), &grad.down::<f32>(s), &r.grad_a, |i| {
        16.0 * U * 2.0 / (n as f64 * na_ref[i / d] as f64)
    });
}

#[test]
fn issue18_gpu_embedding_similarity_matches_reference() {
    let Some((k, s)) = gpu_or_skip("issue18_gpu_embedding_similarity_matches_reference") else { return };
    embed_case::<f32>(&k, &s, 37, 70, 512);
    embed_case::<f16>(&k, &s, 37, 70, 512);
    embed_case::<bf16>(&k, &s, 37, 70, 512);
    // The cosine matrix and top-k (f32), on ragged tiles, with planted ties and a NaN.
    let (n, m, d, kk) = (45usize, 300usize, 100usize, 7usize);
    let (a, b) = (uniform_f32(13, n * d, -1.0, 1.0), uniform_f32(14, m * d, -1.0, 1.0));
    let (ab, bb, sm) = (up(&s, &a), up(&s, &b), zeros::<f32>(&s, n * m));
    // SAFETY: as above.
    unsafe { embed::cosine_matrix(&k, &s, ab.ptr(&s), bb.ptr(&s), n, m, d, sm.ptr(&s)).unwrap() };
    let s_ref = embed::cosine_matrix_ref(&a, &b, n, m, d);
    let abs_a: Vec<f32> = a.iter().map(|v| v.abs()).collect();
    let abs_b: Vec<f32> = b.iter().map(|v| v.abs()).collect();
    let s_abs = embed::cosine_matrix_ref(&abs_a, &abs_b, n, m, d);
    close("S", &sm.down::<f32>(&s), &s_ref, |i| 16.0 * U * s_abs[i] as f64);
    let mut scores = s_ref.clone();
    for row in 0..n {
        scores[row * m + 5] = 9.0; // a three-way tie at the top: indices 5, 17, 250 in that order
        scores[row * m + 250] = 9.0;
        scores[row * m + 17] = 9.0;
    }
    scores[3 * m + 100] = f32::NAN;
    let (sb, tv, ti) = (up(&s, &scores), zeros::<f32>(&s, n * kk), zeros::<i32>(&s, n * kk));
    // SAFETY: as above.
    unsafe { embed::topk_rows(&k, &s, sb.ptr(&s), n, m, kk, tv.ptr(&s), ti.ptr(&s)).unwrap() };
    let (v_ref, i_ref) = embed::topk_rows_ref(&scores, n, m, kk);
    assert_eq!(ti.down::<i32>(&s), i_ref, "top-k indices");
    assert_eq!(&i_ref[..3], &[5, 17, 250]);
    assert_eq!(i_ref[3 * kk], 100, "NaN ranks first");
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    assert_eq!(bits(tv.down::<f32>(&s)), bits(v_ref), "top-k values (copied, so bit-identical)");
}

/// One tensor's params, exp_avg, exp_avg_sq and bf16 copy on the host.
type HostState = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<bf16>);

fn adamw_case<G: Element>(k: &Kernels, s: &Arc<CudaStream>) {
    let sizes = [1000usize, 1, 0, 70_001];
    let h = AdamwHyper { lr: 3e-3, weight_decay: 0.05, ..Default::default() };
    let steps = 3u64;
    let mut host: Vec<HostState> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (uniform_f32(40 + i as u64, n, -1.0, 1.0), vec![0.0; n], vec![0.0; n], vec![bf16::ZERO; n]))
        .collect();
    let dev: Vec<[Buf; 4]> = host.iter().map(|(p, m, v, c)| [up(s, p), up(s, m), up(s, v), up(s, c)]).collect();
    for t in 1..=steps {
        let grads: Vec<Vec<G>> = sizes.iter().enumerate().map(|(i, &n)| data::<G>(100 * t + i as u64, n)).collect();
        let gdev: Vec<Buf> = grads.iter().map(|g| up(s, g)).collect();
        let sc = AdamwScalars::new(&h, t);
        let list: Vec<AdamwTensor> = (0..sizes.len())
            .map(|i| {
                let [p, m, v, c] = &dev[i];
                AdamwTensor {
                    p: p.ptr(s),
                    g: gdev[i].ptr(s),
                    m: m.ptr(s),
                    v: v.ptr(s),
                    p_bf16: c.ptr(s),
                    len: sizes[i],
                }
            })
            .collect();
        // SAFETY: each tensor's buffers hold `len` elements of their types.
        unsafe { adamw::adamw_step(k, s, G::DTYPE, &sc, &list).unwrap() };
        for (i, (p, m, v, c)) in host.iter_mut().enumerate() {
            adamw::adamw_ref(&sc, p, &grads[i], m, v, Some(c));
        }
        s.synchronize().unwrap();
    }
    for (i, (p, m, v, c)) in host.iter().enumerate() {
        let [pd, md, vd, cd] = &dev[i];
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&pd.down::<f32>(s)[..p.len()]), bits(p), "{:?} tensor {i}: params", G::DTYPE);
        assert_eq!(bits(&md.down::<f32>(s)[..p.len()]), bits(m), "{:?} tensor {i}: exp_avg", G::DTYPE);
        assert_eq!(bits(&vd.down::<f32>(s)[..p.len()]), bits(v), "{:?} tensor {i}: exp_avg_sq", G::DTYPE);
        assert_eq!(&cd.down::<bf16>(s)[..p.len()], &c[..], "{:?} tensor {i}: bf16 copy", G::DTYPE);
    }
}

#[test]
fn issue18_gpu_multi_tensor_adamw_is_bit_identical_to_reference() {
    let Some((k, s)) = gpu_or_skip("issue18_gpu_multi_tensor_adamw_is_bit_identical_to_reference") else { return };
    adamw_case::<f32>(&k, &s);
    adamw_case::<bf16>(&k, &s);
    adamw_case::<f16>(&k, &s);
}

/// More tensors than one launch takes: the chunking over MAX_TENSORS_PER_LAUNCH.
#[test]
fn issue18_gpu_adamw_chunks_long_tensor_lists() {
    let Some((k, s)) = gpu_or_skip("issue18_gpu_adamw_chunks_long_tensor_lists") else { return };
    let count = adamw::MAX_TENSORS_PER_LAUNCH * 2 + 3;
    let h = AdamwHyper::default();
    let sc = AdamwScalars::new(&h, 1);
    let ps: Vec<Vec<f32>> = (0..count).map(|i| uniform_f32(i as u64, 1 + i % 5, -1.0, 1.0)).collect();
    let gs: Vec<Vec<f32>> = (0..count).map(|i| uniform_f32(1000 + i as u64, 1 + i % 5, -1.0, 1.0)).collect();
    let bufs: Vec<[Buf; 4]> = ps
        .iter()
        .zip(&gs)
        .map(|(p, g)| [up(&s, p), up(&s, g), zeros::<f32>(&s, p.len()), zeros::<f32>(&s, p.len())])
        .collect();
    let list: Vec<AdamwTensor> = bufs
        .iter()
        .zip(&ps)
        .map(|([p, g, m, v], host)| AdamwTensor {
            p: p.ptr(&s),
            g: g.ptr(&s),
            m: m.ptr(&s),
            v: v.ptr(&s),
            p_bf16: 0,
            len: host.len(),
        })
        .collect();
    // SAFETY: as above.
    unsafe { adamw::adamw_step(&k, &s, likeness_kernels::Dtype::F32, &sc, &list).unwrap() };
    for (i, (p, g)) in ps.iter().zip(&gs).enumerate() {
        let (mut q, mut m, mut v) = (p.clone(), vec![0.0; p.len()], vec![0.0; p.len()]);
        adamw::adamw_ref(&sc, &mut q, g, &mut m, &mut v, None);
        assert_eq!(&bufs[i][0].down::<f32>(&s)[..p.len()], &q[..], "tensor {i}");
    }
}

/// The ABI's stream (a raw `cudaStream_t`) drives the launches: a stream of our own, wrapped
/// the way a plugin wraps `TensorView::stream`.
#[test]
fn issue18_gpu_launches_run_on_the_callers_stream() {
    let Some((k, _)) = gpu_or_skip("issue18_gpu_launches_run_on_the_callers_stream") else { return };
    let own = k.context().new_stream().unwrap();
    // SAFETY: `own` is a live stream of this context and outlives `s`.
    let s = unsafe { likeness_kernels::stream_from_abi(k.context(), own.cu_stream() as usize) };
    let a = uniform_f32(5, 3 * 64, -1.0, 1.0);
    let (ab, out) = (up(&s, &a), zeros::<f32>(&s, 3 * 64));
    // SAFETY: as above.
    unsafe { embed::l2_normalize(&k, &s, likeness_kernels::Dtype::F32, ab.ptr(&s), 3, 64, out.ptr(&s), 0).unwrap() };
    let (want, _) = embed::l2_normalize_ref(&a, 3, 64, NORMALIZE_EPS);
    close("normalised on the caller's stream", &out.down::<f32>(&s), &want, |_| 4.0 * U);
}
