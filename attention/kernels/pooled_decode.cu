// Pooled decode attention over the slab pool, for mx.fast.cuda_kernel (header part).
//
// One CUDA block per (kv head [x q-head subgroup], context chunk, sequence).  The block
// reads its chunk of the sequence's pages in place (block table -> slab, local block) and
// computes attention for GB q heads of the kv group at once, so K and V are read once per
// kv head.  Threads are split into row groups of TPR = D / VEC lanes; each lane owns one
// 16-byte vector (VEC elements) of a K/V row.  A row group streams units of U tokens with
// its own online softmax (exp2, q pre-scaled by scale*log2(e)); row groups are merged in
// shared memory at the end.  With one chunk the block writes the output directly; with
// several it writes a normalised partial output and its log2-sum-exp, and
// slabserve_merge_chunks combines the chunks.
//
// Invariants the host keeps (attention/native_cuda.py):
//   * D in {64, 128}, BS in {16, 32, 64}, U divides BS, NT a multiple of 32, GB divides G;
//   * slabs are row-contiguous [sb * HKV * BS, D] (sb = slab_blocks); table rows are [nblk] valid block ids;
//   * 1 <= lengths[b] <= nblk * BS.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace slabserve {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) {
  return __float2half(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

// 16 bytes -> VEC floats.
__device__ __forceinline__ void unpack(const uint4& r, float* f, const float*) {
  f[0] = __uint_as_float(r.x);
  f[1] = __uint_as_float(r.y);
  f[2] = __uint_as_float(r.z);
  f[3] = __uint_as_float(r.w);
}
__device__ __forceinline__ void unpack(const uint4& r, float* f, const __half*) {
  const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}
__device__ __forceinline__ void unpack(const uint4& r, float* f, const __nv_bfloat16*) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ uint4 ld16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

template <typename TQ, typename T, int D, int BS, int HKV, int G, int GB, int NS, int U, int NT,
          bool DIRECT>
__device__ __forceinline__ void pooled_decode(
    const TQ* q, const int* table, const int* lengths, int nblk, int sb, float qscale,
    const T* const* ktab, const T* const* vtab, TQ* out, float* opart, float* lse) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int TPR = D / VEC;
  constexpr int RW = 32 / TPR;
  constexpr int R = NT / TPR;
  constexpr int GS = G / GB;
  constexpr int HQ = HKV * G;
  static_assert(D % VEC == 0 && 32 % TPR == 0 && NT % 32 == 0, "bad thread shape");
  static_assert(BS % U == 0 && G % GB == 0, "bad tiling");

  const int tid = threadIdx.x, warp = tid >> 5, lane32 = tid & 31;
  const int rgw = lane32 / TPR, lane = lane32 % TPR, rg = warp * RW + rgw;
  const int kvh = blockIdx.x / GS, h0 = kvh * G + (blockIdx.x % GS) * GB;
  const int c = blockIdx.y, nchunk = gridDim.y, b = blockIdx.z;
  const int len = lengths[b];
  const int ppc = (nblk + nchunk - 1) / nchunk;
  const int tok_begin = c * ppc * BS;
  const int tok_end = min((c + 1) * ppc * BS, len);
  if (tok_begin >= tok_end) {  // an empty chunk of a short sequence (never when DIRECT)
    if (!DIRECT && tid < GB) lse[(b * HQ + h0 + tid) * nchunk + c] = -INFINITY;
    return;
  }

  float qv[GB][VEC], m[GB], l[GB], acc[GB][VEC];
#pragma unroll
  for (int g = 0; g < GB; ++g) {
    const TQ* qrow = q + (size_t)(b * HQ + h0 + g) * D + lane * VEC;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      qv[g][i] = to_f(qrow[i]) * qscale;
      acc[g][i] = 0.f;
    }
    m[g] = -INFINITY;
    l[g] = 0.f;
  }

  const int* trow = table + (size_t)b * nblk;
  // The loop bound depends on the warp only, so every lane reaches the shuffles.
  for (int base = tok_begin + warp * RW * U; base < tok_end; base += R * U) {
    const int u0 = base + rgw * U;
    const bool active = u0 < tok_end;
    uint4 kr[U], vr[U];
    if (active) {
      const int blk = trow[u0 / BS];
      const int s = NS == 1 ? 0 : blk / sb;
      const size_t off =
          ((size_t)((blk - s * sb) * HKV + kvh) * BS + (u0 % BS)) * D + lane * VEC;
      const T* kp = ktab[s] + off;
      const T* vp = vtab[s] + off;
#pragma unroll
      for (int j = 0; j < U; ++j) kr[j] = ld16(kp + j * D);
#pragma unroll
      for (int j = 0; j < U; ++j) vr[j] = ld16(vp + j * D);
    } else {
#pragma unroll
      for (int j = 0; j < U; ++j) kr[j] = vr[j] = make_uint4(0u, 0u, 0u, 0u);
    }
    float sc[GB][U];
#pragma unroll
    for (int j = 0; j < U; ++j) {
      float kf[VEC];
      unpack(kr[j], kf, (const T*)nullptr);
#pragma unroll
      for (int g = 0; g < GB; ++g) {
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) d = fmaf(qv[g][i], kf[i], d);
        sc[g][j] = d;
      }
    }
