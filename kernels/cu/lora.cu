// Fused rank-r work of a LoRA linear (LoRAFusion-style). The base GEMMs (x·Wᵀ, dy·W) stay in
// cuBLAS; these kernels are the memory-bound rest, four shapes of "skinny" products:
//   rank_down:   out[n,j]   = scale · Σ_k dropout(in)[n,k] · w[j,k]      (h = x'·Aᵀ, g = s·dy·B)
//   rank_up:     out[n,c]   = base[n,c] + scale · mask · Σ_j h[n,j] · w[c,j]  (y, dx epilogues)
//   rank_reduce: part[s,c,j] = Σ_{n∈split s} dropout(X)[n,c] · H[n,j]     (dB, dA, split over n)
//   rank_finish: out[c,j]   = scale · Σ_s part[s,c,j]   in split order (deterministic, no atomics)
// `w` is addressed through strides so the same kernel reads A (r×K) and B (M×r) in place.
// The small operands h, g (N×r) and the gradients dA, dB are float.

// LORA_THREADS, MAX_RANK, DOWN_ROWS, UP_ROWS, UP_COLS, RED_ROWS and RED_COLS are defined in
// front of this file from kernels/src/lora.rs (CU_DEFINES), which sizes the grids; DOWN_K, the
// k-tile of rank_down's shared memory, is this file's alone.
#define DOWN_K 64

template <typename T>
__device__ void rank_down(const T* in, i64 n_rows, i64 k_dim, const T* w, i64 w_sj, i64 w_sk,
                          int r, float scale, Dropout drop, float* out) {
    __shared__ float xs[DOWN_ROWS][DOWN_K + 1];
    __shared__ float ws[MAX_RANK][DOWN_K + 1];
    const int tid = threadIdx.x;
    const i64 row0 = (i64)blockIdx.x * DOWN_ROWS;
    const int outs = DOWN_ROWS * r;  // ≤ 1024 = 4 per thread
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (i64 k0 = 0; k0 < k_dim; k0 += DOWN_K) {
        for (int i = tid; i < DOWN_ROWS * DOWN_K; i += LORA_THREADS) {
            const int rr = i / DOWN_K, kk = i % DOWN_K;
            const i64 n = row0 + rr, k = k0 + kk;
            float v = 0.f;
            if (n < n_rows && k < k_dim) v = dropout_apply(drop, n * k_dim + k, to_f(in[n * k_dim + k]));
            xs[rr][kk] = v;
        }
        for (int i = tid; i < r * DOWN_K; i += LORA_THREADS) {
            const int j = i / DOWN_K, kk = i % DOWN_K;
            const i64 k = k0 + kk;
            ws[j][kk] = k < k_dim ? to_f(w[j * w_sj + k * w_sk]) : 0.f;
        }
        __syncthreads();
        for (int q = 0; q < 4; q++) {
            const int o = tid + q * LORA_THREADS;
            if (o >= outs) break;
            const int rr = o / r, j = o % r;
            float a = acc[q];
            for (int kk = 0; kk < DOWN_K; kk++) a += xs[rr][kk] * ws[j][kk];
            acc[q] = a;
        }
        __syncthreads();
    }
    for (int q = 0; q < 4; q++) {
        const int o = tid + q * LORA_THREADS;
        if (o >= outs) break;
        const i64 n = row0 + o / r;
        if (n < n_rows) out[n * r + o % r] = scale * acc[q];
    }
}

template <typename T>
__device__ void rank_up(const T* base, T* out, const float* h, i64 n_rows, i64 c_dim, const T* w,
                        i64 w_sc, i64 w_sj, int r, float scale, Dropout drop) {
    __shared__ float hs[UP_ROWS][MAX_RANK + 1];
    __shared__ float ws[UP_COLS][MAX_RANK + 1];
    const int tid = threadIdx.x;
    const i64 row0 = (i64)blockIdx.y * UP_ROWS, col0 = (i64)blockIdx.x * UP_COLS;
    for (int i = tid; i < UP_ROWS * r; i += LORA_THREADS) {
        const int rr = i / r, j = i % r;
        const i64 n = row0 + rr;
        hs[rr][j] = n < n_rows ? h[n * r + j] : 0.f;
    }
    for (int i = tid; i < UP_COLS * r; i += LORA_THREADS) {
        const int cc = i / r, j = i % r;
        const i64 c = col0 + cc;
        ws[cc][j] = c < c_dim ? to_f(w[c * w_sc + j * w_sj]) : 0.f;
    }
    __syncthreads();
    for (int o = tid; o < UP_ROWS * UP_COLS; o += LORA_THREADS) {
        const int rr = o / UP_COLS, cc = o % UP_COLS;
        const i64 n = row0 + rr, c = col0 + cc;
        if (n >= n_rows || c >= c_dim) continue;
        float a = 0.f;
        for (int j = 0; j < r; j++) a += hs[rr][j] * ws[cc][j];
        const i64 idx = n * c_dim + c;
        const float b = base ? to_f(base[idx]) : 0.f;
        out[idx] = from_f<T>(b + dropout_apply(drop, idx, scale * a));
    }
}

