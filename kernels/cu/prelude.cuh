// Prepended to every kernels/cu/*.cu source by likeness_kernels::Source::text() (NVRTC is
// given one string per program, so the sources do not #include this file themselves).
// Storage types are float, __half and __nv_bfloat16; arithmetic is always float.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned long long u64;
typedef unsigned int u32;
typedef long long i64;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even, like half::f16/bf16::from_f32 in the CPU references.
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// Inverted dropout, regenerable from (seed, offset, element index): the mask is never stored.
// Mirrors likeness_kernels::mask::keep bit for bit (SplitMix64's finaliser over a counter);
// `threshold` = round(p·2^24) is computed on the host so both sides compare the same integers.
struct Dropout {
    u64 seed;
    u64 offset;
    u32 threshold;  // 0: no dropout
    float scale;    // 1/(1-p)
};

__device__ __forceinline__ bool dropout_keep(const Dropout& d, u64 idx) {
    u64 z = d.seed + (d.offset + idx) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (u32)(z >> 40) >= d.threshold;
}

// x·mask/(1-p) for element `idx`; the identity when dropout is off.
__device__ __forceinline__ float dropout_apply(const Dropout& d, u64 idx, float v) {
    if (d.threshold == 0) return v;
    return dropout_keep(d, idx) ? v * d.scale : 0.0f;
}

// Deterministic warp sum (fixed butterfly order): the same bits for the same inputs.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
