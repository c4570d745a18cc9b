// Pooled decode attention with tensor-core products (mma.sync m16n8k16, fp32 accumulate),
// for float16 / bfloat16 pools with a query of the same dtype.  Appended to
// pooled_decode.cu (which provides cp_async16, combine_groups, to_f, from_f).
//
// One CUDA block per (kv head [x q-head subgroup], context chunk, sequence), NT/32 warps.
// Each warp streams tiles of 16 tokens (a tile never crosses a page: BS is a multiple of 16
// and chunks start on page boundaries) with its own online softmax; warps are merged in
// shared memory at the end.  Per tile:
//   S[GB x 16] = Q[GB x D] . K^T   two n-tiles of 8 tokens, D/16 k-steps
//   P = exp2(S - m)                registers only: S's accumulator layout is P's A layout
//   O[GB x D] += P[GB x 16] . V    D/8 n-tiles of 8 dims, one k-step of 16 tokens
// The q heads of the group are the M rows (GB <= 16; rows >= GB are zero).
//
// No ldmatrix: a dot product does not care in which order the D dimensions are summed, so
// each lane loads 16-byte vectors of K straight from its natural layout and the query's
// A fragment is built with the same permutation of dimensions.  Lane (g = lane/4,
// t = lane%4) loads, for n-tile h, token tk = 4*(g/2) + 2h + g%2 of the tile, dims
// [8t + 32i, 8t + 32i + 8) for i < D/32; k-step s = 2i + e uses the 4 halves 4e..4e+3 of
// vector i (two for k = 2t, 2t+1 and two for k = 2t+8, 2t+9).  With that token order the
// score a lane holds in S's accumulator (row g, columns 2t, 2t+1 of n-tile h) belongs to
// tokens 4t + 2h and 4t + 2h + 1, so P's A fragment covers tokens 4t .. 4t+3 and the lane
// loads V rows 4t .. 4t+3, dims [64i + 8g, 64i + 8g + 8): output n-tile j holds dims
// 64*(j/8) + 8*col + j%8 (B's column = the lane's g), repacked with byte permutes.
//
// Each lane copies its vectors of tile it+ST-1 with cp.async into its own shared-memory
// slots while computing tile it, and reads back only its own slots: no barrier in the loop.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace slabserve {

__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                         unsigned b1, const __half*) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                         unsigned b1, const __nv_bfloat16*) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one 32-bit register of two T (x in the low half).
__device__ __forceinline__ unsigned pack2(float x, float y, const __half*) {
  __half2 h = __floats2half2_rn(x, y);
  return *reinterpret_cast<unsigned*>(&h);
}
__device__ __forceinline__ unsigned pack2(float x, float y, const __nv_bfloat16*) {
  __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<unsigned*>(&h);
}

