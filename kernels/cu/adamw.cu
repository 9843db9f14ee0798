// Multi-tensor AdamW: every (param, grad, exp_avg, exp_avg_sq) of a launch is described in one
// by-value kernel argument (≤ ADAMW_MAX_TENSORS, well under the 4 KiB parameter limit), so a
// whole parameter group is one launch. Arithmetic is torch.optim.AdamW's (foreach=False)
// operation by operation, each rounded once (the _rn intrinsics forbid FMA contraction):
//   p ← p·(1 − lr·wd);  m ← m + (1−β1)·(g − m)   (torch's lerp, weight < 0.5 branch);
//   v ← v·β2 + ((1−β2)·g)·g;  p ← p + ((−lr/(1−β1ᵗ))·m) / (√v / √(1−β2ᵗ) + ε).
// Params and state are float (fp32 master weights); an optional bf16 copy of the updated
// params is written for bf16 compute.

// ADAMW_THREADS and ADAMW_MAX_TENSORS are defined in front of this file from
// kernels/src/adamw.rs (CU_DEFINES).

struct AdamwList {
    u64 p[ADAMW_MAX_TENSORS];
    u64 g[ADAMW_MAX_TENSORS];
    u64 m[ADAMW_MAX_TENSORS];
    u64 v[ADAMW_MAX_TENSORS];
    u64 p_bf16[ADAMW_MAX_TENSORS];  // 0: no bf16 copy
    u64 start[ADAMW_MAX_TENSORS + 1];  // element offsets of the tensors in one index space
    u32 count;
    u32 pad;
};

// Host-side f64 → f32 roundings of the step's scalars, as torch passes Python floats.
struct AdamwScalars {
    float decay;         // 1 − lr·wd
    float one_minus_b1;  // 1 − β1
    float beta2;
    float one_minus_b2;  // 1 − β2
    float bc2_sqrt;      // √(1 − β2ᵗ)
    float neg_step;      // −lr / (1 − β1ᵗ)
    float eps;
};

template <typename G>
__device__ void adamw_step(const AdamwList& L, const AdamwScalars& h) {
    const u64 total = L.start[L.count];
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        int lo = 0, hi = (int)L.count - 1;  // the tensor t with start[t] ≤ i < start[t+1]
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (L.start[mid] <= i) lo = mid; else hi = mid - 1;
        }
        const u64 e = i - L.start[lo];
        float* p = (float*)L.p[lo];
        float* m = (float*)L.m[lo];
        float* v = (float*)L.v[lo];
        const float g = to_f(((const G*)L.g[lo])[e]);
        const float pd = __fmul_rn(p[e], h.decay);
        const float mv = __fadd_rn(m[e], __fmul_rn(h.one_minus_b1, __fsub_rn(g, m[e])));
        const float vv = __fadd_rn(__fmul_rn(v[e], h.beta2), __fmul_rn(__fmul_rn(h.one_minus_b2, g), g));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vv), h.bc2_sqrt), h.eps);
        const float pn = __fadd_rn(pd, __fdiv_rn(__fmul_rn(h.neg_step, mv), denom));
        p[e] = pn;
        m[e] = mv;
        v[e] = vv;
        if (L.p_bf16[lo]) ((__nv_bfloat16*)L.p_bf16[lo])[e] = __float2bfloat16_rn(pn);
    }
}

#define ADAMW_ENTRY(G, SUF)                                                                        \
    extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)                                    \
        adamw_multi_tensor_##SUF(AdamwList list, AdamwScalars scalars) {                           \
        adamw_step<G>(list, scalars);                                                              \
    }

ADAMW_ENTRY(float, f32)
ADAMW_ENTRY(__half, f16)
ADAMW_ENTRY(__nv_bfloat16, bf16)
