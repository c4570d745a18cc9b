// Pooled decode attention with the chunk's slices taken by the block's warps from a
// shared-memory counter ("dyn"; appended to pooled_decode.cu, whose async kernel with the
// shared-memory reduction it follows; meant for big blocks, one per multiprocessor).
//
// The block covers its chunk [tok_begin, tok_end) of one (sequence, head block) pair as the
// static kernel does, but its warps do not split the chunk in fixed strides: each takes the
// next slice (SL = RW * U tokens, one warp iteration, inside one page) from a counter in
// shared memory.  With one block of 16 warps per multiprocessor, the warps that stream
// faster take more slices and every warp of the multiprocessor ends within about one slice
// of the others.  (The static split, four blocks of four warps per multiprocessor, ended
// with its slowest block, 12-20 us after the median block at B=8 / 16k on the H200; taking
// slices from global counters shared by a pair's blocks slowed every block down:
// docs/benchmarks/cuda-attention.md, "Ninth session".)  A shared-memory atomic costs tens of
// cycles, so a warp takes its slice number one iteration before it reads the slice's table
// entry and two before it issues the copies, as the static ring does with its table reads.
// Slices a warp takes only grow, so its loop ends, warp-uniformly, at the first slice past
// the chunk.  The row groups' online softmax states are merged as the static kernel's.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace slabserve {

template <typename TQ, typename T, int D, int BS, int HKV, int G, int GB, int NS, int U, int NT,
          int ST, bool DIRECT>
__device__ __forceinline__ void pooled_decode_dyn(
    const TQ* q, const int* table, const int* lengths, int nblk, int sb, float qscale,
    const T* const* ktab, const T* const* vtab, TQ* out, float* opart, float* lse,
    int* counters, uint4* smem) {
  using S = BlockSetup<TQ, T, D, G, GB, HKV, NT>;
  constexpr int VEC = S::VEC, R = S::R, RW = S::RW, SL = RW * U;
  static_assert(BS % SL == 0 && G % GB == 0 && ST >= 2, "a slice lies in one page");
  __shared__ int next_slice;
  S st;
  SLABSERVE_MARK(4);
  if (!st.template begin<BS, DIRECT>(lengths, nblk, opart, lse, counters, out)) return;
  if (threadIdx.x == 0) next_slice = 0;
  SLABSERVE_MARK(5);
  float qv[GB][VEC], m[GB], l[GB], acc[GB][VEC];
  st.load_q(q, qscale, qv, m, l, acc);
  SLABSERVE_MARK_AFTER(6, qv[GB - 1][VEC - 1]);
  __syncthreads();  // next_slice is 0 before any warp takes
  const int* trow = table + (size_t)st.b * nblk;
  const int tok_end = st.tok_end, tid = threadIdx.x;
  const bool leader = (tid & 31) == 0;
  auto take = [&]() -> int {  // the warp's next slice start (warp-uniform)
    const int k = leader ? atomicAdd(&next_slice, 1) : 0;
    return st.tok_begin + __shfl_sync(0xffffffffu, k, 0) * SL;
  };
  auto blk_at = [&](int s) -> int {  // this row group's page in the slice at token s, or -1
    const int u0 = s + st.rgw * U;
    return u0 < tok_end ? trow[u0 / BS] : -1;
  };
  auto issue = [&](int it, int s, int blk) {
    if (blk >= 0) {
      const int u0 = s + st.rgw * U;
      const int sl = NS == 1 ? 0 : blk / sb;
      const size_t off = st.template offset<BS>(blk, sl, sb, u0);
      uint4* dst = smem + (it % ST) * 2 * U * NT + tid;
#pragma unroll
      for (int j = 0; j < U; ++j) cp_async16(dst + j * NT, ktab[sl] + off + j * D);
#pragma unroll
      for (int j = 0; j < U; ++j) cp_async16(dst + (U + j) * NT, vtab[sl] + off + j * D);
    }
    cp_commit();
  };
  int ring[ST];  // slice start of each stage in flight; ring[0] is consumed next
#pragma unroll
  for (int p = 0; p < ST - 1; ++p) {
    ring[p] = take();
    issue(p, ring[p], blk_at(ring[p]));
  }
  int s_next = take();
  int blk_next = blk_at(s_next);
  SLABSERVE_MARK(1);
  for (int it = 0; ring[0] < tok_end; ++it) {  // ring[0] is warp-uniform
    const int s_cur = s_next, blk_cur = blk_next;
    s_next = take();
    blk_next = blk_at(s_next);
    issue(it + ST - 1, s_cur, blk_cur);
    ring[ST - 1] = s_cur;
    cp_wait<ST - 1>();
    if (it == 0) SLABSERVE_MARK(2);
    const uint4* src = smem + (it % ST) * 2 * U * NT + tid;
    uint4 kr[U];
#pragma unroll
    for (int j = 0; j < U; ++j) kr[j] = src[j * NT];
    const int u0 = ring[0] + st.rgw * U;
    const int nvalid = u0 < tok_end ? min(U, tok_end - u0) : 0;
    auto vrow = [&](int j) { return src[(U + j) * NT]; };
    __syncwarp();  // scratch: the warp's K vectors of the stage (all read)
    float* wscr = reinterpret_cast<float*>(smem + (it % ST) * 2 * U * NT + st.warp * 32);
    consume_unit_x<T, GB, U, VEC, S::TPR>(kr, vrow, nvalid, qv, m, l, acc, wscr, NT * 4,
                                          st.lane, st.rgw);
#pragma unroll
    for (int p = 0; p < ST - 1; ++p) ring[p] = ring[p + 1];
  }
  SLABSERVE_MARK(3);
  cp_wait<0>();
  __syncthreads();  // the stage buffers are reused by the merge
  float* sm_acc = reinterpret_cast<float*>(smem);
  st.template merge<DIRECT>(m, l, acc, sm_acc, sm_acc + R * GB * D, out, opart, lse, counters);
}

}  // namespace slabserve
