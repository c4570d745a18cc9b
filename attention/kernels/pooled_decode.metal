// Pooled decode attention over the slab pool, for mx.fast.metal_kernel.  UNVERIFIED: written
// alongside the CUDA kernel's register-load ("sync") variant (no longer shipped as CUDA: git
// history of pooled_decode.cu) and never compiled or run on Apple silicon;
// attention/native_metal.py declines with the reason if it fails.
//
// This file holds the header (helpers); native_metal.py generates the kernel body from the
// BODY section below, replacing /*SELECT*/ with the slab pick and /*STORE*/ with the output.
// The same body serves int8 pools (kvcache/quant.py; UNVERIFIED as well): native_metal.py
// then fills /*SCALESLABS*/ with the float16 scale slabs ks0.., vs0.. (one scale per (token,
// kv head), the value slabs' row addressing), /*KSCALE*/ and /*VSCALE*/ with the token's
// scales: int8 values are read in place and converted to float in the inner loop, K's scale
// multiplies the score and V's the probability (the sum of probabilities stays unscaled), as
// on CPU and CUDA.  With float pools the markers vanish and the scales are 1.0f.
// Same algorithm as CUDA: one threadgroup per (kv head [x q-head subgroup], chunk,
// sequence); row groups of TPR = D / VEC lanes, each lane VEC elements of a K/V row;
// online exp2 softmax per row group; row groups merged in threadgroup memory; chunks merged
// by the merge kernel when there are several.

