#!/usr/bin/env bash
# The project's one-GPU smoke (bench/README.md): does ManagerTower train on this machine's GPU, how fast, and are
# its bf16 numbers sound. From the project root, on one NVIDIA GPU without network (about 7 minutes on an H200):
#
#   bash bench/gpu_smoke.sh                          # or: make gpu-smoke
#   GPU_SMOKE_STAGES="3 4" bash bench/gpu_smoke.sh   # a rerun of some stages on the same machine
#
# Stages: install (the machine's torch, wheels from .gpu_carry/whl, pip install --no-deps -e .; never `make
# install`, which downloads), 1-device (facts, bf16 GEMM ceiling), 2-model (bf16 steps, torch vs Apex LayerNorm),
# 3-pretrain (python -m pretrain, base recipe, 40 steps: samples/s, MFU), 4-export (fp32, not bf16-rounded),
# 5-zero3 (8 steps with evaluation), 6-loader (bench/loader.py --device cuda). Each has its own timeout inside
# GPU_SMOKE_BUDGET_S (default 480 s); a failing stage never stops the next, one that no longer fits is SKIP.
# $OUT (default runs/gpu_smoke): summary.txt first (a line per stage as it ends), smoke.log, env.txt, the runs'
# metrics and pictures. $GPU_SMOKE_WORK (default /tmp/gpu_smoke, kept for reruns): venv, shards, builds, checkpoints.
# The runs ask for the GPU (train.device=cuda, CUDA_VISIBLE_DEVICES=0 when unset), so none falls back to the CPU:
# without CUDA, 1 and 2 FAIL saying so, 3, 5 and 6 FAIL fast with the project's own one-line errors, 4 is SKIP.
set -u
ROOT=$(pwd)
[ -f "$ROOT/setup.py" ] && [ -d "$ROOT/managertower" ] || { echo "run it from the project root" >&2; exit 2; }
START=$(date +%s) BUDGET=${GPU_SMOKE_BUDGET_S:-480} STAGES=${GPU_SMOKE_STAGES:-1 2 3 4 5 6}
OUT=${OUT:-$ROOT/runs/gpu_smoke} WORK=${GPU_SMOKE_WORK:-${TMPDIR:-/tmp}/gpu_smoke} CARRY=${GPU_CARRY:-$ROOT/.gpu_carry}
SUMMARY=$OUT/summary.txt APEX_STATUS=$WORK/apex_build.status FUSED_STATUS=$WORK/fused_adam.status
mkdir -p "$OUT" "$WORK/logs" "$WORK/py" "$WORK/apex_build"
rm -f "$APEX_STATUS" "$FUSED_STATUS"
export ROOT WORK CARRY APEX_STATUS
export DS_ACCELERATOR=cuda  # the Makefile and the tests set cpu
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)} TOKENIZER=$ROOT/managertower/model/assets/tiny_tokenizer

printf 'ManagerTower GPU smoke  %s  %s  budget %s s  work %s\n\n%-10s %-13s %s\n' "$(date -u '+%F %T UTC')" \
  "$(hostname)" "$BUDGET" "$WORK" stage status seconds > "$SUMMARY"
: > "$OUT/smoke.log"
say() { echo "[gpu_smoke $(( $(date +%s) - START )) s] $*" | tee -a "$OUT/smoke.log"; }
row() { printf '%-10s %-13s %s\n' "$1" "$2" "${3:-}" >> "$SUMMARY"; }
skip() { row "$1" SKIP "$2"; say "$1: SKIP ($2)"; }
wanted() { [[ " $STAGES " == *" $1 "* ]]; }
FAILED=0  # stages that failed or timed out: the exit code