__device__ __forceinline__ unsigned word(const uint4& v, int w) {
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

template <typename T, int D, int GB>
struct MmaTile {
  static constexpr int KV = D / 32;        // K vectors per lane and n-tile
  static constexpr int VV = D / 64;        // V vectors per lane and token
  static constexpr int NV = 2 * KV + 4 * VV;  // vectors per lane and tile (= D / 8)
  static constexpr int KS = D / 16;        // k-steps of Q.K^T
  static constexpr int NJ = D / 8;         // n-tiles of P.V
  static constexpr bool TWO = GB > 8;      // rows g + 8 in use
  static_assert(D % 64 == 0 && GB <= 16, "mma tile: D in {64, 128}, GB <= 16");

  // Token (within the tile) whose K this lane loads for n-tile h.
  static __device__ __forceinline__ int k_token(int g, int h) {
    return 4 * (g >> 1) + 2 * h + (g & 1);
  }

  // The query's A fragments (pre-scaled by scale * log2 e, in T), same dim permutation.
  static __device__ __forceinline__ void load_q(const T* q, int b, int hq, int h0, int g, int t,
                                                float qscale, unsigned (&qa)[KS][4]) {
#pragma unroll
    for (int s = 0; s < KS; ++s) {
      const int base = 8 * t + 32 * (s >> 1) + 4 * (s & 1);
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // rows g and g + 8
        const int row = g + 8 * half;
        float f[4] = {0.f, 0.f, 0.f, 0.f};
        if (row < GB) {
          const T* qr = q + (size_t)(b * hq + h0 + row) * D + base;
#pragma unroll
          for (int e = 0; e < 4; ++e) f[e] = to_f(qr[e]) * qscale;
        }
        qa[s][half] = pack2(f[0], f[1], (const T*)nullptr);
        qa[s][2 + half] = pack2(f[2], f[3], (const T*)nullptr);
      }
    }
  }

  // S = Q.K^T for the tile: sc[h][0..1] row g, sc[h][2..3] row g + 8.
  static __device__ __forceinline__ void scores(const uint4* src, int nt,
                                                const unsigned (&qa)[KS][4],
                                                float (&sc)[2][4]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      sc[h][0] = sc[h][1] = sc[h][2] = sc[h][3] = 0.f;
#pragma unroll
      for (int i = 0; i < KV; ++i) {
        const uint4 kv = src[(h * KV + i) * nt];
        mma16816(sc[h], qa[2 * i], kv.x, kv.y, (const T*)nullptr);
        mma16816(sc[h], qa[2 * i + 1], kv.z, kv.w, (const T*)nullptr);
      }
    }
  }

  // O += P.V: pa = P's A fragment; V vectors of tokens 4t+u at slots 2*KV + u*VV + i.
  static __device__ __forceinline__ void accumulate(const uint4* src, int nt, unsigned mask4,
                                                    const unsigned (&pa)[4],
                                                    float (&o)[NJ][4]) {
#pragma unroll
    for (int i = 0; i < VV; ++i) {
      uint4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {  // rows past the end may be stale: zero them
        v[u] = src[(2 * KV + u * VV + i) * nt];
        if (!(mask4 >> u & 1u)) v[u] = make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        const unsigned sel = (jj & 1) ? 0x7632u : 0x5410u;
        const int w = jj >> 1;
        const unsigned b0 = __byte_perm(word(v[0], w), word(v[1], w), sel);
        const unsigned b1 = __byte_perm(word(v[2], w), word(v[3], w), sel);
        mma16816(o[8 * i + jj], pa, b0, b1, (const T*)nullptr);
      }
    }
  }
};

// Online-softmax update of one row (the 4 scores this lane holds for it, masked by
// `valid`), reduced over the 4 lanes of the row: s[k] becomes the probability (0 where
// masked), the row's max, sum and accumulator columns ci, ci+1 are updated.
template <int NJ>
__device__ __forceinline__ void online_row(float (&s)[4], unsigned valid, float& m, float& l,
                                           float (&o)[NJ][4], int ci) {
  float mx = -INFINITY;
#pragma unroll
  for (int k = 0; k < 4; ++k) mx = (valid >> k & 1u) ? fmaxf(mx, s[k]) : mx;
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  if (mx > m) {  // the 4 lanes of a row agree; exp2(-inf) = 0 the first time
    const float alpha = exp2f(m - mx);
    l *= alpha;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      o[j][ci] *= alpha;
      o[j][ci + 1] *= alpha;
    }
    m = mx;
  }
  const float ms = m == -INFINITY ? 0.f : m;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    s[k] = (valid >> k & 1u) ? exp2f(s[k] - ms) : 0.f;
    l += s[k];
  }
}

// online_row, then P's two packed registers for the row.
template <typename T, int NJ>
__device__ __forceinline__ void softmax_row(float (&s)[4], unsigned valid, float& m, float& l,
                                            float (&o)[NJ][4], int ci, unsigned& p01,
                                            unsigned& p23) {
  online_row<NJ>(s, valid, m, l, o, ci);
  p01 = pack2(s[0], s[1], (const T*)nullptr);
  p23 = pack2(s[2], s[3], (const T*)nullptr);
}

template <typename T, int D, int BS, int HKV, int G, int GB, int NS, int NT, int ST,
          bool DIRECT>
