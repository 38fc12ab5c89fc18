"""How much a shapes run's image codes say beyond what the scene shows: per grid cell's content (the shape drawn there,
or none) and the code's place within the cell, the number of distinct codes and their entropy over the train token
shards. A tokenizer whose codes are a function of the cell's content scores 1 code and 0 nats; everything above that
is variation the LM must learn to predict and no scorer rewards.

    python benchmarks/code_entropy.py --config=configs/shapes.py --workdir=RUN [--documents=4000]

RUN must hold `cm3jax tokenize`'s shards of a `shapes` run whose code grid is a multiple of the 3x3 scene grid.
Prints a table (the commonest contents) and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cm3jax import vocab as vocab_lib  # noqa: E402
from cm3jax.config import load_recipe  # noqa: E402
from cm3jax.data.documents import decode_document_record  # noqa: E402
from cm3jax.data.embedded.shapes import CELLS  # noqa: E402
from cm3jax.data.shards import open_token_shards  # noqa: E402
from cm3jax.workdir import Workdir  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/shapes.py")
    p.add_argument("--workdir", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--documents", type=int, default=4000)
    return p.parse_args()


def codes_by_content(records, vocab: vocab_lib.UnifiedVocab, count: int) -> dict[tuple, collections.Counter]:
    """(content of the cell, (row, col) of the code within the cell) -> Counter of the codes found there."""
    groups: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    for index in range(min(len(records), count)):
        document, meta = decode_document_record(records[index])
        image = next(s.tokens for s in document if s.modality == vocab_lib.MODALITY_IMAGE)
        codes = vocab.image_codes(image)
        grid = int(round(len(codes) ** 0.5))
        if grid % 3:
            sys.exit(f"code_entropy: a {grid}x{grid} code grid does not split into the scenes' 3x3 cells")
        codes, per_cell = codes.reshape(grid, grid), grid // 3
        objects = meta["objects"]
        content = {cell: f"{size} {color} {kind}" for kind, color, size, cell in
                   zip(objects["kind"], objects["color"], objects["size"], objects["position"])}
        for cell_index, cell in enumerate(CELLS):
            row, col = divmod(cell_index, 3)
            for r in range(per_cell):
                for c in range(per_cell):
                    code = int(codes[row * per_cell + r, col * per_cell + c])
                    groups[(content.get(cell, "empty"), (r, c))][code] += 1
    return groups


def entropy(counter: collections.Counter) -> float:
    p = np.array(list(counter.values()), np.float64)
    p /= p.sum()
    return max(0.0, float(-(p * np.log(p)).sum()))


def main() -> None:
    args = parse_args()
    config = load_recipe(args.config)
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    records = open_token_shards(str(Workdir.of(args.workdir).tokens), args.split)
    groups = codes_by_content(records, vocab, args.documents)
    totals = {key: sum(c.values()) for key, c in groups.items()}
    weight = sum(totals.values())
    mean_entropy = sum(totals[k] * entropy(c) for k, c in groups.items()) / weight
    mean_distinct = sum(totals[k] * len(c) for k, c in groups.items()) / weight
    print("| content | place in cell | codes seen | distinct codes | entropy (nats) |\n|---|---|---|---|---|")
    for key in sorted(groups, key=lambda k: -totals[k])[:12]:
        print(f"| {key[0]} | {key[1]} | {totals[key]} | {len(groups[key])} | {entropy(groups[key]):.2f} |")
    print(f"\n{len(groups)} (content, place) groups over {min(len(records), args.documents)} documents: "
          f"{mean_distinct:.1f} distinct codes and {mean_entropy:.2f} nats per code, weighted by occurrences")
    print(json.dumps({"documents": min(len(records), args.documents), "groups": len(groups),
                      "distinct_codes_per_group": mean_distinct, "entropy_nats_per_code": mean_entropy}))


if __name__ == "__main__":
    main()
