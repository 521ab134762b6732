#!/usr/bin/env bash
# Runs on the lent GPU machine, in the copy of this checkout it is sent (infra/lent-gpu/README.md):
#   bash infra/lent-gpu/train.sh MINUTES NAME "TRAIN ARGS" [NAME "TRAIN ARGS" ...]
# Each NAME is one `diffarc train --in-process --gpu` run, all of them at once on the one GPU, each stopped
# after MINUTES (checkpointed and exported in float16). Its export comes back as $OUT/NAME.tar (one file:
# a call returns at most 8; without vae/, the shipped taef2 autoencoder, so that it stays under 16 MiB), its
# output as $OUT/NAME.log. Checkpoints stay in .device-runs/NAME, which a
# later call on the same warm machine resumes from. GPU_FLAG= (empty) runs it on a CPU, to try it here.
# THROUGHPUT=1 first times glc (keep taef2/glc) and the SD-2.1-sized UNet (`diffarc bench --throughput`): $OUT/throughput.json.
set -u
minutes=$1
shift
site=/tmp/diffarc-site
if [ ! -d "$site/diffusers" ]; then  # the carried wheels, once per machine
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .device/wheels/*.whl || exit 1
fi
# diffarc itself at every call (its dependencies are the image's or the wheels'): a warm machine keeps
# $site, and a later call may bring other code or keep other built-in models (pack.py --keep).
rm -rf "$site/diffarc" "$site"/diffarc-*.dist-info
PYTHONPATH=$site python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" . || exit 1
export PYTHONPATH=$site PYTHONUNBUFFERED=1 DIFFARC_LATENT_CACHE=$PWD/.device-runs/latents
python3 -c "import torch, PIL.features; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(), 'AVIF', PIL.features.check('avif'))"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
if [ "${THROUGHPUT:-0}" = 1 ]; then
    mkdir -p /tmp/one && cp "$(find .device/images -name '*.jpg' | sort | head -n 1)" /tmp/one/
    python3 -m diffarc.jobs.cli bench /tmp/one --limit 1 --codec glc --throughput --batch-sizes 1,8,32 --gallery 0 \
        --out /tmp/throughput > "$OUT/throughput.log" 2>&1 && cp /tmp/throughput/results.json "$OUT/throughput.json"
fi
while [ $# -ge 2 ]; do
    name=$1 args=$2
    shift 2
    # shellcheck disable=SC2086  # the run's arguments are words on purpose
    (python3 -m diffarc.jobs.cli train $args --in-process ${GPU_FLAG---gpu} --minutes "$minutes" --save-dtype float16 \
        --data .device/images --work-dir ".device-runs/$name" --out ".device-runs/$name-out" > "$OUT/$name.log" 2>&1 \
        && tar -cf "$OUT/$name.tar" --exclude="$name-out/vae" -C .device-runs "$name-out") &
done
wait
tail -n 3 "$OUT"/*.log
