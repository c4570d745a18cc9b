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

// Scores of U tokens for GB heads from this lane's K vectors, reduced over the row group,
// then the online-softmax update and the V accumulation (V row j read through vrow(j) only
// when needed, to keep registers low).  Rows j >= nvalid are masked.
template <typename T, int GB, int U, int VEC, int TPR, typename VRow>
__device__ __forceinline__ void consume_unit(const uint4 (&kr)[U], VRow vrow,
                                             int nvalid, const float (&qv)[GB][VEC],
                                             float (&m)[GB], float (&l)[GB],
                                             float (&acc)[GB][VEC]) {
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
#pragma unroll
  for (int g = 0; g < GB; ++g) {
    float mx = m[g];
#pragma unroll
    for (int j = 0; j < U; ++j) mx = j < nvalid ? fmaxf(mx, sc[g][j]) : mx;
    if (mx > m[g]) {  // rescale only when the running max grows (exp2(-inf) = 0 at first)
      const float alpha = exp2f(m[g] - mx);
      l[g] *= alpha;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[g][i] *= alpha;
      m[g] = mx;
    }
    const float ms = mx == -INFINITY ? 0.f : mx;  // no valid row yet: every p is 0
    float psum = 0.f;
#pragma unroll
    for (int j = 0; j < U; ++j) {
      sc[g][j] = j < nvalid ? exp2f(sc[g][j] - ms) : 0.f;
      psum += sc[g][j];
    }
    l[g] += psum;
  }
#pragma unroll
  for (int j = 0; j < U; ++j) {
    if (j < nvalid) {  // masked rows may hold stale data: never multiply them
      float vf[VEC];
      unpack(vrow(j), vf, (const T*)nullptr);
#pragma unroll
      for (int g = 0; g < GB; ++g) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[g][i] = fmaf(sc[g][j], vf[i], acc[g][i]);
      }
    }
  }
}

// After a split block wrote its chunk's partial output and log2-sum-exp: count the chunk in
// counters[b * gridDim.x + blockIdx.x].  The block that counts last merges every chunk of
// (sequence b, its GB heads) into `out` and resets the counter to 0 for the next launch, so
// no separate merge launch is needed (threadFenceReduction pattern: fence, then count;
// the last block fences again and reads the partials past L1).
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
    const float* ls = lse + (size_t)bh * nchunk;
    float mx = -INFINITY;
    for (int c = 0; c < nchunk; ++c) mx = fmaxf(mx, __ldcg(ls + c));
    float lsum = 0.f, a = 0.f;
    for (int c = 0; c < nchunk; ++c) {
      const float lc = __ldcg(ls + c);
      if (lc != -INFINITY) {  // an empty chunk of a short sequence
        const float w = exp2f(lc - mx);
        lsum += w;
        a = fmaf(w, __ldcg(opart + ((size_t)bh * nchunk + c) * D + d), a);
      }
    }
    out[(size_t)bh * D + d] = from_f<TQ>(a / lsum);
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

// Merge the R row groups of a block (sm_acc: R*GB*D floats, sm_ml: 2*R*GB floats) and
// write the output (DIRECT) or this chunk's partial output and log2-sum-exp.
template <typename TQ, int D, int GB, int R, int NT, int VEC, bool DIRECT>
__device__ __forceinline__ void merge_rows(const float (&m)[GB], const float (&l)[GB],
                                           const float (&acc)[GB][VEC], float* sm_acc,
                                           float* sm_ml, int rg, int lane, int b, int hq,
                                           int h0, int c, int nchunk, TQ* out, float* opart,
                                           float* lse, int* counters) {
#pragma unroll
  for (int g = 0; g < GB; ++g) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) sm_acc[(rg * GB + g) * D + lane * VEC + i] = acc[g][i];
    if (lane == 0) {
      sm_ml[rg * GB + g] = m[g];
      sm_ml[(R + rg) * GB + g] = l[g];
    }
  }
  __syncthreads();
  combine_groups<TQ, D, GB, R, NT, DIRECT>(sm_acc, sm_ml, b, hq, h0, c, nchunk, out, opart,
                                           lse, counters);
}

