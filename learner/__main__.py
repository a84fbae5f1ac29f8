"""`python -m learner [--once] …` is `sdloop learn [--once] …`: how the daemon starts a round."""

import sys

from serving.cli import main

sys.exit(main(["learn", *sys.argv[1:]]))
