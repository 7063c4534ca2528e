"""What the test modules (and the benchmark scripts) share.

Processes, each a `child_process.ChildProcess` (log file, readiness wait, clean stop):
`llama_server` (a real llama-server on a free port), `proxy_process` (``vcache serve`` as a
real process), `redis_server` (one Redis or a Redis Cluster). Stand-ins: `fault_upstream` (a
llama-server that misbehaves on purpose), `fake_llama_server` (a binary for the supervisor
tests). In-process: `inprocess_proxy` (the real proxy in the test's event loop). Helpers:
`vlm_client` (requests to a VLM), `store_helpers` and `store_worker` (store stress and crash
runs). Fixtures, loaded as pytest plugins by tests/conftest.py: `fixtures` (builds, models,
servers, Redis) and `llama_cpp_fixtures` (llama-cpp-python in-process).
"""
