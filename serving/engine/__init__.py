"""The vLLM processes: the primary engine with runtime LoRA, the compiled engines that serve an
alias without it, the merge that makes their weights, the probe of a version, and the plugin
vLLM loads into every engine it starts. Nothing here imports vLLM in the gateway process."""
