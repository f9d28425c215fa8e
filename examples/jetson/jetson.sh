#!/usr/bin/env bash
# The Jetson path end to end. Run the first part on an x86 machine with the export extra, the second on the Jetson.
#   bash examples/jetson/jetson.sh export  [MODEL] [OUT]     # x86: export for TensorRT at int4 (no GPU needed)
#   bash examples/jetson/jetson.sh device  [OUT] [IMAGE]     # Jetson: budget, build the engines, run, bench
set -euo pipefail
step=${1:-}
case "$step" in
  export)
    model=${2:-paligemma}
    out=${3:-$model-int4-tensorrt}
    mmedge export --model "$model" --target tensorrt --quant int4 -o "$out"
    python "$(dirname "$0")/budget.py" "$out"
    echo "now copy $out to the Jetson (rsync -a $out jetson:~/) and run: bash jetson.sh device $out IMAGE"
    ;;
  device)
    pkg=${2:?the package directory}
    image=${3:-photo.jpg}
    python "$(dirname "$0")/budget.py" "$pkg"
    mmedge build "$pkg"                                    # once per GPU kind and TensorRT version: minutes
    mmedge run "$pkg" --image "$image" --prompt "caption en" --stream
    mmedge bench "$pkg" --image "$image" --new-tokens 64 --runs 5
    ;;
  *)
    sed -n 2,5p "$0"
    exit 2
    ;;
esac