# stage NAME MAX_S MIN_S COMMAND...: COMMAND (a function or program) under a timeout of MAX_S or the budget left,
# SKIP when less than MIN_S is left. The summary gets its status, its RESULT lines and, failing, its last error line.
stage() {
  local name=$1 max=$2 min=$3; shift 3
  local left=$(( BUDGET - $(date +%s) + START )) log=$WORK/logs/$name.log t0 rc=0 status=PASS
  if (( left < min )); then skip "$name" "budget: $left s left, needs $min s"; return 1; fi
  say "== $name (timeout $(( max < left ? max : left )) s)"
  t0=$(date +%s)
  timeout -k 10 $(( max < left ? max : left )) bash -c '"$@"' _ "$@" > "$log" 2>&1 || rc=$?
  if (( rc == 124 || rc == 137 )); then status=TIMEOUT; elif (( rc )); then status="FAIL(rc=$rc)"; fi
  [ "$status" = PASS ] || FAILED=$(( FAILED + 1 ))
  row "$name" "$status" "$(( $(date +%s) - t0 ))"
  grep -a '^RESULT ' "$log" | sed 's/^RESULT /    /' >> "$SUMMARY"
  [ "$status" = PASS ] || grep -aE '^error|Error:|error:' "$log" | tail -1 | cut -c1-400 | sed 's/^/    /' >> "$SUMMARY"
  { echo "----- $name: $status"; tail -c 200000 "$log"; } >> "$OUT/smoke.log"
  say "$name: $status"
  return $rc
}

