"""The learner: turns captured feedback into LoRA adapter versions.

Its input is the store's `episodes` view; its output is a version folder
(`serving.version_folder`) handed to the server's registry. It sits above serving and imports
downwards only; `learner.cli` registers `sdloop learn` and `sdloop report`.
"""