__device__ __forceinline__ void pooled_decode_mma(const T* q, const int* table,
                                                  const int* lengths, int nblk, int mp, int sb,
                                                  float qscale, const T* const* ktab,
                                                  const T* const* vtab, T* out, float* opart,
                                                  float* lse, int* counters, uint4* smem) {
  using M = MmaTile<T, D, GB>;
  constexpr int NW = NT / 32, HQ = HKV * G, NJ = M::NJ;
  static_assert(BS % 16 == 0 && G % GB == 0 && ST >= 2 && NT % 32 == 0, "bad tiling");
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int kvh = blockIdx.x / (G / GB), h0 = kvh * G + (blockIdx.x % (G / GB)) * GB;
  const int c = blockIdx.y, nchunk = gridDim.y, b = blockIdx.z;
  int tok_begin, tok_end;
  chunk_span<BS>(lengths[b], c, nchunk, mp, tok_begin, tok_end);
  if (tok_begin >= tok_end) {  // an empty chunk of a short sequence
    empty_chunk<T, D, GB, NT, DIRECT>(opart, lse, counters, b, HQ, h0, c, nchunk, out);
    return;
  }
  unsigned qa[M::KS][4];
  M::load_q(q, b, HQ, h0, g, t, qscale, qa);
  float o[NJ][4];
#pragma unroll
  for (int j = 0; j < NJ; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m0 = -INFINITY, l0 = 0.f, m1 = -INFINITY, l1 = 0.f;
  const int* trow = table + (size_t)b * nblk;
  const int first = tok_begin + 16 * warp;
  const int n_it = first < tok_end ? (tok_end - first + 16 * NW - 1) / (16 * NW) : 0;
  auto blk_of = [&](int it) -> int {
    const int u0 = first + it * 16 * NW;
    return it < n_it ? trow[u0 / BS] : -1;
  };
  auto issue = [&](int it, int blk) {
    if (blk >= 0) {
      const int u0 = first + it * 16 * NW;
      const int s = NS == 1 ? 0 : blk / sb;
      const size_t off = ((size_t)((blk - s * sb) * HKV + kvh) * BS + (u0 % BS)) * D;
      const T* kp = ktab[s] + off;
      const T* vp = vtab[s] + off;
      uint4* dst = smem + (size_t)(it % ST) * M::NV * NT + tid;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int i = 0; i < M::KV; ++i)
          cp_async16(dst + (h * M::KV + i) * NT, kp + M::k_token(g, h) * D + 8 * t + 32 * i);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int i = 0; i < M::VV; ++i)
          cp_async16(dst + (2 * M::KV + u * M::VV + i) * NT, vp + (4 * t + u) * D + 64 * i + 8 * g);
      }
    }
    cp_commit();
  };
#pragma unroll
  for (int p = 0; p < ST - 1; ++p) issue(p, blk_of(p));
  int blk_next = blk_of(ST - 1);
  for (int it = 0; it < n_it; ++it) {  // n_it is warp-uniform: shuffles and mma converge
    const int blk_cur = blk_next;
    blk_next = blk_of(it + ST);
    issue(it + ST - 1, blk_cur);
    cp_wait<ST - 1>();
    const uint4* src = smem + (size_t)(it % ST) * M::NV * NT + tid;
    const int nval = tok_end - (first + it * 16 * NW);  // valid tokens of the tile (>= 1)
    // bit k of valid: score k of a row (tokens 4t, 4t+1, 4t+2, 4t+3)
    const int over = 4 * t;
    const unsigned valid = nval >= over + 4 ? 0xfu : nval <= over ? 0u
                                                                  : (1u << (nval - over)) - 1u;
    float sc[2][4];
    M::scores(src, NT, qa, sc);
    // per row: scores ordered as tokens 4t .. 4t+3 (n-tile 0 then 1)
    float r0[4] = {sc[0][0], sc[0][1], sc[1][0], sc[1][1]};
    unsigned pa[4];
    softmax_row<T, NJ>(r0, valid, m0, l0, o, 0, pa[0], pa[2]);
    if (M::TWO) {
      float r1[4] = {sc[0][2], sc[0][3], sc[1][2], sc[1][3]};
      softmax_row<T, NJ>(r1, valid, m1, l1, o, 2, pa[1], pa[3]);
    } else {
      pa[1] = pa[3] = 0u;
    }
    M::accumulate(src, NT, valid, pa, o);
  }
  cp_wait<0>();
  __syncthreads();  // the stage ring is reused for the merge
  // lane sums -> row sums (the 4 lanes of a row hold disjoint tokens)
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  float* sm_acc = reinterpret_cast<float*>(smem);
  float* sm_ml = sm_acc + NW * GB * D;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = g + 8 * half;
    if (row < GB && (half == 0 || M::TWO)) {
      float* dst = sm_acc + (warp * GB + row) * D;
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const int d0 = 64 * (j >> 3) + (j & 7);
        dst[d0 + 16 * t] = o[j][2 * half];
        dst[d0 + 8 * (2 * t + 1)] = o[j][2 * half + 1];
      }
      if (t == 0) {
        sm_ml[warp * GB + row] = half ? m1 : m0;
        sm_ml[(NW + warp) * GB + row] = half ? l1 : l0;
      }
    }
  }
  __syncthreads();
  combine_groups<T, D, GB, NW, NT, DIRECT>(sm_acc, sm_ml, b, HQ, h0, c, nchunk, out, opart,
                                           lse, counters);
}

}  // namespace slabserve
