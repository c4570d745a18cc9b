. bench/gpu/env.sh
timeout 300 python -m slabserve.bench.cuda_kernel --sweep --natives async3,mma3 --batches 4,8,16 --ctxs 16384,32768 --shapes 32/8/64/f16,14/2/64/bf16 > /tmp/sweep.log 2>&1
grep "^{" /tmp/sweep.log | python -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l)
    for n in ('async3','mma3'):
        cs=sorted((int(k.split('_c')[1][:-3]),v) for k,v in r.items() if k.startswith(n+'_c'))
        print(r['shape'],r['B'],r['ctx'],n,'plan',r.get(n+'_us'),' '.join(f'c{c}:{v}' for c,v in cs))
" | tee $OUT/sweep.txt
tail -3 /tmp/sweep.log
