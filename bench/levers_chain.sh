#!/bin/bash
# Issue #28's sweep from nothing on one machine (the one it was measured on: one H200, 16 cores; see
# docs/experiments.md): the demo's prep, its two autoencoders (32 x 16 as the demo, and 16 x 32), adapt,
# encode, then `python -m bench.denoiser_levers` for the levers on the demo's latents and the base run on
# the 16 x 32 latents, all at the demo's budgets in batches (fp32, as on CPU). Stops launching new work at
# DEADLINE seconds and packs what finished into OUT_DIR (levers.md, levers.png, levers.tgz).
#   bash bench/levers_chain.sh WORK OUT_DIR DEADLINE "lever,lever,..." PARALLEL
set -u
W=$1; O=$2; DEADLINE=$3; LEVERS=$4; PAR=${5:-6}
AE_BA=${AE_BA:-4800}; SCALE=${SCALE:-1}; DRY=${DRY:-}   # a dry run: AE_BA=20 SCALE=0.005 DRY="max_duration=10ba"
T0=$(date +%s); mkdir -p "$W" "$O"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}   # the evaluations run on CPU beside each other
PY=${PYTHON:-python3}; CLI="$PY -m launch.cli"
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
TS=$W/text_shards
if [ -n "${TEXT_SHARDS:-}" ]; then    # the prep job's output made elsewhere (the bundled corpus is a 56 MB package)
  stamp "text shards from $TEXT_SHARDS"; cp -r "$TEXT_SHARDS" $TS
else
  stamp prep
  $CLI prep yamls/prep/bundled.yaml out_dir=$TS sources.gutenberg.min_lines=2 sources.gutenberg.max_lines=2 > $W/prep.log 2>&1 || { tail -20 $W/prep.log; }
fi
ae() {  # ae NAME overrides...
  local n=$1; shift
  $CLI train yamls/autoencoder/tiny_cpu.yaml out_dir=$W/$n/autoencoder data.path=$TS model.max_tokens=32 \
      max_duration=${AE_BA}ba precision=fp32 "$@" > $W/$n.ae.log 2>&1 &&
  $CLI train yamls/autoencoder/adapt_decoder_tiny_cpu.yaml out_dir=$W/$n/autoencoder_adapted \
      adapt.init_from=$W/$n/autoencoder/autoencoder data.path=$TS precision=fp32 $DRY >> $W/$n.ae.log 2>&1 &&
  $CLI encode yamls/encode/bundled.yaml out_dir=$W/$n/latents autoencoder=$W/$n/autoencoder_adapted/autoencoder \
      data.path=$TS >> $W/$n.ae.log 2>&1
  stamp "chain $n rc=$?"; tail -3 $W/$n.ae.log
}
stamp autoencoders
ae base & ae l16x32 model.num_latents=16 model.dim_latent=32 & wait
sweep() {  # sweep NAME OUT levers parallel
  timeout --signal=INT $(left) $PY -m bench.denoiser_levers --latents $W/$1/latents \
      --autoencoder $W/$1/autoencoder_adapted/autoencoder --out $2 --levers $3 --parallel $4 --threads 1 --scale $SCALE --set precision=fp32 \
      > $2.log 2>&1; stamp "sweep $1 rc=$?"
}
mkdir -p $W/levers $W/levers16
stamp "levers ($(left)s left)"
sweep base $W/levers $LEVERS $PAR & sweep l16x32 $W/levers16 base 1 & wait

cp $W/levers/levers.md $W/levers/levers.png $O/ 2>/dev/null
cp $W/levers16/levers.md $O/levers16.md 2>/dev/null
(cd $W && tar czf $O/levers.tgz --exclude='*.pt' --exclude='*.safetensors' --exclude='*.bin' --exclude='*.mds*' \
    --exclude='checkpoints' --exclude='latents' --exclude='text_shards' --exclude='*/autoencoder*/autoencoder' \
    levers levers16 *.log base/autoencoder*/metrics.jsonl l16x32/autoencoder*/metrics.jsonl 2>/dev/null)
stamp "packed: $(ls -la $O | tail -n +2 | awk '{print $5, $9}' | tr '\n' ' ')"
