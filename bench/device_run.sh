#!/usr/bin/env bash
# The one prepared GPU script (H100/H200): the loop under NCCL + bf16 autocast, the
# throughput/MFU benchmark, and the synthetic reproduction at a larger size.  Each
# step writes its own JSON/log into $OUT (or ./device_out), so a timeout keeps the rest.
set -u
OUT="${OUT:-device_out}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__)" >> "$OUT/gpu.txt"
timeout 100 python3 bench/cuda_ddp_check.py --steps ${DDP_STEPS:-300} --json "$OUT/cuda_ddp.json" \
  > "$OUT/cuda_ddp.log" 2>&1; echo "cuda_ddp rc=$?"
if [ "${RUN_GPU_BENCH:-1}" = 1 ]; then
  timeout 200 python3 bench/gpu.py --repeats 8 --json "$OUT/gpu_bench.json" \
    > "$OUT/gpu_bench.log" 2>&1; echo "gpu_bench rc=$?"
  timeout 200 python3 bench/gpu.py --repeats 8 --compile --mapper-score-precision autocast \
    --json "$OUT/gpu_bench_compile_bf16scores.json" > "$OUT/gpu_bench_compile.log" 2>&1
  echo "gpu_bench_compile rc=$?"
  # issue 17's levers: the chunked linear + cross-entropy (no fp32 logits), compiled, with
  # bf16 mapper scores; at the batch that fits (32) and at batch 16; the loss alone.
  for b in 32 16; do
    timeout 200 python3 bench/gpu.py --repeats 8 --compile --mapper-score-precision autocast \
      --cross-entropy chunked --batch-size $b \
      --json "$OUT/gpu_bench_chunked_ce_b$b.json" > "$OUT/gpu_bench_chunked_ce_b$b.log" 2>&1
    echo "gpu_bench_chunked_ce_b$b rc=$?"
  done
  timeout 100 python3 bench/cross_entropy.py --device cuda --repeats 10 \
    --json "$OUT/cross_entropy_cuda.json" > "$OUT/cross_entropy_cuda.log" 2>&1
  echo "cross_entropy_cuda rc=$?"
fi
# issue 16: FSDP vs DDP on one GPU, GPT-2 small's blocks with H = 16 (~135M parameters)
timeout 240 python3 bench/fsdp_vs_ddp.py --steps 60 --rounds 2 --json "$OUT/fsdp_vs_ddp.json" \
  > "$OUT/fsdp_vs_ddp.log" 2>&1; echo "fsdp_vs_ddp rc=$?"
timeout ${REPRO_TIMEOUT:-240} python3 tune/reproduce_synthetic.py --in-process --device cuda \
  --config freetf/configs/synthetic.yaml --groups 16 --per-group 16 --out "$OUT" --name repro_gpu \
  --set model.hidden_dim=256 --set model.num_layers=6 --set model.latent_dim=16 \
  --set training.batch_size=64 --set training.max_steps=${REPRO_STEPS:-1500} --set training.eval_every=0 \
  --set training.log_every=250 --set checkpoint.every_steps=0 --set checkpoint.dir=/tmp/repro \
  > "$OUT/repro_gpu.log" 2>&1; echo "repro rc=$?"
tail -n 3 "$OUT"/*.log
