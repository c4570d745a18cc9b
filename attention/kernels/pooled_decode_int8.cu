// Pooled decode attention over an int8 pool (kvcache/quant.py: symmetric int8 values, one
// float16 scale per (token, kv head) in parallel [rows, 1] scale slabs with the same row
// addressing), with tensor-core products.  Appended to pooled_decode_mma.cu (mma16816,
// pack2, word, online_row, MmaTile::k_token, combine_groups, cp_async16, from_f).
//
// The pages are read in place and never dequantized as pages: int8 values become exact
// float16 integers in registers (the bytes biased to unsigned under the float16 exponent of
// 1024, then 1152 subtracted), q (any dtype, pre-scaled by scale * log2 e) goes in as float16,
// and the scales multiply columns, as the CPU path does (attention/native_cpu.py):
//   S = (Q . Kint^T) * ks      K's scale per score column (token), fp32
//   P = exp2(S - m)            online softmax as in the mma kernel (l sums P)
//   O += (P * vs * VBOOST) . Vint   V's scale on the probability columns, float16 operand
// and O / VBOOST at the end.  VBOOST = 16 keeps P * vs clear of float16 subnormals for
// small scales (vs = absmax / 127); float16 overflows only for |V| above ~500k, where the
// float16 scale itself is already near its limit.
//
// Work split as in pooled_decode_mma (one CUDA block per (kv head [x q-head subgroup],
// chunk, sequence), warps stream 16-token tiles with their own online softmax), with the
// K layout of the int8 case: lane (g, t) loads, for n-tile h, token k_token(g, h) of the
// tile, dims [16t + 64i, 16t + 64i + 16) for i < D/64 (one 16-byte vector each); k-step
// s = 4i + e uses dims 16t + 64i + 4e .. +4 of it (word e), and q's A fragment is built with
// the same permutation.  The lane's S accumulator holds tokens 4t .. 4t+3 of the tile (as in
// the mma kernel), so it loads the K and V scales of those tokens (8 bytes each) and their
// V rows, dims [VB*g, VB*g + VB) (VB = D/8 bytes): output n-tile j holds dims VB*col + j.
// Per lane and tile: D/32 K vectors, 4 V rows (D/2 bytes), 16 bytes of scales, copied with
// cp.async into the lane's own shared-memory slots (no barrier in the loop).
#include <cuda_fp16.h>

namespace slabserve {

// 4 int8 (one 32-bit word, dims 4e .. 4e+3) -> two float16 pairs holding them exactly.
__device__ __forceinline__ unsigned h2_minus_1152(unsigned x) {
  __half2 h = *reinterpret_cast<__half2*>(&x);
  h = __hsub2(h, __half2half2(__ushort_as_half((unsigned short)0x6480u)));  // 1152
  return *reinterpret_cast<unsigned*>(&h);
}
__device__ __forceinline__ void i8x4_to_h2(unsigned w, unsigned& lo, unsigned& hi) {
  const unsigned u = w ^ 0x80808080u;  // x + 128 as unsigned bytes
  lo = h2_minus_1152(__byte_perm(u, 0x64646464u, 0x4140u));  // (1024 + u0, 1024 + u1)
  hi = h2_minus_1152(__byte_perm(u, 0x64646464u, 0x4342u));  // (1024 + u2, 1024 + u3)
}

__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(src) : "memory");
}

template <int D, int GB>
struct I8Tile {
  static constexpr int KV = D / 64;           // 16-byte K vectors per lane and n-tile
  static constexpr int KS = D / 16;           // k-steps of Q.K^T
  static constexpr int NJ = D / 8;            // n-tiles of P.V
  static constexpr int VB = D / 8;            // V bytes per lane and token
  static constexpr int VS = D / 32;           // 16-byte slots of the lane's 4 V rows
  static constexpr int SC = 2 * KV + VS;      // the scales' slot (K: bytes 0-7, V: 8-15)
  static constexpr int NV = SC + 1;           // 16-byte slots per lane and tile
  static constexpr bool TWO = GB > 8;         // rows g + 8 in use
  static constexpr float VBOOST = 16.f;
  static_assert(D % 64 == 0 && GB <= 16, "int8 tile: D in {64, 128}, GB <= 16");

