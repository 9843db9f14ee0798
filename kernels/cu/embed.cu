// Embedding similarity: row L2-normalisation, the N×M cosine matrix, top-k per row and the
// paired identity loss mean(1 − cos(a_i, b_i)) with its gradient wrt the un-normalised a.
// Inputs are stored as T (float/half/bf16); every output is float. All reductions use a fixed
// order (warp butterflies, then warps in index order), so results are deterministic.

// EMB_THREADS is defined in front of this file from kernels/src/embed.rs (CU_DEFINES).
#define EMB_WARPS (EMB_THREADS / 32)

// One warp per row: out = v / max(‖v‖, eps) (torch.nn.functional.normalize), norms = ‖v‖.
template <typename T>
__device__ void l2_normalize(const T* in, i64 rows, i64 d, float eps, float* out, float* norms) {
    const int lane = threadIdx.x % 32;
    const i64 row = (i64)blockIdx.x * EMB_WARPS + threadIdx.x / 32;
    if (row >= rows) return;
    const T* v = in + row * d;
    float ss = 0.f;
    for (i64 i = lane; i < d; i += 32) {
        const float x = to_f(v[i]);
        ss += x * x;
    }
    const float norm = sqrtf(warp_sum(ss));
    const float inv = 1.0f / fmaxf(norm, eps);
    for (i64 i = lane; i < d; i += 32) out[row * d + i] = to_f(v[i]) * inv;
    if (lane == 0 && norms) norms[row] = norm;
}

// out[i,j] = Σ_d a[i,d]·b[j,d]: a 32×32 tile per block, 4 outputs per thread.
extern "C" __global__ void __launch_bounds__(EMB_THREADS)
emb_cosine_matrix_f32(const float* a, const float* b, i64 n, i64 m, i64 d, float* out) {
    __shared__ float as[32][33];
    __shared__ float bs[32][33];
    const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
    const i64 i0 = (i64)blockIdx.y * 32, j0 = (i64)blockIdx.x * 32;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (i64 d0 = 0; d0 < d; d0 += 32) {
        for (int q = 0; q < 4; q++) {
            const int rr = ty + 8 * q;
            const i64 dd = d0 + tx;
            as[rr][tx] = (i0 + rr < n && dd < d) ? a[(i0 + rr) * d + dd] : 0.f;
            bs[rr][tx] = (j0 + rr < m && dd < d) ? b[(j0 + rr) * d + dd] : 0.f;
        }
        __syncthreads();
        for (int q = 0; q < 4; q++) {
            const int rr = ty + 8 * q;
            float s = acc[q];
            for (int k = 0; k < 32; k++) s += as[rr][k] * bs[tx][k];
            acc[q] = s;
        }
        __syncthreads();
    }
    for (int q = 0; q < 4; q++) {
        const i64 i = i0 + ty + 8 * q, j = j0 + tx;
        if (i < n && j < m) out[i * m + j] = acc[q];
    }
}

