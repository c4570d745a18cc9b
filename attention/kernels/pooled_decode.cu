// Pooled decode attention (header part 2 of 2: follows pooled_common.cu): the FMA kernel,
// "async" (row-group reduction by shuffles) and its "lean" form (the reduction through
// shared memory, consume_unit_x).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace slabserve {

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
  __device__ __forceinline__ bool init(const int* lengths, int mp) {
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
    chunk_span<BS>(lengths[b], c, nchunk, mp, tok_begin, tok_end);
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

  // init(), and for a chunk past the end of a short sequence its empty partial: false.
  template <int BS, bool DIRECT>
  __device__ __forceinline__ bool begin(const int* lengths, int mp, float* opart, float* lse,
                                        int* counters, TQ* out) {
    if (init<BS>(lengths, mp)) return true;
    empty_chunk<TQ, D, GB, NT, DIRECT>(opart, lse, counters, b, HQ, h0, c, nchunk, out);
    return false;
  }

  // Element offset of row `u0` of kv head kvh in its slab.
  template <int BS>
  __device__ __forceinline__ size_t row_offset(int blk, int s, int sb, int u0) const {
    return ((size_t)((blk - s * sb) * HKV + kvh) * BS + (u0 % BS)) * D;
  }
  // ... and of this lane's vector in that row.
  template <int BS>
  __device__ __forceinline__ size_t offset(int blk, int s, int sb, int u0) const {
    return row_offset<BS>(blk, s, sb, u0) + lane * VEC;
  }

  // Merge the block's row groups through shared memory and write the result.
  template <bool DIRECT>
  __device__ __forceinline__ void merge(const float (&m)[GB], const float (&l)[GB],
                                        const float (&acc)[GB][VEC], float* sm_acc,
                                        float* sm_ml, TQ* out, float* opart, float* lse,
                                        int* counters) const {
    merge_rows<TQ, D, GB, R, NT, VEC, DIRECT>(m, l, acc, sm_acc, sm_ml, rg, lane, b, HQ, h0, c,
                                              nchunk, out, opart, lse, counters);
  }
};

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

// consume_unit with the row-group reduction through shared memory ("lean"): TPR = 8 or 16
// lanes per K row (D = 64 or 128, 16-bit K/V), U = 4 tokens, N = GB * U scores per unit with
// N a multiple of TPR (GB in {2, 4} at D 64, 4 at D 128), N / TPR of them per lane.  Each
// lane writes its N partial dot products to scratch, then sums the TPR partials of the
// scores it owns (score p = g*U + j is owned by lane p % TPR: head p / U, token lane % U),
// takes the head maximum over its lane quad, computes exp2 once per (head, token), and
// shares the weights back through scratch.  Instead of log2(TPR) shuffle-adds per score
// and lane and GB*U exp2 per lane: N/TPR reductions and N/TPR exp2 per lane.
// Scratch: the warp's K vectors of the current ring stage (all read before; __syncwarp),
// U pieces of 128 floats `pstride` floats apart, N*TPR floats per row group; slots are
// swizzled by XOR with the row group (slot s at s ^ rgw) so the 32 lanes of a warp hit 32
// banks, and each of the N partial stores is one of four per-thread pointers (by s & 3)
// plus a compile-time offset (a rotation modulo N, the first form "xred", cost about 4
// integer instructions per store: 822 -> 685 SASS instructions per loop iteration with the
// "lean" changes; docs/adr/0004-cuda-kernel.md).  Same online softmax as consume_unit.
template <int GB>
__device__ __forceinline__ float pick(const float (&a)[GB], int i) {
  float r = a[0];
#pragma unroll
  for (int h = 1; h < GB; ++h) r = i == h ? a[h] : r;
  return r;
}

template <typename T, int GB, int U, int VEC, int TPR, typename VRow>
__device__ __forceinline__ void consume_unit_x(const uint4 (&kr)[U], VRow vrow, int nvalid,
                                               const float (&qv)[GB][VEC], float (&m)[GB],
                                               float (&l)[GB], float (&acc)[GB][VEC],
                                               float* wscr, int pstride, int lane, int rgw) {
  constexpr int N = GB * U, PPL = N / TPR, QPL = TPR / U;
  static_assert(U == 4 && VEC == 8 && (TPR == 8 || TPR == 16) && N % TPR == 0 &&
                    (32 / TPR) * N * TPR <= U * 128, "lean: D 64 / 128, 16-bit, GB * 4 % TPR");
  const int area = rgw * N * TPR;  // this row group's first float in the warp's scratch
  auto at = [&](int f) -> float* {
    const int x = area + f;
    return wscr + (x >> 7) * pstride + (x & 127);
  };
  auto slot = [&](int sl) { return sl ^ rgw; };  // the position of slot sl
  // slot sl = 4a + b sits at wp[b] + 4a * TPR floats (offsets inside a row group's area
  // never cross a piece from wp[b]: lane + b' * TPR < 4 * TPR and 4a * TPR is a multiple)
  float* wp[4];
#pragma unroll
  for (int b = 0; b < 4; ++b) wp[b] = at(lane + (b ^ rgw) * TPR);
  partial_scores<T, GB, U, VEC>(kr, qv, [&](int g, int j, float d) {
    const int sl = g * U + j, hi = (sl & ~3) * TPR;
    wp[sl & 3][(hi >> 7) * pstride + (hi & 127)] = d;
  });
  __syncwarp();
  const int qd = lane / U;  // owned score k is head qd + QPL * k, token lane % U
  float s[PPL], mn[PPL];
#pragma unroll
  for (int k = 0; k < PPL; ++k) {
    const float4* r = reinterpret_cast<const float4*>(at(slot(lane + TPR * k) * TPR));
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < TPR / 4; ++i) {
      const float4 a = r[i];
      t += (a.x + a.y) + (a.z + a.w);
    }
    s[k] = (lane % U) < nvalid ? t : -INFINITY;
    float x = fmaxf(s[k], __shfl_xor_sync(0xffffffffu, s[k], 1));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
    mn[k] = fmaxf(pick(m, qd + QPL * k), x);
  }
