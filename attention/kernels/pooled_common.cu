// Pooled decode attention over the slab pool, for mx.fast.cuda_kernel (header part 1 of
// 2, with pooled_decode.cu; pooled_decode_mma.cu may follow): conversions, vector loads and
// the chunk-merge helpers every variant shares.
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
//   * 1 <= lengths[b] <= nblk * BS; nblk is a table row's stride, not a sequence's extent:
//     chunks split each sequence's own pages (chunk_span), so a table wider than every row
//     (a step graph's device table) costs nothing.
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

// Tokens [begin, end) of chunk c for a sequence of len tokens: the sequence's own pages
// split evenly over at most nchunk chunks (the grid's count, planned for any length) of at
// least mp pages each.  Chunks past what the sequence uses are empty (begin >= end).
template <int BS>
__device__ __forceinline__ void chunk_span(int len, int c, int nchunk, int mp, int& begin,
                                           int& end) {
  const int pages = (len + BS - 1) / BS;
  const int used = max(1, min(nchunk, pages / mp));
  const int ppc = (pages + used - 1) / used;
  begin = c * ppc * BS;
  end = min(begin + ppc * BS, len);
}

// 16 bytes -> VEC floats.
__device__ __forceinline__ void unpack(const uint4& r, float* f, const float*) {
  f[0] = __uint_as_float(r.x);
  f[1] = __uint_as_float(r.y);
  f[2] = __uint_as_float(r.z);
  f[3] = __uint_as_float(r.w);
}
__device__ __forceinline__ float2 to_f2(__half2 x) { return __half22float2(x); }
__device__ __forceinline__ float2 to_f2(__nv_bfloat162 x) { return __bfloat1622float2(x); }
template <typename P2>  // __half2 or __nv_bfloat162: 4 pairs
__device__ __forceinline__ void unpack_pairs(const uint4& r, float* f) {
  const P2* h = reinterpret_cast<const P2*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = to_f2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}
__device__ __forceinline__ void unpack(const uint4& r, float* f, const __half*) {
  unpack_pairs<__half2>(r, f);
}
__device__ __forceinline__ void unpack(const uint4& r, float* f, const __nv_bfloat16*) {
  unpack_pairs<__nv_bfloat162>(r, f);
}

__device__ __forceinline__ uint4 ld16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// This lane's part of q.k for U tokens and GB heads (its VEC dimensions of each K row):
// out(g, j, value).
template <typename T, int GB, int U, int VEC, typename Out>
__device__ __forceinline__ void partial_scores(const uint4 (&kr)[U], const float (&qv)[GB][VEC],
                                               Out out) {
#pragma unroll
  for (int j = 0; j < U; ++j) {
    float kf[VEC];
    unpack(kr[j], kf, (const T*)nullptr);
#pragma unroll
    for (int g = 0; g < GB; ++g) {
      float d = 0.f;
#pragma unroll
      for (int i = 0; i < VEC; ++i) d = fmaf(qv[g][i], kf[i], d);
      out(g, j, d);
    }
  }
}

// One head's online-softmax state: raise its running max to `mx`, rescaling the sum and
// the accumulator, only when the max grows (exp2(-inf) = 0 at first).
template <int VEC>
__device__ __forceinline__ void raise_max(float& m, float& l, float (&acc)[VEC], float mx) {
  if (mx > m) {
    const float alpha = exp2f(m - mx);
    l *= alpha;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] *= alpha;
    m = mx;
  }
}

// acc[g] += w[g][j] * V row j for the valid rows j < nvalid (V read through vrow(j) only
// when needed, to keep registers low; masked rows may hold stale data: never multiplied).
template <typename T, int GB, int U, int VEC, typename VRow>
__device__ __forceinline__ void accumulate_v(VRow vrow, int nvalid, const float (&w)[GB][U],
                                             float (&acc)[GB][VEC]) {
#pragma unroll
  for (int j = 0; j < U; ++j) {
    if (j < nvalid) {
      float vf[VEC];
      unpack(vrow(j), vf, (const T*)nullptr);
#pragma unroll
      for (int g = 0; g < GB; ++g) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[g][i] = fmaf(w[g][j], vf[i], acc[g][i]);
      }
    }
  }
}

