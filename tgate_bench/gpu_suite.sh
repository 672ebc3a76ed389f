#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md, on a CUDA machine (which may have no network access).
#
#   bash tgate_bench/gpu_suite.sh prepare            # with network: ComfyUI copy, wheels and peer pack in ignored folders
#   bash tgate_bench/gpu_suite.sh run ROW [ROW...]   # on the GPU machine: each ROW writes $OUT/ROW.json and $OUT/ROW.txt
#   bash tgate_bench/gpu_suite.sh tests              # on the GPU machine: the test suite on CUDA (not the server test)
#
# BENCH_ARGS is appended to every row (e.g. BENCH_ARGS="--runs 5" for a shorter run).
# Then: python -m tgate_bench.report $OUT/*.json prints the rows for docs/benchmarks.md.
# `prepare` needs COMFYUI_PATH (a ComfyUI 0.3.64 checkout) and, optionally, PEER_PATHS: checkouts of
# other packs for comparison, space-separated, each copied to .peers/<its folder name> (PEER_PATH, one
# path, is still read). The rows use .peers/ComfyUI_TGate (JettHu/ComfyUI_TGate, the older T-GATE port:
# TGateApplySimple at start_at 0.4) and .peers/ComfyUI-deepcache (styler00dollar/ComfyUI-deepcache:
# DeepCache at cache_interval 3, cache_depth 0, the settings of the pack's deepcache variant) where
# prepare copied them; a row runs without a peer that is not there. Copy the pack's folder with the
# .comfyui, .whl and .peers folders it fills to the GPU machine; $OUT defaults to benchmark-results.
set -euo pipefail
cd "$(dirname "$0")/.."

rows() {
  cat <<'ROWS'
sd15-512-b8      --arch sd15 --size 512 --batch 8
sd15-1024-b2     --arch sd15 --size 1024 --batch 2
sdxl-1024-b4     --arch sdxl --size 1024 --batch 4
sdxl-1024-b4-v2  --arch sdxl --size 1024 --batch 4 --variants baseline,cfg1,tgate,tgate_v2
sd15-512-b1      --arch sd15 --size 512 --batch 1 --runs 9
sdxl-1024-b1     --arch sdxl --size 1024 --batch 1 --runs 9
sd15-512-b1-cg   --arch sd15 --size 512 --batch 1 --runs 9 --compile cudagraphs
sd15-512-b1-ind  --arch sd15 --size 512 --batch 1 --runs 9 --compile inductor
sdxl-1024-b1-cg  --arch sdxl --size 1024 --batch 1 --runs 9 --compile cudagraphs
sd15-512-b1-dc   --arch sd15 --size 512 --batch 1 --runs 9 --variants baseline,cfg1,tgate,deepcache,@deepcache,tgate_deepcache
sd15-512-b4-dc   --arch sd15 --size 512 --batch 4 --variants baseline,cfg1,tgate,deepcache,@deepcache,tgate_deepcache
sdxl-1024-b1-dc  --arch sdxl --size 1024 --batch 1 --runs 9 --variants baseline,cfg1,tgate,deepcache,@deepcache,tgate_deepcache
sdxl-1024-b4-dc  --arch sdxl --size 1024 --batch 4 --variants baseline,cfg1,tgate,deepcache,@deepcache,tgate_deepcache
flux-1024-b1     --arch flux-dev --full-depth --dtype bf16 --size 1024 --batch 1 --steps 20 --cfg 1 --runs 5 --variants baseline,tgate
chroma-1024-b1   --arch chroma --full-depth --dtype bf16 --size 1024 --batch 1 --steps 26 --cfg 4 --runs 5 --variants baseline,cfg1,tgate
qwen-1024-b1     --arch qwen-image --full-depth --dtype bf16 --size 1024 --batch 1 --steps 20 --cfg 2.5 --runs 5 --variants baseline,cfg1,tgate
sd35-1024-b1     --arch sd35-large --full-depth --dtype bf16 --size 1024 --batch 1 --steps 28 --cfg 4.5 --runs 5 --variants baseline,cfg1,tgate
lumina2-1024-b1  --arch lumina2 --full-depth --dtype bf16 --size 1024 --batch 1 --steps 25 --cfg 4 --runs 5 --variants baseline,cfg1,tgate
auraflow-1024-b1 --arch auraflow --full-depth --dtype bf16 --size 1024 --batch 1 --steps 25 --cfg 3.5 --runs 5 --variants baseline,cfg1,tgate
mochi-480-b1     --arch mochi --full-depth --dtype bf16 --size 480 --frames 7 --batch 1 --steps 20 --cfg 4.5 --runs 3 --variants baseline,cfg1,tgate
hidream-1024-b1  --arch hidream-full --full-depth --dtype bf16 --size 1024 --batch 1 --steps 20 --cfg 5 --runs 3 --variants baseline,cfg1,tgate
tiny-smoke       --arch tiny-sd15 --size 128 --runs 2
ROWS
}

