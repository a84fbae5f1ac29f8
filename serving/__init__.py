"""Serving: the OpenAI-compatible gateway, the vLLM engine manager, the adapter registry.

Public surface: `load_config` / `Config`, `run_server`, `create_app` / `Gateway`,
`EngineManager`, `AdapterRegistry`.
"""