# --- python helpers: their RESULT lines go to the summary ----------------------------------------------------------
cat > "$WORK/py/device.py" <<'EOF'
"""Stage 1: what torch sees, the versions the runs use, and the GPU's bf16 matmul ceiling."""
from importlib.metadata import distributions
import torch
def result(key, value): print(f"RESULT {key}: {value}", flush=True)
found = {(d.metadata["Name"] or "").lower().replace("_", "-"): d.version for d in distributions()}
names = ["torch", "deepspeed", "transformers", "open-clip-torch", "webdataset"]
names += [name for name in found if name.startswith("nvidia-dali")] or ["nvidia-dali"]
result("versions", ", ".join(f"{name} {found.get(name, 'missing')}" for name in names))
result("torch CUDA build", f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if not torch.cuda.is_available():
    raise SystemExit(f"error: torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}) sees no usable GPU")
p = torch.cuda.get_device_properties(0)
result("device", f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
       f"bf16 {torch.cuda.is_bf16_supported()}, NCCL {torch.cuda.nccl.version()}, {torch.cuda.device_count()} visible")
n, reps = 8192, 20
a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(3):  # warm-up: cuBLAS picks its kernel, the clocks rise
    a @ b
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(reps):
    a @ b
end.record()
torch.cuda.synchronize()
tflops = 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12
from managertower.engine.loop import peak_flops  # what the runs' MFU divides by (imports DeepSpeed)
peak, _ = peak_flops("bf16")  # the bf16 peak: the smoke runs train in bf16
result("bf16 GEMM 8192^3", f"{tflops:.0f} TFLOP/s" + (f" = {tflops * 1e12 / peak:.0%} of the {peak / 1e12:.0f} the "
       "MFU divides by" if peak else " (no peak known for this GPU, so no MFU: set MT_PEAK_TFLOPS)"))
EOF

cat > "$WORK/py/model_bf16.py" <<'EOF'
"""Stage 2: tiny and base towers, 3 bf16 training steps each with torch's and with Apex's LayerNorm. Each bf16
tower (cast whole, as DeepSpeed's bf16 mode does) starts from the weights of an fp32 tower with torch's LayerNorm
and its eval-mode cls_feats are compared with that tower's: Apex passes when its error is no larger than the torch
bf16 tower's (both only round to bf16). argv[1]: where the background Apex build leaves its exit code."""
import importlib, math, random, sys, time
from pathlib import Path
import torch
from managertower.config import load_config
from managertower.data.collate import PretrainCollator
from managertower.data.synthetic import captions_for, random_scene
from managertower.engine.loop import peak_flops
from managertower.model import layer_norm
from managertower.model.experts import TINY_TOKENIZER
from managertower.tasks.pretrain import PretrainTask
BATCH, DEVICE, PEAK = 32, torch.device("cuda", 0), peak_flops("bf16")[0]
def result(key, value): print(f"RESULT {key}: {value}", flush=True)
if not torch.cuda.is_available():
    sys.exit(f"error: torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}) sees no usable GPU")

def build(size, backend, state=None):  # base: random RoBERTa-base weights; the bundled vocabulary fits the captions
    task = PretrainTask(load_config(None, [f"model.size={size}", f"model.layer_norm={backend}", "model.dropout=0.0",
                                           f"model.tokenizer={TINY_TOKENIZER}"]))
    if state is not None:
        task.load_state_dict(state)
    return task.to(DEVICE)

def make_batch(task):
    rng, size = random.Random(0), task.cfg.model.image_size
    examples = [{"text": captions_for(random_scene(rng), rng)[0], "image_id": i, "key": str(i)} for i in range(BATCH)]
    batch = PretrainCollator(task.tokenizer, task.cfg.model.max_text_len, seed=0)(examples)
    batch["pixel_values"] = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    return {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}

@torch.no_grad()
def cls_feats(task, batch):
    task.eval()
    pixels = batch["pixel_values"].to(task.dtype)
    return task.model(batch["input_ids"], batch["attention_mask"], pixels).cls_feats.float()

def check(size, backend, state, batch, reference, flops):
    """(relative error against the fp32 tower, finite losses) of a bf16 tower; 3 forward + backward + AdamW steps."""
    task = build(size, backend, state).bfloat16()
    error = float((cls_feats(task, batch) - reference).norm() / reference.norm())
    task.train()
    torch.manual_seed(0)  # the same manager noise for every backend
    optimizer, losses = torch.optim.AdamW(task.parameters(), lr=1e-5, fused=True), []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = task(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        losses.append(float(loss.detach()))
    mfu = f", MFU {BATCH * flops / seconds / PEAK:.1%}" if PEAK and flops else ""
    result(f"{size} {backend}", f"cls_feats vs fp32 {error:.1e}; losses {' '.join(f'{x:.3f}' for x in losses)}; "
           f"{seconds * 1e3:.0f} ms/step, {BATCH / seconds:.0f} samples/s{mfu}; "
           f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    del task, optimizer
    torch.cuda.empty_cache()
    return error, all(math.isfinite(x) for x in losses)

failures, towers = [], []
for size in ("tiny", "base"):
    fp32 = build(size, "torch")
    state, batch = {k: v.detach().cpu().clone() for k, v in fp32.state_dict().items()}, make_batch(fp32)
    reference, flops = cls_feats(fp32, batch), fp32.train_flops_per_sample()
    del fp32
    error, finite = check(size, "torch", state, batch, reference, flops)
    failures += [] if finite else [f"{size} torch: a loss is not finite"]
    towers.append((size, state, batch, reference, flops, error))

status_file, deadline = Path(sys.argv[1]), time.time() + 90
while not status_file.exists() and time.time() < deadline:
    time.sleep(2)
status = status_file.read_text().strip() if status_file.exists() else "unfinished after 90 s more"
importlib.invalidate_caches()
if status != "0":
    result("apex", f"not built ({status}): torch's LayerNorm only")
elif not layer_norm.apex_available():
    failures.append(f"Apex built but unusable: {layer_norm._apex()[1]}")
else:
    for size, state, batch, reference, flops, torch_error in towers:
        error, finite = check(size, "apex", state, batch, reference, flops)
        if not finite or error > 1.5 * torch_error + 1e-3:
            failures.append(f"{size} apex: error {error:.1e} against torch's {torch_error:.1e}, finite losses {finite}")
result("model.layer_norm=auto", layer_norm.resolve_backend("auto"))
if failures:
    sys.exit("error: " + "; ".join(failures))
EOF

cat > "$WORK/py/run_metrics.py" <<'EOF'
"""Stages 3 and 5: a pre-training run's figures from RUN/metrics.jsonl (medians of the logged windows: the loop
times steps only, from the second on) and RUN/summary.json."""
import json, math, statistics, sys
from pathlib import Path
def result(key, value): print(f"RESULT {key}: {value}", flush=True)
run = Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
train = [r for r in rows if r.get("samples_per_s") is not None]
def median(key):
    values = [r[key] for r in train if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")
result("loss at steps " + " ".join(str(r["step"]) for r in train), " ".join(f"{r['loss']:.3f}" for r in train))
mfu = median("mfu")
result("median of the windows", f"{median('samples_per_s'):.1f} samples/s, {median('tokens_per_s'):.0f} "
       f"tokens/s, MFU {f'{mfu:.1%}' if math.isfinite(mfu) else 'none (no peak known for this GPU)'}")
for r in rows:
    if any(k.startswith("eval_") for k in r):
        result(f"eval at step {r['step']}", {k[5:]: round(v, 4) for k, v in r.items() if k.startswith("eval_")})
if (run / "summary.json").exists():
    summary = json.loads((run / "summary.json").read_text())
    result("summary", {k: summary.get(k) for k in ("steps", "samples_seen", "wall_s", "preempted")})
if not train or not all(math.isfinite(r["loss"]) for r in train):
    sys.exit("error: no logged training step, or a loss that is not finite")
EOF

cat > "$WORK/py/export_check.py" <<'EOF'
"""Stage 4: the exported file holds fp32 weights: float32 tensors holding the fp32 master weights, not the bf16
module copy's values stored as fp32 (then every value would be exactly representable in bf16)."""
import sys
import torch
def result(key, value): print(f"RESULT {key}: {value}", flush=True)
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["state_dict"]
floats = [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
dtypes, total = sorted({str(v.dtype).replace("torch.", "") for v in floats}), sum(v.numel() for v in floats)
in_bf16 = sum(int((v.float() == v.float().bfloat16().float()).sum()) for v in floats) / total
result("exported", f"{len(floats)} float tensors, {total / 1e6:.1f} M values, dtypes {dtypes}")
result("values exactly representable in bf16", f"{in_bf16:.1%} (fp32 weights: at most the never-updated share, "
       "e.g. embeddings of tokens the captions lack; the bf16 copy: 100%)")
problems = [f"dtypes {dtypes}, not float32"] if dtypes != ["float32"] else []
problems += [f"{in_bf16:.0%} of the values are bf16 values: the export wrote the bf16 module copy, not the fp32 "
             "master weights"] if in_bf16 > 0.5 else []
if problems:
    sys.exit("error: " + "; ".join(problems))
EOF

# --- install -----------------------------------------------------------------------------------------------------
BASE_PY=""
for candidate in "${PYTHON:-}" python3 python "$ROOT/.venv/bin/python"; do
  if [ -n "$candidate" ] && command -v "$candidate" > /dev/null && "$candidate" -c "import torch" 2> /dev/null; then
    BASE_PY=$(command -v "$candidate"); break
  fi
done
[ -n "$BASE_PY" ] || { row install FAIL "no python with torch (set PYTHON=...)"; cat "$SUMMARY"; exit 1; }
PY=$BASE_PY  # pip installs into it when it is a venv, else into a venv on top that sees its packages
"$BASE_PY" -c "import sys; sys.exit(sys.prefix == sys.base_prefix)" || PY=$WORK/venv/bin/python
export BASE_PY PY
install() {
  [ -x "$PY" ] || "$BASE_PY" -m venv --system-site-packages "$WORK/venv" || return 1
  echo "python: $PY (torch $("$PY" -c 'import torch; print(torch.__version__)'))"
  local missing  # the carried wheels whose distribution is not installed, or older
  missing=$("$PY" -c 'import sys, re, pathlib, importlib.metadata as m
number = lambda version: [int(part) for part in re.findall(r"\d+", version.split("+")[0])]
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name, carried = wheel.name.split("-")[:2]
    try: older = number(m.version(name)) < number(carried)
    except m.PackageNotFoundError: older = True
    print(f"{name}=={carried}" if older else "", end=" ")' "$CARRY/whl")
  if [ -n "${missing// /}" ]; then
    echo "RESULT from $CARRY/whl:$(echo " "$missing)"
    "$PY" -m pip install -q --no-index --no-deps --find-links "$CARRY/whl" $missing || return 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" || return 1
  "$PY" -c "import deepspeed, webdataset, open_clip, transformers, managertower; print('imports ok')"
}
export -f install
stage install 150 30 install
[ -x "$PY" ] || PY=$BASE_PY
INSPECT=$(dirname "$PY")/mt-inspect
[ -x "$INSPECT" ] || INSPECT="$PY -m doors.inspect"
HAVE_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2> /dev/null || echo 0)
HAVE_DALI=0; "$PY" -c "import nvidia.dali" 2> /dev/null && HAVE_DALI=1
export INSPECT
{ echo "python $PY, base $BASE_PY, carry $CARRY, CUDA $HAVE_CUDA, DALI $HAVE_DALI"; uname -a; nproc; free -g
  nvidia-smi 2>&1; command -v nvcc && nvcc --version | tail -1; "$PY" -m pip list 2> /dev/null; } > "$OUT/env.txt" 2>&1

# --- background JIT builds: Apex's LayerNorm extension, DeepSpeed's FusedAdam (train.optimizer=auto on GPUs) ------
NVCC=""
for cuda in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc || echo /none/bin/nvcc)")")"; do
  [ -x "$cuda/bin/nvcc" ] && { export CUDA_HOME=$cuda PATH=$cuda/bin:$PATH; NVCC=$cuda/bin/nvcc; break; }
done
if [ -n "$NVCC" ] && [ ! -f "$CUDA_HOME/include/cusparse.h" ]; then  # torch's headers include it: pip's CUDA wheels'
  headers=$("$PY" -c "import nvidia, pathlib; print(':'.join(sorted({str(p.parent) for root in nvidia.__path__
                      for p in pathlib.Path(root).glob('*/include/cusparse.h')})))" 2> /dev/null)
  [ -n "$headers" ] && export CPATH=$headers${CPATH:+:$CPATH}
