//! Times the kernels at Flux.1 shapes on the GPU and prints one JSON object (stdout) that
//! `kernels/bench/bench_torch.py`'s numbers are divided by (scripts/device_checks.sh):
//!
//! - the fused LoRA linear's rank-r work, forward + backward (6 + 2 launches), bf16, x 4096×3072,
//!   A 16×3072, B 3072×16, dropout 0.1 — the base GEMMs (x·Wᵀ, dy·W) are cuBLAS on both sides
//!   and timed by the torch script;
//! - embedding similarity: 64 query and 10 000 gallery embeddings of width 512 (bf16):
//!   normalise both, the 64×10 000 cosine matrix, top-5 per row, and the identity loss with its
//!   gradient on the 64 pairs;
//! - multi-tensor AdamW over the 4 × 57 = 228 LoRA tensors of a Flux rank-16 adapter's
//!   attention projections (57 blocks × q, k, v, out, each A 16×3072 and B 3072×16).
//!
//! Also the NVRTC compile time of every source for this GPU (a fresh PTX cache).
//!
//! `cargo run --release -p likeness-kernels --example bench_kernels [-- ITERS]`; with
//! `-- --stage-ptx DIR` it only fills a PTX cache for sm_80/sm_90 (no GPU needed).

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{sys, CudaSlice, CudaStream, DevicePtr};
use likeness_kernels::adamw::{self, AdamwHyper, AdamwScalars, AdamwTensor};
use likeness_kernels::half::bf16;
use likeness_kernels::lora::{self, BackwardBuffers, ForwardBuffers, LoraShape};
use likeness_kernels::mask::Dropout;
use likeness_kernels::{embed, nvrtc, Dtype, Kernels, PtxCache, Source};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn bf16s(seed: u64, n: usize) -> Vec<u16> {
    likeness_sdk::testing::uniform_f32(seed, n, -1.0, 1.0).into_iter().map(|v| bf16::from_f32(v).to_bits()).collect()
}

/// Mean milliseconds per call of `f` over `iters` calls on `s` (after 5 warm-up calls).
fn time_ms(k: &Kernels, s: &Arc<CudaStream>, iters: usize, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    for _ in 0..5 {
        f()?;
    }
    let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (start, end) = (k.context().new_event(flags)?, k.context().new_event(flags)?);
    start.record(s)?;
    for _ in 0..iters {
        f()?;
    }
    end.record(s)?;
    end.synchronize()?;
    Ok(start.elapsed_ms(&end)? as f64 / iters as f64)
}

fn ptr<T>(s: &Arc<CudaStream>, b: &CudaSlice<T>) -> u64 {
    b.device_ptr(s).0
}

fn bench_lora(k: &Kernels, s: &Arc<CudaStream>, iters: usize) -> Res<(f64, f64)> {
    let (n, kd, m, r) = (4096usize, 3072usize, 3072usize, 16usize);
    let drop = Dropout { p: 0.1, seed: 1, offset: 0 };
    let sh = LoraShape { n, k: kd, m, r, scale: 1.0, drop, rows_per_split: lora::rows_per_split(n) };
    let (x, a, b) =
        (s.clone_htod(&bf16s(1, n * kd))?, s.clone_htod(&bf16s(2, r * kd))?, s.clone_htod(&bf16s(3, m * r))?);
    let (y, dy, dx) =
        (s.clone_htod(&bf16s(4, n * m))?, s.clone_htod(&bf16s(5, n * m))?, s.clone_htod(&bf16s(6, n * kd))?);
    let (h, g) = (s.alloc_zeros::<f32>(n * r)?, s.alloc_zeros::<f32>(n * r)?);
    let (da, db, ws) =
        (s.alloc_zeros::<f32>(r * kd)?, s.alloc_zeros::<f32>(m * r)?, s.alloc_zeros::<f32>(lora::workspace_len(&sh))?);
    let fw =
        ForwardBuffers { x: ptr(s, &x), a: ptr(s, &a), b: ptr(s, &b), y0: ptr(s, &y), y: ptr(s, &y), h: ptr(s, &h) };
    let bw = BackwardBuffers {
        x: fw.x,
        a: fw.a,
        b: fw.b,
        h: fw.h,
        dy: ptr(s, &dy),
        dx: ptr(s, &dx),
        g: ptr(s, &g),
        da: ptr(s, &da),
        db: ptr(s, &db),
        workspace: ptr(s, &ws),
    };
    // SAFETY: the buffers above have the documented shapes and live until the end.
    let fwd = time_ms(k, s, iters, || Ok(unsafe { lora::forward_gpu(k, s, Dtype::Bf16, &sh, &fw) }?))?;
    let bwd = time_ms(k, s, iters, || Ok(unsafe { lora::backward_gpu(k, s, Dtype::Bf16, &sh, &bw) }?))?;
    Ok((fwd, bwd))
}

