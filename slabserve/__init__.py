"""slabserve: a continuous-batching, OpenAI-compatible server with a slab-paged KV cache on MLX."""

__version__ = "0.1.0"
