// y = x w^T (+ bias) for a few rows: x [MM, KK], w [NN, KK] row-major, y [MM, NN]; one warp
// per output column n reads w's row n once (16-byte loads, VEC values a lane) and keeps
// MM float32 sums, reduced across the warp by shuffles. Template: T (half or bfloat16),
// MM, NN, KK (KK % VEC == 0); the Python side writes the bias term into the last lines.
  constexpr int VEC = 16 / sizeof(T);
  const int lane = threadIdx.x & 31;
  const int n = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  if (n >= NN) return;
  float acc[MM];
#pragma unroll
  for (int m = 0; m < MM; ++m) acc[m] = 0.f;
  const T* wr = w + (size_t)n * KK;
#pragma unroll 4
  for (int k = lane * VEC; k < KK; k += 32 * VEC) {
    const uint4 wv = *reinterpret_cast<const uint4*>(wr + k);
    const T* wp = reinterpret_cast<const T*>(&wv);
    float wf[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) wf[i] = static_cast<float>(wp[i]);
#pragma unroll
    for (int m = 0; m < MM; ++m) {
      const uint4 xv = *reinterpret_cast<const uint4*>(x + (size_t)m * KK + k);
      const T* xp = reinterpret_cast<const T*>(&xv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[m] += wf[i] * static_cast<float>(xp[i]);
    }
  }
#pragma unroll
  for (int m = 0; m < MM; ++m) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
  }
  if (lane == 0) {
    const float b = SLABSERVE_BIAS;  // 0.f without a bias input
#pragma unroll
    for (int m = 0; m < MM; ++m) y[(size_t)m * NN + n] = static_cast<T>(acc[m] + b);
  }
