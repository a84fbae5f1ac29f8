"""The OpenAI-compatible HTTP layer: routes, request models, errors, API keys, what an answer
captures. Thin over the version registry and the engines below it."""