#pragma unroll
  for (int g = 0; g < GB; ++g) {
    raise_max<VEC>(m[g], l[g], acc[g], __shfl_sync(0xffffffffu, mn[g / QPL], (g % QPL) * U, TPR));
  }
  __syncwarp();  // every partial is read before the weights overwrite them
  float* w = at(rgw * TPR);  // N floats inside the row group's first piece
#pragma unroll
  for (int k = 0; k < PPL; ++k) {
    const float mo = pick(m, qd + QPL * k);
    w[lane + TPR * k] = exp2f(s[k] - (mo == -INFINITY ? 0.f : mo));  // masked: 0
  }
  __syncwarp();
  float p[GB][U];  // U == 4: one float4 per head
#pragma unroll
  for (int g = 0; g < GB; ++g) {
    const float4 f = reinterpret_cast<const float4*>(w)[g];
    p[g][0] = f.x;
    p[g][1] = f.y;
    p[g][2] = f.z;
    p[g][3] = f.w;
  }
  __syncwarp();  // the weights are read before the next unit or stage reuses the scratch
#pragma unroll
  for (int g = 0; g < GB; ++g) {
    float psum = 0.f;
#pragma unroll
    for (int j = 0; j < U; ++j) psum += p[g][j];
    l[g] += psum;
  }
  accumulate_v<T, GB, U, VEC>(vrow, nvalid, p, acc);
}

// An ST-stage cp.async pipeline per thread.  Each thread copies its own 16-byte
// vectors of unit it+ST-1 into shared memory while it computes unit it, and reads back
// only what it copied itself, so no block barrier is needed inside the loop.  Block ids
// are loaded one unit further ahead.  smem: dynamic, max(ST*2*U*NT*16, merge) bytes.
template <typename TQ, typename T, int D, int BS, int HKV, int G, int GB, int NS, int U, int NT,
          int ST, bool DIRECT, bool LEAN = false>
__device__ __forceinline__ void pooled_decode_async(
    const TQ* q, const int* table, const int* lengths, int nblk, int mp, int sb,
    float qscale, const T* const* ktab, const T* const* vtab, TQ* out, float* opart,
    float* lse, int* counters, uint4* smem) {
  using S = BlockSetup<TQ, T, D, G, GB, HKV, NT>;
  constexpr int VEC = S::VEC, R = S::R, RW = S::RW;
  static_assert(BS % U == 0 && G % GB == 0 && ST >= 2, "bad tiling");
  S st;
  if (!st.template begin<BS, DIRECT>(lengths, mp, opart, lse, counters, out)) return;
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
      if constexpr (LEAN) {  // each copy's "memory" clobber would re-read ktab[s]
        const T* kp = ktab[s] + off;
        const T* vp = vtab[s] + off;
#pragma unroll
        for (int j = 0; j < U; ++j) cp_async16(dst + j * NT, kp + j * D);
#pragma unroll
        for (int j = 0; j < U; ++j) cp_async16(dst + (U + j) * NT, vp + j * D);
      } else {
#pragma unroll
        for (int j = 0; j < U; ++j) cp_async16(dst + j * NT, ktab[s] + off + j * D);
#pragma unroll
        for (int j = 0; j < U; ++j) cp_async16(dst + (U + j) * NT, vtab[s] + off + j * D);
      }
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
    auto vrow = [&](int j) { return src[(U + j) * NT]; };
    if constexpr (LEAN) {  // scratch: the warp's K vectors of the stage (all read)
      __syncwarp();
      float* wscr = reinterpret_cast<float*>(smem + (it % ST) * 2 * U * NT + st.warp * 32);
      consume_unit_x<T, GB, U, VEC, S::TPR>(kr, vrow, nvalid, qv, m, l, acc, wscr, NT * 4,
                                            st.lane, st.rgw);
    } else {
      consume_unit<T, GB, U, VEC, S::TPR>(kr, vrow, nvalid, qv, m, l, acc);
    }
  }
  cp_wait<0>();
  __syncthreads();  // the stage buffers are reused by the merge
  float* sm_acc = reinterpret_cast<float*>(smem);
  st.template merge<DIRECT>(m, l, acc, sm_acc, sm_acc + R * GB * D, out, opart, lse, counters);
}

}  // namespace slabserve
