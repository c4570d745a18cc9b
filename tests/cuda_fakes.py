"""Test double for mx.fast.cuda_kernel (CPU tests of the CUDA launch plumbing)."""

import mlx.core as mx


class FakeKernel:
    """Records launches instead of compiling (mx.fast.cuda_kernel runs only on CUDA)."""

    def __init__(self, log, **spec):
        self.log, self.spec = log, spec

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template):
        self.log.append(dict(spec=self.spec, inputs=inputs, grid=grid, tg=threadgroup,
                             template=dict(template), shapes=output_shapes))
        return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes, strict=True)]
