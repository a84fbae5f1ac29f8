"""The preserved subspace on the embedded model: how much room is left for an update, per layer.

For `down_proj` (or `--module`) of every layer in `--layers`: the second moment of its inputs
over the general sample the learner preserves (`learner.subspace.general_sequences`: the shipped
anchor and near-miss pools with the model's own answers, and text it writes), eigendecomposed.
Printed per layer and energy budget (the smallest-eigenvalue directions holding at most that
share of the preserved energy are free): the null space's dimension, and the share of a taught
fact's input energy that falls in it — over the tokens of the fact's answer after its question,
for the facts of `--facts` — i.e. how much of what is to be written an update confined to the
null space can act on. A layer where that share is near 0
cannot learn under the constraint; one where the null space is large keeps little.

    python ops/bench/null_space.py                          # layers 0-29, three budgets
    python ops/bench/null_space.py --layers 2-10 --energies 1e-2,1e-3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from learner.config import LearnerConfig, parse_layers  # noqa: E402
from learner.inference import prompt_ids  # noqa: E402
from learner.subspace import (  # noqa: E402
    NullSpace,
    general_sequences,
    input_moments,
    target_modules,
)
from learner.trainer import load_student  # noqa: E402
from serving.model_cache import ensure_embedded_model  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-cache", type=Path, default=Path(".cache/models"))
    parser.add_argument("--layers", default="0-29")
    parser.add_argument("--module", default="mlp.down_proj")
    parser.add_argument("--energies", default="1e-2,1e-3,1e-4")
    parser.add_argument("--facts", type=Path, nargs="+", default=[DATA / "facts.json"])
    args = parser.parse_args()
    energies = [float(t) for t in args.energies.split(",")]

    model_dir = ensure_embedded_model(args.model_cache, progress=False)
    model, tokenizer = load_student(model_dir, LearnerConfig())
    modules = target_modules(model, parse_layers(args.layers), args.module)
    started = time.monotonic()
    general = input_moments(model, tokenizer, modules, general_sequences(model, tokenizer))
    print(f"general sample: {general.tokens} tokens, {time.monotonic() - started:.0f} s "
          "(answers generated, text written, moments summed)")
    facts = [f for p in args.facts for f in json.loads(p.read_text())["facts"]]
    per_fact = []
    for fact in facts:
        prompt = prompt_ids(tokenizer, [{"role": "user", "content": fact["ask"]}])
        answer = tokenizer(fact["correct"].split(". ", 1)[-1], add_special_tokens=False).input_ids
        per_fact.append(input_moments(model, tokenizer, modules, [prompt + answer],
                                      counted_from=[len(prompt)]))
    print(f"{len(facts)} facts; share of a fact's answer-token input energy in the null space: "
          "median [min-max] over facts\n")
    print(f"{'layer':<26}" + "".join(f"{'energy ' + format(t, 'g'):>34}" for t in energies))
    spaces = [NullSpace.of(general, t) for t in energies]
    for key in spaces[0].report:
        cells = []
        for space in spaces:
            shares = [space.share_outside(m)[key] for m in per_fact]
            cells.append(f"null {space.report[key]['null_dim']:>4}/{space.report[key]['dim']}  "
                         f"{statistics.median(shares):.3f} [{min(shares):.3f}-{max(shares):.3f}]")
        print(f"{key:<26}" + "".join(f"{c:>34}" for c in cells))


if __name__ == "__main__":
    main()