// Scores of U tokens for GB heads from this lane's K vectors, reduced over the row group,
// then the online-softmax update and the V accumulation.  Rows j >= nvalid are masked.
template <typename T, int GB, int U, int VEC, int TPR, typename VRow>
__device__ __forceinline__ void consume_unit(const uint4 (&kr)[U], VRow vrow,
                                             int nvalid, const float (&qv)[GB][VEC],
                                             float (&m)[GB], float (&l)[GB],
                                             float (&acc)[GB][VEC]) {
  float sc[GB][U];
  partial_scores<T, GB, U, VEC>(kr, qv, [&](int g, int j, float d) { sc[g][j] = d; });
#pragma unroll
  for (int o = TPR / 2; o > 0; o >>= 1) {
#pragma unroll
    for (int g = 0; g < GB; ++g) {
#pragma unroll
      for (int j = 0; j < U; ++j) sc[g][j] += __shfl_xor_sync(0xffffffffu, sc[g][j], o);
    }
  }
#pragma unroll
  for (int g = 0; g < GB; ++g) {
    float mx = m[g];
#pragma unroll
    for (int j = 0; j < U; ++j) mx = j < nvalid ? fmaxf(mx, sc[g][j]) : mx;
    raise_max<VEC>(m[g], l[g], acc[g], mx);
    const float ms = mx == -INFINITY ? 0.f : mx;  // no valid row yet: every p is 0
    float psum = 0.f;
#pragma unroll
    for (int j = 0; j < U; ++j) {
      sc[g][j] = j < nvalid ? exp2f(sc[g][j] - ms) : 0.f;
      psum += sc[g][j];
    }
    l[g] += psum;
  }
  accumulate_v<T, GB, U, VEC>(vrow, nvalid, sc, acc);
}

// One output element merged over its chunks: sum_c 2^(lse_c - M) o_c / sum_c 2^(lse_c - M),
// M the largest lse.  ``ls``: the nchunk log2-sum-exps of this (sequence, head); ``op``: its
// element of chunk 0's partial output, chunk c's `stride` floats further.  The loads of
// MC chunks are issued together (clamped to the last chunk, masked after), then merged
// online, so nchunk chunks cost about nchunk / MC memory round trips, not 2 * nchunk.
// Empty chunks (lse -inf) may hold stale partials: never multiplied.
template <int MC, typename Ld>
__device__ __forceinline__ float merge_column(const float* ls, const float* op, int nchunk,
                                              int stride, Ld ld) {
  float m = -INFINITY, lsum = 0.f, a = 0.f;
  for (int c0 = 0; c0 < nchunk; c0 += MC) {
    float lv[MC], ov[MC];
#pragma unroll
    for (int k = 0; k < MC; ++k) {
      const int c = min(c0 + k, nchunk - 1);
      lv[k] = ld(ls + c);
      ov[k] = ld(op + (size_t)c * stride);
    }
    float bm = m;
#pragma unroll
    for (int k = 0; k < MC; ++k) bm = c0 + k < nchunk ? fmaxf(bm, lv[k]) : bm;
    const float alpha = m == -INFINITY ? 0.f : exp2f(m - bm);  // sums are 0 while m is -inf
    lsum *= alpha;
    a *= alpha;
    m = bm;
#pragma unroll
    for (int k = 0; k < MC; ++k) {
      const float w = (c0 + k < nchunk && lv[k] != -INFINITY) ? exp2f(lv[k] - bm) : 0.f;
      lsum += w;
      a = w > 0.f ? fmaf(w, ov[k], a) : a;
    }
  }
  return a / lsum;
}

