#!/usr/bin/env bash
# One prepared run for a lent GPU machine (its python3 already holds torch, pytest, tqdm, safetensors):
# the CUDA parity tests, a CUDA training smoke run, 30 steps of the awd-ptb GPU recipe (on a
# synthetic corpus: the shared corpora do not travel), and the CUDA speed table.
# Usage there: bash benchmarks/gpu_check.sh [--bench]
set -x
export PYTHONPATH=src PYTHONUNBUFFERED=1
timeout 100 python3 -m pytest -q -p no:cacheprovider -x "tests/test_layers_parity.py::test_layer_matches_torch_nn[cuda-reference-dtype0-rnn_tanh-1-True-False-False]" 2>&1 | grep -E "^E " | head -20
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -4
python3 - <<'PY'
import random
random.seed(0)
w = "the cat sat on a mat dog ran to park big small red blue house tree".split()
open("/tmp/c.txt", "w").write("\n".join(" ".join(random.choice(w) for _ in range(8)) for _ in range(400)) + "\n")
PY
timeout 120 python3 -m whiteboard train /tmp/c.txt --run-dir /tmp/run --set train.device=cuda --set train.epochs=2 --set model.hidden_size=32 --set model.embedding_size=32 --quiet 2>&1 | tail -3
timeout 200 python3 -m whiteboard train /tmp/c.txt --preset awd-ptb --run-dir /tmp/awd --set train.max_steps=30 --set train.log_every=10 --quiet 2>&1 | tail -3
grep train /tmp/awd/metrics.jsonl | tail -1
if [ "${1:-}" = "--bench" ]; then timeout 300 python3 benchmarks/recurrent_speed.py --device cuda --rounds 7 --repeats 5; fi
# Data-parallel on every GPU the machine has (NCCL), where it has more than one: the same
# smoke run as above under torchrun, each process one GPU's share of the batch.
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "${GPUS:-0}" -gt 1 ]; then timeout 200 python3 -m torch.distributed.run --standalone --nproc-per-node="$GPUS" -m whiteboard train /tmp/c.txt --run-dir /tmp/ddp --set train.device=cuda --set train.epochs=2 --set train.batch_size=$((GPUS * 10)) --set model.hidden_size=32 --set model.embedding_size=32 --quiet 2>&1 | tail -3; fi
# The GPU backends (issue 21), with --bench: untraced cells against cuDNN at (a)-(e), which
# auto runs on the cuDNN backend; LSTM training with trace() on the Triton backend; the
# layer-norm LSTM (torch loop) against cuDNN's plain LSTM.
if [ "${1:-}" = "--bench" ]; then
  timeout 300 python3 benchmarks/recurrent_speed.py --device cuda --configs a b c d e --rounds 5
  timeout 200 python3 benchmarks/recurrent_speed.py --device cuda --cells lstm --configs a b c d e --trace --rounds 5
  timeout 200 python3 benchmarks/recurrent_speed.py --device cuda --cells layernorm-lstm --configs a b c d --rounds 5
fi