fn bench_embed(k: &Kernels, s: &Arc<CudaStream>, iters: usize) -> Res<f64> {
    let (n, m, d, top) = (64usize, 10_000usize, 512usize, 5usize);
    let (a, b) = (s.clone_htod(&bf16s(7, n * d))?, s.clone_htod(&bf16s(8, m * d))?);
    let (an, bn, sm) = (s.alloc_zeros::<f32>(n * d)?, s.alloc_zeros::<f32>(m * d)?, s.alloc_zeros::<f32>(n * m)?);
    let (tv, ti) = (s.alloc_zeros::<f32>(n * top)?, s.alloc_zeros::<i32>(n * top)?);
    let (loss, grad) = (s.alloc_zeros::<f32>(1)?, s.alloc_zeros::<f32>(n * d)?);
    let p = |x: &CudaSlice<f32>| ptr(s, x);
    let (pa, pb) = (ptr(s, &a), ptr(s, &b));
    time_ms(k, s, iters, || {
        // SAFETY: as in bench_lora.
        unsafe {
            embed::l2_normalize(k, s, Dtype::Bf16, pa, n, d, p(&an), 0)?;
            embed::l2_normalize(k, s, Dtype::Bf16, pb, m, d, p(&bn), 0)?;
            embed::cosine_matrix(k, s, p(&an), p(&bn), n, m, d, p(&sm))?;
            embed::topk_rows(k, s, p(&sm), n, m, top, p(&tv), ptr(s, &ti))?;
            embed::identity_loss(k, s, Dtype::Bf16, pa, pb, n, d, p(&loss), p(&grad), 0)?;
        }
        Ok(())
    })
}

fn bench_adamw(k: &Kernels, s: &Arc<CudaStream>, iters: usize) -> Res<f64> {
    let len = 16 * 3072;
    let bufs: Vec<[CudaSlice<f32>; 4]> = (0..228)
        .map(|_| Ok([s.alloc_zeros(len)?, s.alloc_zeros(len)?, s.alloc_zeros(len)?, s.alloc_zeros(len)?]))
        .collect::<Res<_>>()?;
    let list: Vec<AdamwTensor> = bufs
        .iter()
        .map(|[p, g, m, v]| AdamwTensor { p: ptr(s, p), g: ptr(s, g), m: ptr(s, m), v: ptr(s, v), p_bf16: 0, len })
        .collect();
    let sc = AdamwScalars::new(&AdamwHyper::default(), 10);
    // SAFETY: as in bench_lora.
    time_ms(k, s, iters, || Ok(unsafe { adamw::adamw_step(k, s, Dtype::F32, &sc, &list) }?))
}

/// `--stage-ptx DIR`: compiles every source for sm_80 and sm_90 into the PTX cache `DIR` (no GPU
/// needed), for a GPU machine without NVRTC.
fn stage_ptx(dir: &str) -> Res<()> {
    let cache = PtxCache::new(dir);
    for source in Source::ALL {
        for sm in [80, 90] {
            cache.get(source, sm)?;
        }
    }
    eprintln!("PTX for sm_80 and sm_90 in {dir}");
    Ok(())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--stage-ptx") {
        return stage_ptx(args.get(1).ok_or("--stage-ptx needs a folder")?);
    }
    let iters: usize = args.first().map(|a| a.parse()).transpose()?.unwrap_or(50);
    let k0 = Kernels::new(0)?;
    // With NVRTC here: a fresh cache, so the load below times the compilation; without it, the
    // default (staged) cache.
    let fresh = std::env::temp_dir().join(format!("likeness-bench-ptx-{}", std::process::id()));
    let (k, compiled) = match nvrtc::ensure_loaded() {
        Ok(()) => (Kernels::with_context(k0.context().clone(), PtxCache::new(&fresh))?, true),
        Err(_) => (k0, false),
    };
    let t = Instant::now();
    k.load_all()?;
    let load_s = t.elapsed().as_secs_f64();
    let s = k.context().default_stream();
    let (fwd, bwd) = bench_lora(&k, &s, iters)?;
    let emb = bench_embed(&k, &s, iters)?;
    let adam = bench_adamw(&k, &s, iters)?;
    let _ = std::fs::remove_dir_all(&fresh);
    println!(
        "{{\"device_sm\": {}, \"nvrtc_compiled\": {compiled}, \"nvrtc_compile_and_load_s\": {load_s:.3}, \
         \"lora_fwd_ms\": {fwd:.4}, \"lora_bwd_ms\": {bwd:.4}, \"embed_ms\": {emb:.4}, \
         \"adamw_228x49152_ms\": {adam:.4}, \"iters\": {iters}}}",
        k.sm()
    );
    Ok(())
}
