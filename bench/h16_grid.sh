#!/usr/bin/env bash
# The H = 16 synthetic reproduction with the exact mapper on one GPU (docs/synthetic_h16.md):
# the paper's four kappas x 3 seeds and a baseline per seed, the CPU study's model
# (d=128, 4 layers, batch 32 x 66) with the post-sampler's learning rate x10; one process
# per seed, in parallel on the one GPU, then one merged table.  About 10 minutes on an H200
# (estimate; STEPS and LR_MULT override).  Run from the repository root:
#   OUT=out bash bench/h16_grid.sh
#   DEVICE=cpu CONFIG=freetf/configs/tiny.yaml STEPS=3 NGROUPS=2 bash bench/h16_grid.sh   # a check
set -u
OUT="${OUT:-device_out}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STEPS="${STEPS:-1500}"; LR_MULT="${LR_MULT:-10}"; DEVICE="${DEVICE:-cuda}"
CONFIG="${CONFIG:-freetf/configs/synthetic.yaml}"; NGROUPS="${NGROUPS:-16}"
for seed in 0 1 2; do
  timeout "${SEED_TIMEOUT:-540}" python3 tune/reproduce_synthetic.py --in-process --device "$DEVICE" \
    --config "$CONFIG" --groups "$NGROUPS" --per-group "$NGROUPS" --seeds $seed --out "$OUT" --name "h16_s$seed" \
    --set model.latent_dim=16 --set optimizer.post_sampler_lr_mult="$LR_MULT" \
    --set training.max_steps="$STEPS" --set training.warmup_steps=100 \
    --set training.eval_every=0 --set training.log_every=250 --set scheduler.min_lr=1e-4 \
    --set checkpoint.every_steps=0 --set checkpoint.dir="/tmp/h16_s$seed" \
    > "$OUT/h16_s$seed.log" 2>&1 &
done
wait
python3 tune/reproduce_synthetic.py --merge "$OUT"/h16_s0.json "$OUT"/h16_s1.json \
  "$OUT"/h16_s2.json --out "$OUT" --name h16_exact \
  --note "H=16, exact mapper, optimizer.post_sampler_lr_mult=$LR_MULT, $STEPS steps, $DEVICE, $CONFIG." \
  > "$OUT/h16_merge.log" 2>&1
echo "merge rc=$?"; tail -n 12 "$OUT/h16_merge.log"