// After a split block wrote its chunk's partial output and log2-sum-exp: count the chunk in
// counters[b * gridDim.x + blockIdx.x].  The block that counts last merges every chunk of
// (sequence b, its GB heads) into `out` and resets the counter to 0 for the next launch, so
// no separate merge launch is needed (threadFenceReduction pattern: fence, then count;
// the last block fences again and reads the partials past L1 with ld.global.cg).
template <typename TQ, int D, int GB, int NT>
__device__ __forceinline__ void finish_split(const float* opart, const float* lse,
                                             int* counters, int b, int hq, int h0, int nchunk,
                                             TQ* out) {
  __shared__ int last;
  __threadfence();
  __syncthreads();
  const int slot = b * gridDim.x + blockIdx.x;
  if (threadIdx.x == 0) last = atomicAdd(counters + slot, 1) == nchunk - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int idx = threadIdx.x; idx < GB * D; idx += NT) {
    const int g = idx / D, d = idx % D, bh = b * hq + h0 + g;
    const float r = merge_column<8>(lse + (size_t)bh * nchunk,
                                    opart + (size_t)bh * nchunk * D + d, nchunk, D,
                                    [](const float* p) { return __ldcg(p); });
    out[(size_t)bh * D + d] = from_f<TQ>(r);
  }
  if (threadIdx.x == 0) counters[slot] = 0;
}

// A chunk past the end of a short sequence: an empty partial (log2-sum-exp -inf).
template <typename TQ, int D, int GB, int NT, bool DIRECT>
__device__ __forceinline__ void empty_chunk(const float* opart, float* lse, int* counters,
                                            int b, int hq, int h0, int c, int nchunk,
                                            TQ* out) {
  if (DIRECT) return;
  if ((int)threadIdx.x < GB) lse[(b * hq + h0 + threadIdx.x) * nchunk + c] = -INFINITY;
  if (counters) finish_split<TQ, D, GB, NT>(opart, lse, counters, b, hq, h0, nchunk, out);
}

// Combine R partial results of a block held in shared memory (sm_acc: R*GB*D floats,
// sm_ml: R*GB maxima then R*GB sums, all log2-domain) and write the output (DIRECT) or this
// chunk's partial output and log2-sum-exp (then, with counters, the last chunk's block
// merges all: finish_split).  Callers __syncthreads() before.
template <typename TQ, int D, int GB, int R, int NT, bool DIRECT>
__device__ __forceinline__ void combine_groups(const float* sm_acc, const float* sm_ml, int b,
                                               int hq, int h0, int c, int nchunk, TQ* out,
                                               float* opart, float* lse, int* counters) {
  for (int idx = threadIdx.x; idx < GB * D; idx += NT) {
    const int g = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int r = 0; r < R; ++r) mx = fmaxf(mx, sm_ml[r * GB + g]);
    float lsum = 0.f, a = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float w = exp2f(sm_ml[r * GB + g] - mx);  // 0 for a group with no token
      lsum = fmaf(sm_ml[(R + r) * GB + g], w, lsum);
      a = fmaf(sm_acc[(r * GB + g) * D + d], w, a);
    }
    const int h = h0 + g;
    if (DIRECT) {
      out[(size_t)(b * hq + h) * D + d] = from_f<TQ>(a / lsum);
    } else {
      opart[((size_t)(b * hq + h) * nchunk + c) * D + d] = a / lsum;
      if (d == 0) lse[(b * hq + h) * nchunk + c] = mx + log2f(lsum);
    }
  }
  if (!DIRECT && counters)
    finish_split<TQ, D, GB, NT>(opart, lse, counters, b, hq, h0, nchunk, out);
}

// Combine C chunk partials (the merge launch after a split launch): one block per
// (sequence, head), one thread per element.
template <typename TQ, int D>
__device__ __forceinline__ void merge_chunks(const float* opart, const float* lse, int nchunk,
                                             TQ* out) {
  const int bh = blockIdx.x, d = threadIdx.x;
  const float r = merge_column<8>(lse + (size_t)bh * nchunk,
                                  opart + (size_t)bh * nchunk * D + d, nchunk, D,
                                  [](const float* p) { return __ldg(p); });
  out[(size_t)bh * D + d] = from_f<TQ>(r);
}

}  // namespace slabserve