#pragma unroll
    for (int o = TPR / 2; o > 0; o >>= 1) {
#pragma unroll
      for (int g = 0; g < GB; ++g) {
#pragma unroll
        for (int j = 0; j < U; ++j) sc[g][j] += __shfl_xor_sync(0xffffffffu, sc[g][j], o);
      }
    }
    const int nvalid = active ? min(U, tok_end - u0) : 0;
#pragma unroll
    for (int g = 0; g < GB; ++g) {
      float mx = m[g];
#pragma unroll
      for (int j = 0; j < U; ++j) mx = j < nvalid ? fmaxf(mx, sc[g][j]) : mx;
      const float ms = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2f(m[g] - ms);
      float psum = 0.f;
#pragma unroll
      for (int j = 0; j < U; ++j) {
        sc[g][j] = j < nvalid ? exp2f(sc[g][j] - ms) : 0.f;
        psum += sc[g][j];
      }
      l[g] = l[g] * alpha + psum;
      m[g] = mx;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[g][i] *= alpha;
    }
#pragma unroll
    for (int j = 0; j < U; ++j) {
      if (j < nvalid) {  // masked rows may hold stale data: never multiply them
        float vf[VEC];
        unpack(vr[j], vf, (const T*)nullptr);
#pragma unroll
        for (int g = 0; g < GB; ++g) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[g][i] = fmaf(sc[g][j], vf[i], acc[g][i]);
        }
      }
    }
  }

  // Merge the R row groups of this block.
  __shared__ float sm_acc[R][GB * D];
  __shared__ float sm_m[R][GB];
  __shared__ float sm_l[R][GB];
#pragma unroll
  for (int g = 0; g < GB; ++g) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) sm_acc[rg][g * D + lane * VEC + i] = acc[g][i];
    if (lane == 0) {
      sm_m[rg][g] = m[g];
      sm_l[rg][g] = l[g];
    }
  }
  __syncthreads();
  for (int idx = tid; idx < GB * D; idx += NT) {
    const int g = idx / D;
    float mx = -INFINITY;
#pragma unroll
    for (int r = 0; r < R; ++r) mx = fmaxf(mx, sm_m[r][g]);
    float lsum = 0.f, a = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float w = exp2f(sm_m[r][g] - mx);  // 0 for a row group that saw no token
      lsum = fmaf(sm_l[r][g], w, lsum);
      a = fmaf(sm_acc[r][idx], w, a);
    }
    const int h = h0 + g, d = idx % D;
    if (DIRECT) {
      out[(size_t)(b * HQ + h) * D + d] = from_f<TQ>(a / lsum);
    } else {
      opart[((size_t)(b * HQ + h) * nchunk + c) * D + d] = a / lsum;
      if (d == 0) lse[(b * HQ + h) * nchunk + c] = mx + log2f(lsum);
    }
  }
}

// Combine C chunk partials: out[bh, d] = sum_c 2^(lse_c - M) o_c[d] / sum_c 2^(lse_c - M).
template <typename TQ, int D>
__device__ __forceinline__ void merge_chunks(const float* opart, const float* lse, int nchunk,
                                             TQ* out) {
  const int bh = blockIdx.x, d = threadIdx.x;
  const float* ls = lse + (size_t)bh * nchunk;
  float mx = -INFINITY;
  for (int c = 0; c < nchunk; ++c) mx = fmaxf(mx, ls[c]);
  float lsum = 0.f, a = 0.f;
  for (int c = 0; c < nchunk; ++c) {
    const float lc = ls[c];
    if (lc != -INFINITY) {
      const float w = exp2f(lc - mx);
      lsum += w;
      a = fmaf(w, opart[((size_t)bh * nchunk + c) * D + d], a);
    }
  }
  out[(size_t)bh * D + d] = from_f<TQ>(a / lsum);
}

}  // namespace slabserve