fi
background() {  # background STATUS_FILE LOG COMMAND...: COMMAND in its own process group; its exit code to STATUS_FILE
  setsid bash -c 'status=$1 log=$2; shift 2; "$@" > "$log" 2>&1; echo $? > "$status.tmp"; mv "$status.tmp" "$status"' \
    _ "$@" > /dev/null 2>&1 &
}
if (( ! HAVE_CUDA )); then
  echo "no CUDA device" | tee "$APEX_STATUS" > "$FUSED_STATUS"
else
  if [ -d "$CARRY/apex_min" ] && [ -n "$NVCC" ]; then  # with the flags of Apex's setup.py
    background "$APEX_STATUS" "$WORK/logs/apex_build.log" "$PY" -c "import sys
from torch.utils.cpp_extension import load
load(name='fused_layer_norm_cuda', sources=[sys.argv[1] + '/csrc/layer_norm_cuda.cpp', sys.argv[1] +
     '/csrc/layer_norm_cuda_kernel.cu'], extra_include_paths=[sys.argv[1] + '/csrc'], extra_cflags=['-O3'],
     extra_cuda_cflags=['-maxrregcount=50', '-O3', '--use_fast_math'], build_directory=sys.argv[2], verbose=True)" \
      "$CARRY/apex_min" "$WORK/apex_build"
    APEX_PID=$!
  else
    echo "no $CARRY/apex_min or no nvcc" > "$APEX_STATUS"
  fi
  background "$FUSED_STATUS" "$WORK/logs/fused_adam_build.log" "$PY" -c \
    "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()"
  FUSED_PID=$!