  // q's A fragments as float16 (pre-scaled by scale * log2 e), the K dim permutation.
  template <typename TQ>
  static __device__ __forceinline__ void load_q(const TQ* q, int b, int hq, int h0, int g,
                                                int t, float qscale, unsigned (&qa)[KS][4]) {
#pragma unroll
    for (int s = 0; s < KS; ++s) {
      const int base = 16 * t + 64 * (s >> 2) + 4 * (s & 3);
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // rows g and g + 8
        const int row = g + 8 * half;
        float f[4] = {0.f, 0.f, 0.f, 0.f};
        if (row < GB) {
          const TQ* qr = q + (size_t)(b * hq + h0 + row) * D + base;
#pragma unroll
          for (int e = 0; e < 4; ++e) f[e] = to_f(qr[e]) * qscale;
        }
        qa[s][half] = pack2(f[0], f[1], (const __half*)nullptr);
        qa[s][2 + half] = pack2(f[2], f[3], (const __half*)nullptr);
      }
    }
  }

  // S = Q.Kint^T: sc[h][0..1] row g, sc[h][2..3] row g + 8; even and odd k-steps in two
  // accumulators (two independent mma chains per n-tile), summed at the end.
  static __device__ __forceinline__ void scores(const uint4* src, int nt,
                                                const unsigned (&qa)[KS][4],
                                                float (&sc)[2][4]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float a[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int i = 0; i < KV; ++i) {
        const uint4 kv = src[(h * KV + i) * nt];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          unsigned lo, hi;
          i8x4_to_h2(word(kv, e), lo, hi);
          mma16816(a[e & 1], qa[4 * i + e], lo, hi, (const __half*)nullptr);
        }
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) sc[h][k] = a[0][k] + a[1][k];
    }
  }

  // O += P'.Vint: pa = P' (probabilities times V's scales) as the A fragment; this lane's V
  // bytes of token u (VB of them) start at byte u * VB of its V slots.
  static __device__ __forceinline__ void accumulate(const uint4* src, int nt,
                                                    const unsigned (&pa)[4],
                                                    float (&o)[NJ][4]) {
    uint4 vv[VS];
#pragma unroll
    for (int x = 0; x < VS; ++x) vv[x] = src[(2 * KV + x) * nt];
#pragma unroll
    for (int w = 0; w < VB / 4; ++w) {  // dims 4w .. 4w+3 of the lane's VB
      unsigned lo[4], hi[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int byte = u * VB + 4 * w;
        i8x4_to_h2(word(vv[byte / 16], (byte % 16) / 4), lo[u], hi[u]);
      }
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {  // n-tile j = 4w + jj: element jj of the 4 dims
        const unsigned* h = jj < 2 ? lo : hi;
        const unsigned sel = (jj & 1) ? 0x7632u : 0x5410u;
        const unsigned b0 = __byte_perm(h[0], h[1], sel);
        const unsigned b1 = __byte_perm(h[2], h[3], sel);
        mma16816(o[4 * w + jj], pa, b0, b1, (const __half*)nullptr);
      }
    }
  }
};

// The scales of tokens 4t .. 4t+3 as floats: K's (times nothing) and V's times VBOOST.
__device__ __forceinline__ void tile_scales(const uint4& sv, float (&ks)[4], float (&vs)[4],
                                            float vboost) {
  const __half2* h = reinterpret_cast<const __half2*>(&sv);
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const float2 k = __half22float2(h[p]), v = __half22float2(h[2 + p]);
    ks[2 * p] = k.x;
    ks[2 * p + 1] = k.y;
    vs[2 * p] = v.x * vboost;
    vs[2 * p + 1] = v.y * vboost;
  }
}

// One row's softmax over the tile (scores already scaled by K's scales), then P' = P * vs
// packed as the row's two A registers (masked tokens 0: a stale scale is never multiplied).
template <int NJ>
__device__ __forceinline__ void softmax_row_i8(float (&s)[4], const float (&vs)[4],
                                               unsigned valid, float& m, float& l,
                                               float (&o)[NJ][4], int ci, unsigned& p01,
                                               unsigned& p23) {
  online_row<NJ>(s, valid, m, l, o, ci);
  float w[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) w[k] = (valid >> k & 1u) ? s[k] * vs[k] : 0.f;
  p01 = pack2(w[0], w[1], (const __half*)nullptr);
  p23 = pack2(w[2], w[3], (const __half*)nullptr);
}

template <typename TQ, typename T, int D, int BS, int HKV, int G, int GB, int NS, int NT,
          int ST, bool DIRECT>
