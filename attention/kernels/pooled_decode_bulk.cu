// Pooled decode attention, FMA products, page tiles fetched by bulk copies (Hopper
// cp.async.bulk with mbarrier completion; sm_90+).  Appended to pooled_decode.cu (which
// provides BlockSetup, consume_unit, merge_rows, empty_chunk).
//
// Same work split as pooled_decode_async: a warp's RW row groups of U tokens cover TILE =
// RW * U consecutive tokens per iteration, which lie in one page (BS is a multiple of TILE
// and chunks start on page boundaries), so one kv head's K rows of the tile are one
// contiguous TILE * D run in the slab, and so are its V rows.  Lane 0 of each warp copies
// both runs with two bulk copies into the warp's stage of an ST-deep ring and arms the
// stage's mbarrier with their byte count; every lane waits on the barrier's phase, reads
// its 16-byte vectors from the natural row layout (a quarter warp reads one 128-byte row:
// no bank conflicts) and, after the warp is done with the stage, lane 0 refills it.  One
// request per 2 KiB run replaces 128 per-lane 16-byte cp.async requests (ADR 0004).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace slabserve {

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count)
               : "memory");
}
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_expect_tx(unsigned long long* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(
                   smem_addr(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
  unsigned done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  }
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes,
                                          unsigned long long* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
      "[%3];\n" ::"r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}
// Order this warp's earlier shared-memory reads before the next bulk write into them.
__device__ __forceinline__ void fence_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

template <typename TQ, typename T, int D, int BS, int HKV, int G, int GB, int NS, int U, int NT,
          int ST, bool DIRECT>
__device__ __forceinline__ void pooled_decode_bulk(
    const TQ* q, const int* table, const int* lengths, int nblk, int sb, float qscale,
    const T* const* ktab, const T* const* vtab, TQ* out, float* opart, float* lse,
    int* counters, uint4* smem) {
  using S = BlockSetup<TQ, T, D, G, GB, HKV, NT>;
  constexpr int VEC = S::VEC, R = S::R, RW = S::RW, NW = NT / 32;
  constexpr int TILE = RW * U, TILE_ELEMS = TILE * D;
  constexpr unsigned TILE_BYTES = TILE_ELEMS * sizeof(T);
  static_assert(BS % TILE == 0 && TILE_BYTES % 16 == 0 && G % GB == 0, "bad tiling");
  __shared__ __align__(8) unsigned long long bars[NW][ST];
  S st;
  if (!st.template begin<BS, DIRECT>(lengths, nblk, opart, lse, counters, out)) return;
  float qv[GB][VEC], m[GB], l[GB], acc[GB][VEC];
  st.load_q(q, qscale, qv, m, l, acc);
  const int* trow = table + (size_t)st.b * nblk;
  const int span = R * U;                                // tokens per block iteration
  const int wfirst = st.tok_begin + st.warp * TILE;      // the warp's first tile
  const int n_it = wfirst < st.tok_end ? (st.tok_end - wfirst + span - 1) / span : 0;
  T* ring = reinterpret_cast<T*>(smem) + (size_t)st.warp * ST * 2 * TILE_ELEMS;
  unsigned long long* wb = bars[st.warp];
  const bool leader = (threadIdx.x & 31) == 0;
  if (leader) {
#pragma unroll
    for (int s = 0; s < ST; ++s) mbar_init(&wb[s], 1);
    mbar_init_fence();
  }
  __syncwarp();
  auto issue = [&](int it) {  // leader only; tile it < n_it starts before tok_end
    const int u0 = wfirst + it * span;
    const int blk = trow[u0 / BS];
    const int s = NS == 1 ? 0 : blk / sb;
    const size_t off = st.template row_offset<BS>(blk, s, sb, u0);
    T* dst = ring + (it % ST) * 2 * TILE_ELEMS;
    mbar_expect_tx(&wb[it % ST], 2 * TILE_BYTES);
    bulk_copy(dst, ktab[s] + off, TILE_BYTES, &wb[it % ST]);
    bulk_copy(dst + TILE_ELEMS, vtab[s] + off, TILE_BYTES, &wb[it % ST]);
  };
  if (leader) {
    for (int p = 0; p < ST && p < n_it; ++p) issue(p);
  }
  for (int it = 0; it < n_it; ++it) {  // n_it is warp-uniform: shuffles stay converged
    mbar_wait(&wb[it % ST], (it / ST) & 1);
    const T* kt = ring + (it % ST) * 2 * TILE_ELEMS + st.rgw * U * D + st.lane * VEC;
    const T* vt = kt + TILE_ELEMS;
    uint4 kr[U];
#pragma unroll
    for (int j = 0; j < U; ++j) kr[j] = *reinterpret_cast<const uint4*>(kt + j * D);
    const int u0 = wfirst + it * span + st.rgw * U;
    const int nvalid = u0 < st.tok_end ? min(U, st.tok_end - u0) : 0;
    consume_unit<T, GB, U, VEC, S::TPR>(
        kr, [&](int j) { return *reinterpret_cast<const uint4*>(vt + j * D); }, nvalid, qv, m,
        l, acc);
    __syncwarp();  // the whole warp is done with this stage
    if (leader && it + ST < n_it) {
      fence_async_smem();
      issue(it + ST);
    }
  }
  __syncthreads();  // every copy was waited for; the ring is reused by the merge
  float* sm_acc = reinterpret_cast<float*>(smem);
  st.template merge<DIRECT>(m, l, acc, sm_acc, sm_acc + R * GB * D, out, opart, lse, counters);
}

}  // namespace slabserve