fi

# --- stages ------------------------------------------------------------------------------------------------------
device() {
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv,noheader \
      | sed 's/^/RESULT nvidia-smi: /'
  else echo "RESULT nvidia-smi: not found"; fi
  "$PY" "$WORK/py/device.py"
}
model() {  # the tower's size and forward FLOPs at the training setting, then the bf16 steps
  $INSPECT --size base --image-size 288 --text-len 50 --manager aaue_fused | sed 's/^/RESULT mt-inspect: /'
  PYTHONPATH=$CARRY/apex_min:$WORK/apex_build${PYTHONPATH:+:$PYTHONPATH} "$PY" "$WORK/py/model_bf16.py" "$APEX_STATUS"
}
data() {  # 2000 pre-training images; an unfinished earlier try is started over
  rm -rf "$WORK/raw" "$WORK/shards"
  "$PY" -m dataprep synthetic --out "$WORK/raw" --size 2000 --shard "$WORK/shards" --workers 8 \
    && touch "$WORK/shards/done"
}
pretrain() {  # pretrain RUN_DIR OVERRIDES...: the base recipe on the synthetic COCO shards, then its figures
  local run=$1 rc; shift
  rm -rf "$run"
  PYTHONPATH=$APEX_PATH${PYTHONPATH:+:$PYTHONPATH} "$PY" -m pretrain --config "$ROOT/pretrain/configs/base.yaml" \
    model.text_expert=null model.vision_checkpoint=null "model.tokenizer=$TOKENIZER" \
    "data.train_shards=[$WORK/shards/coco/train-*.tar]" "data.val_shards=[$WORK/shards/coco/test-*.tar]" \
    "data.weights=[]" "data.backend=$BACKEND" data.num_threads=8 train.device=cuda "train.optimizer=$OPTIMIZER" \
    train.global_batch=64 train.micro_batch=32 train.eval_batches=2 "run.dir=$run" run.progress=false "$@"
  rc=$?
  if [ -f "$run/metrics.jsonl" ]; then "$PY" "$WORK/py/run_metrics.py" "$run" || (( rc )) || rc=1; fi
  return $rc
}
export_check() {
  "$PY" -m pretrain export "$WORK/pretrain" --out "$WORK/export/model_fp32.pt" \
    && "$PY" "$WORK/py/export_check.py" "$WORK/export/model_fp32.pt"
}
loader() {  # its table's lines into the summary
  "$PY" "$ROOT/bench/loader.py" --device cuda --images 512 --threads 8 --batch 32 --epochs 2 --dir "$WORK/loader" 2>&1 \
    | sed -E 's/^(ours|open_clip|DALI)/RESULT \1/'
  return "${PIPESTATUS[0]}"
}
export -f device model data pretrain export_check loader

