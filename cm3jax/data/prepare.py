"""`cm3jax data`: build the embedded datasets, or check a user's source, and summarise what is there."""
from __future__ import annotations

import itertools

from cm3jax.data.sources import RAW_SPLITS, open_counts, open_raw_source, read_examples
from cm3jax.errors import MissingInputError
from cm3jax.storage import is_remote, staged_dir

SAMPLE_PER_SPLIT = 256  # examples decoded per split when checking a user's source


def prepare_raw_data(raw_config, data_dir: str) -> dict:
    """Builds raw_data.dataset when it is embedded (into data_dir unless raw_data.tfds_data_dir is set); for every
    source, opens each split, decodes a sample and returns {split: {examples, sampled, skipped}}."""
    r = raw_config
    if r.dataset in ("digits", "shapes"):
        import tensorflow_datasets as tfds

        from cm3jax.data.embedded import build_embedded

        tfds.disable_progress_bar()
        build_dir = r.tfds_data_dir or data_dir
        # TFDS writes array_record files locally only: a bucket's copy is built locally and uploaded, once.
        if not (is_remote(build_dir) and _embedded_is_built(r, data_dir)):
            with staged_dir(build_dir) as local:
                build_embedded(r.dataset, local, shapes_train_size=r.shapes_train_size,
                               shapes_image_size=r.shapes_image_size, seed=r.seed)
    summary = {}
    for split in RAW_SPLITS:
        try:
            source = open_raw_source(r, split, data_dir)
        except FileNotFoundError as e:
            if split == "train":
                raise
            summary[split] = {"missing": str(e)}
            continue
        counts = open_counts(source)
        sampled = sum(1 for _ in read_examples(source, r.image_size, counts,
                                               itertools.islice(range(len(source)), SAMPLE_PER_SPLIT)))
        counts.log(f"{r.dataset}/{split} sample")
        summary[split] = {"examples": len(source), "sampled_ok": sampled, "skipped": dict(counts)}
    return summary


def _embedded_is_built(raw_config, data_dir: str) -> bool:
    try:
        open_raw_source(raw_config, "train", data_dir)
    except MissingInputError:
        return False
    return True
