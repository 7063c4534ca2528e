"""Benchmarks, the demo and operational scripts.

Those that start servers through the test support package (bench_e2e, bench_encoder_worker,
soak, crash_proxy, body_flood) run as ``python -m scripts.NAME`` from the repository root; the
rest also run as ``python scripts/NAME.py``. gpu_check.sh is the GPU machine's one command.
The llama-server build is `vcache build-server` (vision_cache.llama.server_build).
"""