// What every variant computes before its loop.
template <typename TQ, typename T, int D, int G, int GB, int HKV, int NT>
struct BlockSetup {
  static constexpr int VEC = 16 / sizeof(T);
  static constexpr int TPR = D / VEC;
  static constexpr int RW = 32 / TPR;
  static constexpr int R = NT / TPR;
  static constexpr int HQ = HKV * G;
  static_assert(D % VEC == 0 && 32 % TPR == 0 && NT % 32 == 0, "bad thread shape");
  int warp, rgw, lane, rg, kvh, h0, c, nchunk, b, tok_begin, tok_end;

  template <int BS>
  __device__ __forceinline__ bool init(const int* lengths, int nblk) {
    const int tid = threadIdx.x, lane32 = tid & 31;
    warp = tid >> 5;
    rgw = lane32 / TPR;
    lane = lane32 % TPR;
    rg = warp * RW + rgw;
    kvh = blockIdx.x / (G / GB);
    h0 = kvh * G + (blockIdx.x % (G / GB)) * GB;
    c = blockIdx.y;
    nchunk = gridDim.y;
    b = blockIdx.z;
    const int len = lengths[b];
    const int ppc = (nblk + nchunk - 1) / nchunk;
    tok_begin = c * ppc * BS;
    tok_end = min((c + 1) * ppc * BS, len);
    return tok_begin < tok_end;
  }

  __device__ __forceinline__ void load_q(const TQ* q, float qscale, float (&qv)[GB][VEC],
                                         float (&m)[GB], float (&l)[GB],
                                         float (&acc)[GB][VEC]) const {
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
  }

  // Element offset of this lane's vector of row `u0` of kv head kvh in its slab.
  template <int BS>
  __device__ __forceinline__ size_t offset(int blk, int s, int sb, int u0) const {
    return ((size_t)((blk - s * sb) * HKV + kvh) * BS + (u0 % BS)) * D + lane * VEC;
  }
};

// Variant 1: loads straight into registers, no pipelining across units.
template <typename TQ, typename T, int D, int BS, int HKV, int G, int GB, int NS, int U, int NT,
          bool DIRECT>
