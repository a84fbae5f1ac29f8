"""Serving: the OpenAI-compatible gateway over a vLLM engine, the adapter registry, and the
processes `sdloop serve` and `sdloop ingest`; it also hosts the `sdloop` command line and the
config loader, which assemble what each package registers.

Imports `store` and `feedback`, never `learner`. Modules by concern: `app` (routes, errors,
metrics middleware), `chat`, `feedback_api`, `admin`, `capture`, `protocol`, `http`, `gateway`
(the shared state), `engine`, `registry`, `merged` and `merge` (the merged alias on
engines without LoRA: base, or a version merged), `version_folder`, `control`, `server`,
`ingest_service`, `client`, `state`, `model_cache`, `config`, `cli`; `vllm_plugin` is loaded by
vLLM itself, in the engine's processes.
"""
