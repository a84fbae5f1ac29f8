"""Serving: the OpenAI-compatible gateway over vLLM engines, the version registry, and the
processes `sdloop serve` and `sdloop ingest`; it also hosts the `sdloop` command line and the
config loader, which assemble what each package registers.

Imports `store` and `feedback`, never `learner`. Rooms, each importing only those after it
(import-linter holds the order, pyproject.toml):

- `entrypoints`: the processes (`serve`, `ingest`) and serving's subcommands (`cli`);
- `gateway`: the HTTP layer (`app`, `chat`, `feedback`, `admin`, `protocol`, `http`, `errors`,
  `auth`, `capture`, `deps` — the one object the routes share);
- `versions`: which version each alias serves (`registry`) and the replicas' control topic
  (`control`);
- `engine`: the vLLM processes (`manager`, `merged`, `merge`, `probe`, and `vllm_plugin`, which
  vLLM loads into its own processes);
- this folder's modules, the shell every room and the learner use: the command host
  (`commands`), `config`, `metrics`, `state`, `client`, `model_cache`, `version_folder`,
  `process`.
"""
