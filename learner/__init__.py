"""The learner: turns captured feedback into LoRA adapters (issue 3).

Its input is the store's `episodes` view; its output goes to the adapter registry through the
server's admin API.
"""