__device__ __forceinline__ void pooled_decode_int8(
    const TQ* q, const int* table, const int* lengths, int nblk, int mp, int sb,
    float qscale,
    const T* const* ktab, const T* const* vtab, const __half* const* kstab,
    const __half* const* vstab, TQ* out, float* opart, float* lse, int* counters,
    uint4* smem) {
  using M = I8Tile<D, GB>;
  using K16 = MmaTile<__half, 64, 1>;  // k_token only
  constexpr int NW = NT / 32, HQ = HKV * G, NJ = M::NJ, VB = M::VB;
  static_assert(BS % 16 == 0 && G % GB == 0 && ST >= 2 && NT % 32 == 0, "bad tiling");
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int kvh = blockIdx.x / (G / GB), h0 = kvh * G + (blockIdx.x % (G / GB)) * GB;
  const int c = blockIdx.y, nchunk = gridDim.y, b = blockIdx.z;
  int tok_begin, tok_end;
  chunk_span<BS>(lengths[b], c, nchunk, mp, tok_begin, tok_end);
  if (tok_begin >= tok_end) {  // an empty chunk of a short sequence
    empty_chunk<TQ, D, GB, NT, DIRECT>(opart, lse, counters, b, HQ, h0, c, nchunk, out);
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
      const size_t row = (size_t)((blk - s * sb) * HKV + kvh) * BS + (u0 % BS);
      const signed char* kp = reinterpret_cast<const signed char*>(ktab[s]) + row * D;
      const signed char* vp = reinterpret_cast<const signed char*>(vtab[s]) + row * D;
      uint4* dst = smem + (size_t)(it % ST) * M::NV * NT + tid;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int i = 0; i < M::KV; ++i)
          cp_async16(dst + (h * M::KV + i) * NT, kp + K16::k_token(g, h) * D + 16 * t + 64 * i);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const signed char* vr = vp + (4 * t + u) * D + VB * g;
        char* vd = reinterpret_cast<char*>(dst + (2 * M::KV + u * VB / 16) * NT) + (u * VB) % 16;
        if constexpr (VB == 16) {
          cp_async16(reinterpret_cast<uint4*>(vd), vr);
        } else {
          cp_async8(vd, vr);
        }
      }
      char* sd = reinterpret_cast<char*>(dst + M::SC * NT);
      cp_async8(sd, kstab[s] + row + 4 * t);
      cp_async8(sd + 8, vstab[s] + row + 4 * t);
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
    const int over = 4 * t;  // bit k of valid: token 4t + k
    const unsigned valid = nval >= over + 4 ? 0xfu : nval <= over ? 0u
                                                                  : (1u << (nval - over)) - 1u;
    float ks[4], vs[4];
    tile_scales(src[M::SC * NT], ks, vs, M::VBOOST);
    float sc[2][4];
    M::scores(src, NT, qa, sc);
    // per row: tokens 4t .. 4t+3 (n-tile 0 then 1), times K's scales
    float r0[4] = {sc[0][0] * ks[0], sc[0][1] * ks[1], sc[1][0] * ks[2], sc[1][1] * ks[3]};
    unsigned pa[4];
    softmax_row_i8<NJ>(r0, vs, valid, m0, l0, o, 0, pa[0], pa[2]);
    if (M::TWO) {
      float r1[4] = {sc[0][2] * ks[0], sc[0][3] * ks[1], sc[1][2] * ks[2], sc[1][3] * ks[3]};
      softmax_row_i8<NJ>(r1, vs, valid, m1, l1, o, 2, pa[1], pa[3]);
    } else {
      pa[1] = pa[3] = 0u;
    }
    M::accumulate(src, NT, pa, o);
  }
  cp_wait<0>();
  __syncthreads();  // the stage ring is reused for the merge
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  float* sm_acc = reinterpret_cast<float*>(smem);
  float* sm_ml = sm_acc + NW * GB * D;
  constexpr float inv = 1.f / M::VBOOST;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = g + 8 * half;
    if (row < GB && (half == 0 || M::TWO)) {
      float* dst = sm_acc + (warp * GB + row) * D;
#pragma unroll
      for (int j = 0; j < NJ; ++j) {  // columns 2t, 2t+1 of n-tile j: dims VB*col + j
        dst[VB * (2 * t) + j] = o[j][2 * half] * inv;
        dst[VB * (2 * t + 1) + j] = o[j][2 * half + 1] * inv;
      }
      if (t == 0) {
        sm_ml[warp * GB + row] = half ? m1 : m0;
        sm_ml[(NW + warp) * GB + row] = half ? l1 : l0;
      }
    }
  }
  __syncthreads();
  combine_groups<TQ, D, GB, NW, NT, DIRECT>(sm_acc, sm_ml, b, HQ, h0, c, nchunk, out, opart,
                                            lse, counters);
}

}  // namespace slabserve