__device__ __forceinline__ void pooled_decode(
    const TQ* q, const int* table, const int* lengths, int nblk, int sb, float qscale,
    const T* const* ktab, const T* const* vtab, TQ* out, float* opart, float* lse,
    int* counters) {
  using S = BlockSetup<TQ, T, D, G, GB, HKV, NT>;
  constexpr int VEC = S::VEC, R = S::R, RW = S::RW;
  static_assert(BS % U == 0 && G % GB == 0, "bad tiling");
  S st;
  if (!st.template init<BS>(lengths, nblk)) {  // an empty chunk of a short sequence
    empty_chunk<TQ, D, GB, NT, DIRECT>(opart, lse, counters, st.b, S::HQ, st.h0, st.c,
                                       st.nchunk, out);
    return;
  }
  float qv[GB][VEC], m[GB], l[GB], acc[GB][VEC];
  st.load_q(q, qscale, qv, m, l, acc);
  const int* trow = table + (size_t)st.b * nblk;
  // The loop bound depends on the warp only, so every lane reaches the shuffles.
  for (int base = st.tok_begin + st.warp * RW * U; base < st.tok_end; base += R * U) {
    const int u0 = base + st.rgw * U;
    const bool active = u0 < st.tok_end;
    uint4 kr[U], vr[U];
    if (active) {
      const int blk = trow[u0 / BS];
      const int s = NS == 1 ? 0 : blk / sb;
      const size_t off = st.template offset<BS>(blk, s, sb, u0);
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
    const int nvalid = active ? min(U, st.tok_end - u0) : 0;
    consume_unit<T, GB, U, VEC, S::TPR>(kr, [&](int j) { return vr[j]; }, nvalid, qv, m, l,
                                        acc);
  }
  __shared__ float sm_acc[R * GB * D];
  __shared__ float sm_ml[2 * R * GB];
  merge_rows<TQ, D, GB, R, NT, VEC, DIRECT>(m, l, acc, sm_acc, sm_ml, st.rg, st.lane, st.b,
                                            S::HQ, st.h0, st.c, st.nchunk, out, opart, lse,
                                            counters);
}

__device__ __forceinline__ void cp_async16(uint4* dst, const void* src) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Variant 2: an ST-stage cp.async pipeline per thread.  Each thread copies its own 16-byte
// vectors of unit it+ST-1 into shared memory while it computes unit it, and reads back
// only what it copied itself, so no block barrier is needed inside the loop.  Block ids
// are loaded one unit further ahead.  smem: dynamic, max(ST*2*U*NT*16, merge) bytes.
template <typename TQ, typename T, int D, int BS, int HKV, int G, int GB, int NS, int U, int NT,
          int ST, bool DIRECT>
__device__ __forceinline__ void pooled_decode_async(
    const TQ* q, const int* table, const int* lengths, int nblk, int sb, float qscale,
    const T* const* ktab, const T* const* vtab, TQ* out, float* opart, float* lse,
    int* counters, uint4* smem) {
  using S = BlockSetup<TQ, T, D, G, GB, HKV, NT>;
  constexpr int VEC = S::VEC, R = S::R, RW = S::RW;
  static_assert(BS % U == 0 && G % GB == 0 && ST >= 2, "bad tiling");
  S st;
  if (!st.template init<BS>(lengths, nblk)) {
    empty_chunk<TQ, D, GB, NT, DIRECT>(opart, lse, counters, st.b, S::HQ, st.h0, st.c,
                                       st.nchunk, out);
    return;
  }
  float qv[GB][VEC], m[GB], l[GB], acc[GB][VEC];
  st.load_q(q, qscale, qv, m, l, acc);
  const int* trow = table + (size_t)st.b * nblk;
  const int span = R * U;
  const int first = st.tok_begin + st.warp * RW * U + st.rgw * U;  // this row group's unit 0
  const int wfirst = st.tok_begin + st.warp * RW * U;              // the warp's unit 0
  const int n_it = wfirst < st.tok_end ? (st.tok_end - wfirst + span - 1) / span : 0;
  const int tid = threadIdx.x;
  auto blk_of = [&](int it) -> int {
    const int u0 = first + it * span;
    return (it < n_it && u0 < st.tok_end) ? trow[u0 / BS] : -1;
  };
  auto issue = [&](int it, int blk) {
    if (blk >= 0) {
      const int u0 = first + it * span;
      const int s = NS == 1 ? 0 : blk / sb;
      const size_t off = st.template offset<BS>(blk, s, sb, u0);
      uint4* dst = smem + (it % ST) * 2 * U * NT + tid;
#pragma unroll
      for (int j = 0; j < U; ++j) cp_async16(dst + j * NT, ktab[s] + off + j * D);
#pragma unroll
      for (int j = 0; j < U; ++j) cp_async16(dst + (U + j) * NT, vtab[s] + off + j * D);
    }
    cp_commit();
  };
#pragma unroll
  for (int p = 0; p < ST - 1; ++p) issue(p, blk_of(p));
  int blk_next = blk_of(ST - 1);
  for (int it = 0; it < n_it; ++it) {  // n_it is warp-uniform: shuffles stay converged
    const int blk_cur = blk_next;
    blk_next = blk_of(it + ST);
    issue(it + ST - 1, blk_cur);
    cp_wait<ST - 1>();
    const uint4* src = smem + (it % ST) * 2 * U * NT + tid;
    uint4 kr[U];
#pragma unroll
    for (int j = 0; j < U; ++j) kr[j] = src[j * NT];
    const int u0 = first + it * span;
    const int nvalid = u0 < st.tok_end ? min(U, st.tok_end - u0) : 0;
    consume_unit<T, GB, U, VEC, S::TPR>(kr, [&](int j) { return src[(U + j) * NT]; }, nvalid,
                                        qv, m, l, acc);
  }
  cp_wait<0>();
  __syncthreads();  // the stage buffers are reused by the merge
  float* sm_acc = reinterpret_cast<float*>(smem);
  merge_rows<TQ, D, GB, R, NT, VEC, DIRECT>(m, l, acc, sm_acc, sm_acc + R * GB * D, st.rg,
                                            st.lane, st.b, S::HQ, st.h0, st.c, st.nchunk,
                                            out, opart, lse, counters);
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
