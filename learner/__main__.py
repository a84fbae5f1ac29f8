"""`python -m learner [--once] …` is `sdloop learn [--once] …`: how the daemon starts a round."""

import sys

from serving.commands import main

sys.exit(main(["learn", *sys.argv[1:]]))
