// Pooled decode attention with page stealing (appended to pooled_decode.cu, whose async
// kernel with the shared-memory reduction it follows): variants "steal" (SF = 0) and "tail".
//
// The blocks of one (sequence, head block) pair split the first SF/16 of the sequence's
// slices (SL = RW * U tokens, one warp iteration, inside one page) in fixed chunks, as the
// static kernel does (warp w of block c takes slices c * per + w, + NW, ...); the rest of the
// sequence is taken slice by slice from the pair's counter, so blocks on faster
// multiprocessors take more of the tail and a launch ends about with its average block.
// (With a static one-wave split, blocks on SMs that hold four blocks streamed 17% slower than
// on SMs holding three, and the launch ended with its slowest block; all slices stolen
// ("steal") evened that out but streamed slower: docs/benchmarks/cuda-attention.md, "Eighth
// session".)  A warp takes its slice number one iteration before it reads the slice's table
// entry and two before it issues the copies, so the atomic's latency is off the critical
// path.  Slices a warp takes only grow (stolen ones lie past every fixed one), so the loop
// ends, warp-uniformly, at the first slice past the sequence.  Each row group keeps an online
// softmax over whatever tokens it took; the block's partial output and log2-sum-exp are merged
// like a static chunk's (a block that took nothing writes an empty partial: lse -inf).
// work[2 * pair] counts the slices stolen, work[2 * pair + 1] the blocks done; the pair's last
// block resets both to 0 for the next launch (pair = b * gridDim.x + blockIdx.x).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace slabserve {

template <typename TQ, typename T, int D, int BS, int HKV, int G, int GB, int NS, int U, int NT,
          int ST, bool XRED, int SF>
__device__ __forceinline__ void pooled_decode_steal(
    const TQ* q, const int* table, const int* lengths, int nblk, int sb, float qscale,
    const T* const* ktab, const T* const* vtab, TQ* out, float* opart, float* lse,
    int* counters, int* work, uint4* smem) {
  using S = BlockSetup<TQ, T, D, G, GB, HKV, NT>;
  constexpr int VEC = S::VEC, R = S::R, RW = S::RW, SL = RW * U;
  static_assert(BS % SL == 0 && G % GB == 0 && ST >= 2, "a slice lies in one page");
  static_assert(SF >= 0 && SF <= 16, "SF: sixteenths of the slices split in fixed chunks");
  constexpr int NW = NT / 32;
  S st;
  SLABSERVE_MARK(4);
  st.template init<BS>(lengths, nblk);  // thread layout; the chunk bounds are not used
  const int tok_end = lengths[st.b];
  SLABSERVE_MARK(5);
  float qv[GB][VEC], m[GB], l[GB], acc[GB][VEC];
  st.load_q(q, qscale, qv, m, l, acc);
  SLABSERVE_MARK_AFTER(6, qv[GB - 1][VEC - 1]);
  const int* trow = table + (size_t)st.b * nblk;
  int* pair = work + 2 * (st.b * gridDim.x + blockIdx.x);
  const bool leader = (threadIdx.x & 31) == 0;
  const int tid = threadIdx.x;
  const int n_sl = (tok_end + SL - 1) / SL;  // the sequence's slices
  const int fixed = n_sl * SF / 16;           // slices [0, fixed) go in fixed chunks
  const int per = (fixed + st.nchunk - 1) / st.nchunk;
  const int fixed_end = min((st.c + 1) * per, fixed);
  int own = st.c * per + st.warp;  // this warp's next fixed slice
  auto take = [&]() {  // lane 0's slice number (a fixed one: every lane's)
    if (own < fixed_end) {
      own += NW;
      return own - NW;
    }
    return leader ? fixed + atomicAdd(pair, 1) : 0;
  };
  auto start_of = [&](int raw) { return __shfl_sync(0xffffffffu, raw, 0) * SL; };
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
  int raw = take();
#pragma unroll
  for (int p = 0; p < ST - 1; ++p) {
    ring[p] = start_of(raw);
    raw = take();
    issue(p, ring[p], blk_at(ring[p]));
  }
  int s_next = start_of(raw);
  raw = take();
  int blk_next = blk_at(s_next);
  SLABSERVE_MARK(1);
  for (int it = 0; ring[0] < tok_end; ++it) {
    const int s_cur = s_next, blk_cur = blk_next;
    s_next = start_of(raw);
    raw = take();
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
    if constexpr (XRED) {  // scratch: the warp's K vectors of the stage (all read)
      __syncwarp();
      float* wscr = reinterpret_cast<float*>(smem + (it % ST) * 2 * U * NT + st.warp * 32);
      consume_unit_x<T, GB, U, VEC, S::TPR>(kr, vrow, nvalid, qv, m, l, acc, wscr, NT * 4,
                                            st.lane, st.rgw);
    } else {
      consume_unit<T, GB, U, VEC, S::TPR>(kr, vrow, nvalid, qv, m, l, acc);
    }
#pragma unroll
    for (int p = 0; p < ST - 1; ++p) ring[p] = ring[p + 1];
  }
  SLABSERVE_MARK(3);
  cp_wait<0>();
  __threadfence();  // this warp's last take is done before the block counts itself done
  __syncthreads();  // also: the stage buffers are reused by the merge
  if (threadIdx.x == 0 && atomicAdd(pair + 1, 1) == st.nchunk - 1) {
    pair[0] = 0;  // every block of the pair is past its last take
    pair[1] = 0;
  }
  float* sm_acc = reinterpret_cast<float*>(smem);
  st.template merge<false>(m, l, acc, sm_acc, sm_acc + R * GB * D, out, opart, lse, counters);
}

}  // namespace slabserve
