#!/usr/bin/env bash
# Recipe probes for the `best` preset, run side by side on one NVIDIA GPU.
#
#     [DATA=DIR] [JOBS=2] [LIMIT=470] benchmarks/gpu_probes.sh [PROBE...]
#
# Each probe is one `benchmarks/fashion_mnist.py --presets best --set device=cuda ...` run
# (fp32 without TF32, the CPU's augmentation draws), so it writes its own result file under
# benchmarks/results/ with the GPU named in it. The GPU answers which recipe scores highest for
# a number of epochs; what that costs on a CPU comes from the CPU runs' images per second.
# PROBE names pick probes from the list below (default: all). DATA is --data-dir for
# Fashion-MNIST where it is not in the system folder. JOBS probes run at a time: on an H200,
# two side by side trained at about 15,500 img/s each (36 epochs of best in 2.5 min), while
# twelve side by side crawled at about 2,500 img/s each, the GPU switching between processes
# that each wait on it every step. A probe still running after LIMIT seconds is stopped and
# kept as a partial record. At the end a table of the probes is printed.
set -u
cd "$(dirname "$0")/.."
data=${DATA:-}
jobs=${JOBS:-2}
limit=${LIMIT:-470}
python=${PYTHON:-python3}
chosen=" $* "
logs=runs/probe-logs
mkdir -p "$logs"
marker=$(mktemp)

probe() {
    local name=$1
    shift
    [[ $chosen == "  " || $chosen == *" $name "* ]] || return 0
    while (($(jobs -rp | wc -l) >= jobs)); do wait -n; done
    timeout -s TERM "$limit" "$python" benchmarks/fashion_mnist.py --presets best \
        --note "GPU probe $name" \
        --set device=cuda threads=1 ${data:+data_dir=$data} "$@" >"$logs/$name.log" 2>&1 &
}

probe best
probe epochs48 epochs=48
probe width0.375 width=0.375
probe epochs24 epochs=24
probe seed1 seed=1
probe cutmix0.5 cutmix=0.5
probe cutmix1 cutmix=1.0
probe batch128 batch_size=128 lr=0.1
probe wd1e-3 weight_decay=0.001
probe lr0.4 lr=0.4
probe resnet20 model=resnet20 stem=cifar width=1
probe full-width width=1
probe epochs100 epochs=100
probe epochs100-cutmix0.5 epochs=100 cutmix=0.5
probe full-width-epochs100-cutmix0.5 width=1 epochs=100 cutmix=0.5
probe ema0.999 epochs=48 ema=0.999
probe ls0.2 epochs=48 label_smoothing=0.2
probe wd2.5e-4 epochs=48 weight_decay=0.00025
probe lr0.3 epochs=48 lr=0.3
wait

"$python" - "$marker" <<'EOF'
import json
import os
import sys
from pathlib import Path

since = os.path.getmtime(sys.argv[1])
print(f"{'probe':<40} {'epochs':>9} {'test %':>7} {'best %':>7} {'minutes':>8}")
for path in sorted(Path("benchmarks/results").glob("fashion_mnist-*.json")):
    if path.stat().st_mtime < since:
        continue
    result = json.loads(path.read_text())
    for row in result["runs"]:
        done = len(row["history"])
        epochs = f"{done}/{row['config'].get('epochs', '?')}"
        print(
            f"{result['note']:<40} {epochs:>9} {100 * row['test_accuracy']:>7.2f} "
            f"{100 * row['best_epoch_accuracy']:>7.2f} {row['seconds'] / 60:>8.1f}  {path.name}"
        )
EOF
rm -f "$marker"