// A total order on floats as unsigned keys: larger key = larger value; NaN above +inf (as
// torch.topk ranks NaN largest). Mirrors likeness_kernels::embed::order_key.
__device__ __forceinline__ u32 order_key(float v) {
    if (v != v) return 0xffffffffu;
    const u32 b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Whether (ka, ia) comes before (kb, ib): larger value first, ties by smaller index.
__device__ __forceinline__ bool precedes(u32 ka, int ia, u32 kb, int ib) {
    return ka > kb || (ka == kb && ia < ib);
}

// One block per row: k rounds of a block-wide arg-max over the elements that come after the
// previous pick in the order above (no marking, no sort; O(k·M) per row, k is small).
extern "C" __global__ void __launch_bounds__(EMB_THREADS)
emb_topk_rows_f32(const float* s, i64 n, i64 m, int k, float* out_val, int* out_idx) {
    __shared__ u32 keys[EMB_THREADS];
    __shared__ int idxs[EMB_THREADS];
    const i64 row = blockIdx.x;
    if (row >= n) return;
    const float* v = s + row * m;
    u32 prev_key = 0xffffffffu;
    int prev_idx = -1;  // "before everything": the first round takes the overall best
    for (int t = 0; t < k; t++) {
        u32 best_key = 0;
        int best_idx = -1;
        for (i64 j = threadIdx.x; j < m; j += EMB_THREADS) {
            const u32 kj = order_key(v[j]);
            if (prev_idx >= 0 && !precedes(prev_key, prev_idx, kj, (int)j)) continue;
            if (best_idx < 0 || precedes(kj, (int)j, best_key, best_idx)) {
                best_key = kj;
                best_idx = (int)j;
            }
        }
        keys[threadIdx.x] = best_key;
        idxs[threadIdx.x] = best_idx;
        __syncthreads();
        for (int w = EMB_THREADS / 2; w > 0; w >>= 1) {
            if (threadIdx.x < w) {
                const int oi = idxs[threadIdx.x + w];
                const u32 ok = keys[threadIdx.x + w];
                const int mi = idxs[threadIdx.x];
                if (oi >= 0 && (mi < 0 || precedes(ok, oi, keys[threadIdx.x], mi))) {
                    keys[threadIdx.x] = ok;
                    idxs[threadIdx.x] = oi;
                }
            }
            __syncthreads();
        }
        prev_key = keys[0];
        prev_idx = idxs[0];
        if (threadIdx.x == 0) {
            out_idx[row * k + t] = prev_idx;
            out_val[row * k + t] = prev_idx >= 0 ? v[prev_idx] : 0.f;
        }
        __syncthreads();
    }
}

// One block; warp w takes rows w, w+8, …: cos_i = â·b̂ with â = a/max(‖a‖, eps),
// loss = (1/N)·Σ(1 − cos_i), grad_a_i = −(1/N)·(b̂ − cos_i·â)/‖a_i‖ (b̂/eps when ‖a_i‖ ≤ eps).
template <typename T>
__device__ void identity_loss(const T* a, const T* b, i64 n, i64 d, float eps, float* loss,
                              float* grad_a, float* cos_out) {
    __shared__ float warp_loss[EMB_WARPS];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const float inv_n = 1.0f / (float)n;
    float my_loss = 0.f;
    for (i64 row = warp; row < n; row += EMB_WARPS) {
        const T* ar = a + row * d;
        const T* br = b + row * d;
        float ab = 0.f, aa = 0.f, bb = 0.f;
        for (i64 i = lane; i < d; i += 32) {
            const float x = to_f(ar[i]), y = to_f(br[i]);
            ab += x * y;
            aa += x * x;
            bb += y * y;
        }
        ab = warp_sum(ab);
        aa = warp_sum(aa);
        bb = warp_sum(bb);
        const float na = sqrtf(aa), ca = fmaxf(na, eps), cb = fmaxf(sqrtf(bb), eps);
        const float cosv = ab / (ca * cb);
        my_loss += 1.0f - cosv;
        if (lane == 0 && cos_out) cos_out[row] = cosv;
        // With ‖a‖ > eps the normalisation's Jacobian (I − ââᵀ)/‖a‖ removes the â component.
        const float ga = na > eps ? cosv : 0.f;
        for (i64 i = lane; i < d; i += 32) {
            const float x = to_f(ar[i]), y = to_f(br[i]);
            grad_a[row * d + i] = -inv_n * (y / cb - ga * x / ca) / ca;
        }
    }
    if (lane == 0) warp_loss[warp] = my_loss;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.f;
        for (int w = 0; w < EMB_WARPS; w++) total += warp_loss[w];
        *loss = total * inv_n;
    }
}

#define EMB_ENTRIES(T, SUF)                                                                        \
    extern "C" __global__ void __launch_bounds__(EMB_THREADS) emb_l2_normalize_##SUF(              \
        const T* in, i64 rows, i64 d, float eps, float* out, float* norms) {                       \
        l2_normalize<T>(in, rows, d, eps, out, norms);                                             \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(EMB_THREADS) emb_identity_loss_##SUF(             \
        const T* a, const T* b, i64 n, i64 d, float eps, float* loss, float* grad_a,               \
        float* cos_out) {                                                                          \
        identity_loss<T>(a, b, n, d, eps, loss, grad_a, cos_out);                                  \
    }

EMB_ENTRIES(float, f32)
EMB_ENTRIES(__half, f16)
EMB_ENTRIES(__nv_bfloat16, bf16)