case "${1:-}" in
  prepare)
    : "${COMFYUI_PATH:?set COMFYUI_PATH to a ComfyUI checkout}"
    exclude="$(git rev-parse --git-path info/exclude)"  # .git is a file in a git worktree
    mkdir -p "$(dirname "$exclude")"
    for d in .comfyui .whl .peers; do grep -qx "/$d/" "$exclude" 2>/dev/null || echo "/$d/" >> "$exclude"; done
    rm -rf .comfyui && mkdir -p .comfyui .whl .peers
    (cd "$COMFYUI_PATH" && tar --exclude=.git --exclude=__pycache__ --anchored --exclude=./models --exclude=./output --exclude=./custom_nodes -cf - .) | tar -xf - -C .comfyui
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl torchsde==0.2.6 trampoline==0.1.2 av==16.0.1
    for peer_path in ${PEER_PATH:-} ${PEER_PATHS:-}; do
      rm -rf ".peers/$(basename "$peer_path")" && cp -r "$peer_path" .peers/ && rm -rf ".peers/$(basename "$peer_path")/.git"
    done
    du -sh .comfyui .whl .peers
    ;;
  tests)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site COMFYUI_PATH="$PWD/.comfyui" PYTHONUNBUFFERED=1
    out="${OUT:-benchmark-results}"
    mkdir -p "$out"
    python3 -m pytest -q -p no:cacheprovider --deselect tests/test_api_server.py 2>&1 | tee "$out/tests.txt"
    ;;
  run)
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site COMFYUI_PATH="$PWD/.comfyui" PYTHONUNBUFFERED=1
    out="${OUT:-benchmark-results}"
    mkdir -p "$out"
    (nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader || echo "no nvidia-smi") | tee "$out/gpu.txt"
    # A row without --variants runs the default ones with the older T-GATE port beside tgate; @deepcache in
    # a row's variants is the DeepCache pack. Either is left out where prepare did not copy it.
    tgate_peer="" deepcache_peer=""
    [ -d .peers/ComfyUI_TGate ] && tgate_peer=",peer=.peers/ComfyUI_TGate:TGateApplySimple:start_at=0.4"
    [ -d .peers/ComfyUI-deepcache ] && deepcache_peer=",peer=.peers/ComfyUI-deepcache:DeepCache:cache_interval=3,cache_depth=0"
    for row in "$@"; do
      args=$(rows | awk -v r="$row" '$1 == r { $1 = ""; print }')
      [ -n "$args" ] || { echo "unknown row $row; rows: $(rows | awk '{print $1}' | tr '\n' ' ')"; exit 2; }
      case " $args " in
        *" --variants "*) args="${args//,@deepcache/$deepcache_peer}" ;;
        *) args="$args --variants baseline,cfg1,tgate${tgate_peer},tgate_off" ;;
      esac
      # shellcheck disable=SC2086
      python3 -m tgate_bench $args ${BENCH_ARGS:-} --json "$out/$row.json" 2>&1 | grep -v "^W[0-9]" | tee "$out/$row.txt"
    done
    ;;
  *)
    echo "usage: $0 prepare | run ROW [ROW...] | tests"; echo "rows:"; rows; exit 2 ;;
esac