// ---- HEADER ----
namespace slabserve {
template <typename T>
inline float to_f(T x) {
  return static_cast<float>(x);
}
}  // namespace slabserve
// ---- BODY ----
  constexpr int VEC = sizeof(T) == 1 ? 8 : 16 / sizeof(T);  // int8: 8 values, as float16
  constexpr int TPR = D / VEC;
  constexpr int RW = 32 / TPR;
  constexpr int R = NT / TPR;
  constexpr int HQ = HKV * G;
  threadgroup float sm_acc[R * GB * D];
  threadgroup float sm_ml[2 * R * GB];
  const int tid = int(thread_position_in_threadgroup.x);
  const int warp = tid / 32, lane32 = tid % 32;
  const int rgw = lane32 / TPR, lane = lane32 % TPR, rg = warp * RW + rgw;
  const int bx = int(threadgroup_position_in_grid.x);
  const int kvh = bx / (G / GB), h0 = kvh * G + (bx % (G / GB)) * GB;
  const int c = int(threadgroup_position_in_grid.y), nchunk = int(threadgroups_per_grid.y);
  const int b = int(threadgroup_position_in_grid.z);
  const int nblk = int(table_shape[1]);
  const int sb = int(k0_shape[0]) / (HKV * BS);
  const int len = lengths[b];
  // the sequence's own pages over at most nchunk chunks of at least MP pages (the CUDA
  // kernels' chunk_span): nblk is the table's row stride only
  const int pages = (len + BS - 1) / BS;
  const int used = max(1, min(nchunk, pages / MP));
  const int ppc = (pages + used - 1) / used;
  const int tok_begin = c * ppc * BS;
  const int tok_end = min(tok_begin + ppc * BS, len);
  if (tok_begin >= tok_end) {
/*EMPTY*/
    return;
  }
  const float qs = qscale[0] * 1.4426950408889634f;
  float qv[GB][VEC], m[GB], l[GB], acc[GB][VEC];
  for (int g = 0; g < GB; ++g) {
    for (int i = 0; i < VEC; ++i) {
      qv[g][i] = slabserve::to_f(q[(b * HQ + h0 + g) * D + lane * VEC + i]) * qs;
      acc[g][i] = 0.0f;
    }
    m[g] = -INFINITY;
    l[g] = 0.0f;
  }
  for (int base = tok_begin + warp * RW * U; base < tok_end; base += R * U) {
    const int u0 = base + rgw * U;
    const bool active = u0 < tok_end;
    const int nvalid = active ? min(U, tok_end - u0) : 0;
    const int blk = active ? table[b * nblk + u0 / BS] : 0;
    const int s = blk / sb;
    const device T* kb = k0;
    const device T* vb = v0;
/*SCALESLABS*/
/*SELECT*/
    const size_t row = size_t((blk - s * sb) * HKV + kvh) * BS + (u0 % BS);
    const size_t off = row * D + lane * VEC;
    float sc[GB][U];
    for (int j = 0; j < U; ++j) {
      float kf[VEC];
      for (int i = 0; i < VEC; ++i) kf[i] = active ? slabserve::to_f(kb[off + j * D + i]) : 0.0f;
      const float ksc = /*KSCALE*/1.0f;  // rows past the end: masked below, never used
      for (int g = 0; g < GB; ++g) {
        float d = 0.0f;
        for (int i = 0; i < VEC; ++i) d = fma(qv[g][i], kf[i], d);
        sc[g][j] = d * ksc;
      }
    }
    for (int o = TPR / 2; o > 0; o >>= 1) {
      for (int g = 0; g < GB; ++g) {
        for (int j = 0; j < U; ++j) sc[g][j] += simd_shuffle_xor(sc[g][j], ushort(o));
      }
    }
    for (int g = 0; g < GB; ++g) {
      float mx = m[g];
      for (int j = 0; j < U; ++j) mx = j < nvalid ? max(mx, sc[g][j]) : mx;
      if (mx > m[g]) {
        const float alpha = exp2(m[g] - mx);
        l[g] *= alpha;
        for (int i = 0; i < VEC; ++i) acc[g][i] *= alpha;
        m[g] = mx;
      }
      const float ms = mx == -INFINITY ? 0.0f : mx;
      float psum = 0.0f;
      for (int j = 0; j < U; ++j) {
        sc[g][j] = j < nvalid ? exp2(sc[g][j] - ms) : 0.0f;
        psum += sc[g][j];
      }
      l[g] += psum;
    }
    for (int j = 0; j < nvalid; ++j) {
      float vf[VEC];
      for (int i = 0; i < VEC; ++i) vf[i] = slabserve::to_f(vb[off + j * D + i]);
      const float vsc = /*VSCALE*/1.0f;
      for (int g = 0; g < GB; ++g) {
        const float w = sc[g][j] * vsc;
        for (int i = 0; i < VEC; ++i) acc[g][i] = fma(w, vf[i], acc[g][i]);
      }
    }
  }
  for (int g = 0; g < GB; ++g) {
    for (int i = 0; i < VEC; ++i) sm_acc[(rg * GB + g) * D + lane * VEC + i] = acc[g][i];
    if (lane == 0) {
      sm_ml[rg * GB + g] = m[g];
      sm_ml[(R + rg) * GB + g] = l[g];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int idx = tid; idx < GB * D; idx += NT) {
    const int g = idx / D, d = idx % D, h = h0 + g;
    float mx = -INFINITY;
    for (int r = 0; r < R; ++r) mx = max(mx, sm_ml[r * GB + g]);
    float lsum = 0.0f, a = 0.0f;
    for (int r = 0; r < R; ++r) {
      const float w = exp2(sm_ml[r * GB + g] - mx);
      lsum = fma(sm_ml[(R + r) * GB + g], w, lsum);
      a = fma(sm_acc[(r * GB + g) * D + d], w, a);
    }
/*STORE*/
  }
// ---- MERGE ----
  const int bh = int(threadgroup_position_in_grid.x), d = int(thread_position_in_threadgroup.x);
  const int nchunk = int(lse_shape[1]);
  float mx = -INFINITY;
  for (int c = 0; c < nchunk; ++c) mx = max(mx, lse[bh * nchunk + c]);
  float lsum = 0.0f, a = 0.0f;
  for (int c = 0; c < nchunk; ++c) {
    const float lc = lse[bh * nchunk + c];
    if (lc != -INFINITY) {
      const float w = exp2(lc - mx);
      lsum += w;
      a = fma(w, opart[(size_t(bh) * nchunk + c) * D + d], a);
    }
  }
  out[size_t(bh) * D + d] = static_cast<TQ>(a / lsum);
