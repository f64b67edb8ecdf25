#!/usr/bin/env bash
# Every GPU check and benchmark of the pretraining issue in one call, for a session that is
# lent a GPU machine (15 minutes of device time, 10 minutes per command): run it from the
# repository root, e.g. `bash bench/gpu_suite.sh` with OUT set to a folder that comes back.
# Steps are independent; each has its own time limit and its log lands in $OUT; ONLY="name
# name ..." runs only the steps so named (e.g. ONLY="env train-ac-1B train-ac-7B").
#   1. environment (GPU, torch, transformers)
#   2. the stdlib corpus, then `llamaforge pretrain` for 30 steps on CUDA in bf16 with
#      per-block compile, for each activation-checkpointing mode (metrics.jsonl: MFU, memory)
#   3. bench/train_throughput.py: 1B preset, seq 2048 x micro-batch 8, bf16, against HF
#      eager and HF compiled
#   4. bench/train_throughput.py: LLaMA-7B, 1 x 2048, selective checkpointing against HF
#      gradient checkpointing (memory and speed)
#   5. bench/finetune_throughput.py: LLaMA-7B LoRA against HF transformers + peft, bf16
#      (tokens/s, peak memory; needs ../shared/data for Meta's tokenizer and the data)
#   5b. bench/dpo_throughput.py: LLaMA-7B LoRA-DPO step against TRL's DPOTrainer + peft, bf16
#      (step dpo-7B-lora; tokens/s; needs ../shared/data for Meta's tokenizer and the data)
#   6. bench/train_throughput.py: activation checkpointing modes, the hand-written backward
#      (manual) against selective, full and none: 1B (8 x 2048) and 7B (1 x 2048), compiled
#   7. bench/generate_throughput.py: 1B bf16 single-stream decoding (compiled static cache,
#      int8, speculative) against HF generate
#   8. packed rows without a dense mask (flex_attention): tests/test_packed_attention.py on
#      CUDA (flex against the dense mask: logits, gradients, GQA, the manual backward), then
#      bench/packed_attention.py, 1B GQA bf16 8 x 2048 packed finetuning steps, dense mask
#      against document ids, eager and compiled (needs ../shared/data)
#   9. bench/serve_throughput.py: `llamaforge serve` on CUDA, random 1B and 7B weights in
#      bf16, 1/8/32/128 streaming clients (short prompts, 64 new tokens): tokens/s, time to
#      first token, per-token latency, and the memory-bandwidth bound (clients x the card's
#      measured copy bandwidth / the bytes of weights one decode step reads). No llama.cpp peer
#      here (its CUDA build is not on the machine). Needs Meta's tokenizer (see below) and the
#      `serve` extra: fastapi, uvicorn and pydantic are not in the GPU image, so carry their
#      wheels in .whl/ (or $SERVE_WHEELS), downloaded where pip works, from the repo root:
#        echo /.whl/ >>.git/info/exclude
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#          --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#          -d .whl fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 \
#          uvicorn==0.55.0 annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc==0.0.7 \
#          opentelemetry-api==1.45.3 typing_extensions==4.16.0 xgrammar==0.2.9
#      and name .whl in the call's carry (xgrammar: the server imports it for structured
#      output; whether its own dependencies are all in the GPU image is untested).
# ../shared/data does not travel to a lent machine: a copy of what a step needs under the
# checkout's shared/data (e.g. shared/data/tokenizer/llama/tokenizer.model) is used instead.
set -uo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
if [[ -z "${LLAMAFORGE_SHARED_DATA:-}" && ! -d ../shared/data && -d shared/data ]]; then
    export LLAMAFORGE_SHARED_DATA="$PWD/shared/data"
fi

wanted() {  # ONLY="env train-ac-1B ..." runs just those steps (the suite exceeds one lease)
    [[ -z "${ONLY:-}" || " $ONLY " == *" $1 "* ]]
}

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    wanted "$name" || return 0
    echo "== $name (limit ${limit}s)" | tee -a "$OUT/summary.txt"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log" >>"$OUT/summary.txt"
}

step env 60 "$PY" -c "
import torch, platform
print(platform.python_version(), torch.__version__, torch.cuda.get_device_name(0))
try:
    import transformers; print('transformers', transformers.__version__)
except ImportError as e: print('no transformers:', e)
"

step data 120 "$PY" -m llamaforge data prepare configs/data/stdlib.toml
for ac in none selective full manual; do
    step "pretrain-$ac" 150 "$PY" -m llamaforge pretrain configs/pretrain/tiny-cpu.toml \
        device=cuda dtype=bf16 compile=true activation_checkpointing=$ac steps=30 \
        eval_every=0 checkpoint.every=0 progress=false model.preset=110M model.dim=768 \
        model.n_layers=12 model.n_heads=12 model.multiple_of=256 micro_batch=8 \
        data.seq_len=1024 batch_tokens=32768 out="$OUT/run-$ac"
    cp "$OUT/run-$ac/metrics.jsonl" "$OUT/metrics-$ac.jsonl" 2>/dev/null
    rm -rf "$OUT/run-$ac"
