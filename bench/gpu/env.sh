# Sourced by every bench/gpu/*.sh: the GPU machine's environment after the set-up runs
# (../shared/gpu/README.md; MLX's CUDA build in /tmp/site, .gpu-extra carried for the
# server's extra wheels) and $OUT, the folder whose files come back.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site:$PWD/.gpu-extra/site
export SLABSERVE_CACHE_DIR=/tmp/sscache
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