template <typename T>
__device__ void rank_reduce(const T* x, const float* hm, i64 n_rows, i64 c_dim, int r,
                            i64 rows_per_split, Dropout drop, float* part) {
    __shared__ float xs[RED_ROWS][RED_COLS + 1];
    __shared__ float hs[RED_ROWS][MAX_RANK + 1];
    const int tid = threadIdx.x;
    const i64 col0 = (i64)blockIdx.x * RED_COLS;
    const i64 n_begin = (i64)blockIdx.y * rows_per_split;
    const i64 n_end = min(n_rows, n_begin + rows_per_split);
    const int outs = RED_COLS * r;  // ≤ 4096 = 16 per thread
    float acc[16];
    for (int q = 0; q < 16; q++) acc[q] = 0.f;
    for (i64 n0 = n_begin; n0 < n_end; n0 += RED_ROWS) {
        for (int i = tid; i < RED_ROWS * RED_COLS; i += LORA_THREADS) {
            const int nn = i / RED_COLS, cc = i % RED_COLS;
            const i64 n = n0 + nn, c = col0 + cc;
            float v = 0.f;
            if (n < n_end && c < c_dim) v = dropout_apply(drop, n * c_dim + c, to_f(x[n * c_dim + c]));
            xs[nn][cc] = v;
        }
        for (int i = tid; i < RED_ROWS * r; i += LORA_THREADS) {
            const int nn = i / r, j = i % r;
            const i64 n = n0 + nn;
            hs[nn][j] = n < n_end ? hm[n * r + j] : 0.f;
        }
        __syncthreads();
        for (int q = 0; q < 16; q++) {
            const int o = tid + q * LORA_THREADS;
            if (o >= outs) break;
            const int cc = o % RED_COLS, j = o / RED_COLS;
            float a = acc[q];
            for (int nn = 0; nn < RED_ROWS; nn++) a += xs[nn][cc] * hs[nn][j];
            acc[q] = a;
        }
        __syncthreads();
    }
    float* dst = part + (i64)blockIdx.y * c_dim * r;
    for (int q = 0; q < 16; q++) {
        const int o = tid + q * LORA_THREADS;
        if (o >= outs) break;
        const i64 c = col0 + o % RED_COLS;
        if (c < c_dim) dst[c * r + o / RED_COLS] = acc[q];
    }
}

// out[c·o_sc + j·o_sj] = scale · Σ_s part[s][c][j], s in order.
extern "C" __global__ void lora_rank_finish(const float* part, int splits, i64 c_dim, int r,
                                            float scale, float* out, i64 o_sc, i64 o_sj) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= c_dim * r) return;
    float a = 0.f;
    for (int s = 0; s < splits; s++) a += part[(i64)s * c_dim * r + i];
    out[(i / r) * o_sc + (i % r) * o_sj] = scale * a;
}

#define LORA_ENTRIES(T, SUF)                                                                       \
    extern "C" __global__ void __launch_bounds__(LORA_THREADS) lora_rank_down_##SUF(               \
        const T* in, i64 n_rows, i64 k_dim, const T* w, i64 w_sj, i64 w_sk, int r, float scale,   \
        Dropout drop, float* out) {                                                                \
        rank_down<T>(in, n_rows, k_dim, w, w_sj, w_sk, r, scale, drop, out);                       \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(LORA_THREADS) lora_rank_up_##SUF(                 \
        const T* base, T* out, const float* h, i64 n_rows, i64 c_dim, const T* w, i64 w_sc,        \
        i64 w_sj, int r, float scale, Dropout drop) {                                              \
        rank_up<T>(base, out, h, n_rows, c_dim, w, w_sc, w_sj, r, scale, drop);                    \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(LORA_THREADS) lora_rank_reduce_##SUF(             \
        const T* x, const float* hm, i64 n_rows, i64 c_dim, int r, i64 rows_per_split,             \
        Dropout drop, float* part) {                                                               \
        rank_reduce<T>(x, hm, n_rows, c_dim, r, rows_per_split, drop, part);                       \
    }

LORA_ENTRIES(float, f32)
LORA_ENTRIES(__half, f16)
LORA_ENTRIES(__nv_bfloat16, bf16)