done

step train-1B 420 "$PY" bench/train_throughput.py --device cuda --preset 1B --vocab-size 32000 \
    --seq-len 2048 --micro-batch 8 --rounds 2 --steps 5 \
    --variants ours-compile ours hf hf-compile --json "$OUT/train-1B.json"

step train-7B 420 "$PY" bench/train_throughput.py --device cuda --preset 7B --vocab-size 32000 \
    --seq-len 2048 --micro-batch 1 --rounds 1 --steps 5 --warmup 2 \
    --variants ours-selective-compile hf-gc --json "$OUT/train-7B.json"

step finetune-7B-lora 420 "$PY" bench/finetune_throughput.py --device cuda --dtype bf16 \
    --preset 7B --max-len 1024 --batch 4 --rounds 2 --steps 3 \
    --variants ours-lora hf-peft-lora

step dpo-7B-lora 420 "$PY" bench/dpo_throughput.py --device cuda --dtype bf16 \
    --preset 7B --max-len 1024 --batch 4 --rounds 2 --steps 2 \
    --variants ours-lora trl-lora

step train-ac-1B 420 "$PY" bench/train_throughput.py --device cuda --preset 1B --vocab-size 32000 \
    --seq-len 2048 --micro-batch 8 --rounds 1 --steps 5 --warmup 2 \
    --variants ours-manual-compile ours-selective-compile ours-full-compile ours-compile \
    --json "$OUT/train-ac-1B.json"

step train-ac-7B 420 "$PY" bench/train_throughput.py --device cuda --preset 7B --vocab-size 32000 \
    --seq-len 2048 --micro-batch 1 --rounds 1 --steps 5 --warmup 2 \
    --variants ours-manual-compile ours-selective-compile ours-manual ours-selective \
    --json "$OUT/train-ac-7B.json"

# 7. bench/generate_throughput.py: single-stream decoding, 1B preset in bf16 at batch 1:
#    generate_completions, FastGenerator compiled (static cache + CUDA graphs), int8 and
#    speculative (draft: the model's own int8 copy), against HF generate
step generate-1B 420 "$PY" bench/generate_throughput.py --device cuda --preset 1B --batch 1 \
    --prompt-len 32 --new-tokens 256 --repeats 3 \
    --variants ours-compile ours-int8 ours-spec ours hf

# 8. packed finetuning rows: document-masked attention by flex_attention against the dense
#    (rows, 1, S, S) mask — correctness on the CUDA kernels, then speed (step, tokens/s)
step packed-test 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_packed_attention.py

step packed-1B 420 "$PY" bench/packed_attention.py --device cuda --dtype bf16 --preset 1B \
    --n-kv-heads 4 --max-len 2048 --rows 8 --rounds 2 --steps 3 \
    --variants dense documents dense-eval flex-eval

step packed-1B-compile 420 "$PY" bench/packed_attention.py --device cuda --dtype bf16 \
    --preset 1B --n-kv-heads 4 --max-len 2048 --rows 8 --rounds 2 --steps 3 \
    --variants dense-compile documents-compile dense-eval-compile flex-eval-compile

# 9. serving on CUDA: our server alone, bf16 random weights, 128 slots of 256 positions (7B:
#    16 GiB of KV beside 13.5 GB of weights); the warm-up runs 128 clients so that every batch
#    size is met before measuring. The tables (and the bound) are at the end of each log.
serve_deps() {  # fastapi, uvicorn and pydantic from carried wheels when the image lacks them
    "$PY" -c "import fastapi, uvicorn, pydantic" 2>/dev/null && return 0
    local wheels="${SERVE_WHEELS:-.whl}"
    if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
        echo "== serve-*: no fastapi/uvicorn here and no wheels in $wheels: skipped" |
            tee -a "$OUT/summary.txt"
        return 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/serve-site "$wheels"/*.whl ||
        { echo "== serve-*: the wheels in $wheels did not install: skipped" |
            tee -a "$OUT/summary.txt"; return 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/serve-site"
}

if { wanted serve-1B || wanted serve-7B; } && serve_deps; then
    for size in 1B 7B; do
        limit=300
        [[ $size == 7B ]] && limit=540
        step "serve-$size" $limit "$PY" bench/serve_throughput.py --preset $size --device cuda \
            --dtype bfloat16 --rows llamaforge --workloads short --clients 1 8 32 128 \
            --seconds 15 --warmup 15 --ctx 256 --json "$OUT/serve-$size.json"
    done
fi