wanted 1 && stage 1-device 60 15 device
wanted 2 && stage 2-model 200 60 model
OPTIMIZER=torch_adamw BACKEND=webdataset APEX_PATH=""
if wanted 3 || wanted 5; then
  (( HAVE_DALI )) && BACKEND=dali
  for _ in $(seq 30); do [ -f "$FUSED_STATUS" ] && break; sleep 2; done  # FusedAdam, or torch's AdamW
  [ "$(cat "$FUSED_STATUS" 2> /dev/null)" = 0 ] && OPTIMIZER=auto
  APEX=off; [ "$(cat "$APEX_STATUS" 2> /dev/null)" = 0 ] && APEX=on APEX_PATH=$CARRY/apex_min:$WORK/apex_build
  echo "  (runs: data.backend=$BACKEND, train.optimizer=$OPTIMIZER, Apex LayerNorm $APEX)" >> "$SUMMARY"
  [ -f "$WORK/shards/done" ] || stage data 60 10 data
fi
export OPTIMIZER BACKEND APEX_PATH
if wanted 3; then
  stage 3-pretrain 200 90 pretrain "$WORK/pretrain" train.steps=40 train.log_every=10 train.eval_every=0
  for f in metrics.jsonl curves.png manager_weights.png; do cp "$WORK/pretrain/$f" "$OUT/pretrain_$f" 2> /dev/null; done
fi
if wanted 4; then
  if compgen -G "$WORK/pretrain/checkpoints/step-*" > /dev/null; then stage 4-export 90 30 export_check
  else skip 4-export "no checkpoint of stage 3 in $WORK/pretrain"; fi
  rm -rf "$WORK/export"
fi
if wanted 5; then
  stage 5-zero3 150 75 pretrain "$WORK/zero3" train.zero_stage=3 train.steps=8 train.log_every=4 train.eval_every=4
  cp "$WORK/zero3/metrics.jsonl" "$OUT/zero3_metrics.jsonl" 2> /dev/null
fi
if wanted 6; then
  if (( HAVE_DALI )); then stage 6-loader 100 40 loader
  else skip 6-loader "nvidia.dali does not import (too large to carry: nvidia-dali-cuda120 or 130)"; fi
fi

for pid in ${APEX_PID:-} ${FUSED_PID:-}; do  # our own background builds, when still running
  kill -0 "$pid" 2> /dev/null && kill -- -"$pid" 2> /dev/null && say "stopped the background build $pid"
done
for log in apex_build fused_adam_build; do
  [ -f "$WORK/logs/$log.log" ] && { echo "----- $log"; tail -c 20000 "$WORK/logs/$log.log"; } >> "$OUT/smoke.log"
done
printf '\nbuilds: apex %s, fused_adam %s\ntotal %s s; stage logs in %s\n' "$(cat "$APEX_STATUS" 2> /dev/null)" \
  "$(cat "$FUSED_STATUS" 2> /dev/null)" "$(( $(date +%s) - START ))" "$WORK/logs" >> "$SUMMARY"
cat "$SUMMARY"
(( FAILED == 0 ))
