"""`cm3jax eval`: scores a trained LM on held-out documents of the token shards, every task the data allows.

    metrics = evaluate(config, workdir)   # writes DIR/eval/<model>-<step>[-<split>][-retrieved<K>]/{metrics.json, ...}

Tasks (eval.tasks):
- reconstruction: the held-out images decoded from their codes, scored as generated images are (the ceiling the
  image tokenizer sets for every image task);
- loss: held-out loss per modality, with eval.num_retrieved documents retrieved before each (they are context only);
- text_to_image: one image per held-out caption, once per eval.guidance setting, and with eval.rerank_candidates
  the best of that many by the retriever's caption-image score (as the paper evaluates); shapes: the parsed image
  against the caption's scene (exact and per attribute); digits: the share an independent classifier reads as the
  prompted digit; every dataset: the Frechet distance to the held-out images in the retriever's embedding space
  and, with eval.inception_weights, FID (InceptionV3 pool features);
- caption: a greedy caption of each held-out image; shapes: the caption read back as a scene against the reference
  scene; digits: names the right digit; every dataset: CIDEr-D against all of the record's reference captions;
- vqa: a greedy answer to each question of the records that have them (shapes), exact match;
- edit: the record's image edited by its instruction (three-stream guidance), read as a scene against the edited
  scene's caption (shapes);
- structure: an image from the record's segmentation map and caption, read as a scene against the caption's scene
  (shapes: the map fixes the objects' cells);
- grounded: an image from the record's caption and its objects' boxes, every object parsed from it checked against
  its box (shapes: colour and kind right, IoU >= 0.5).
edit, structure and grounded are SFT tasks: a pretrained-only model meets their prompt forms zero-shot.
The examples are the first eval.num_examples documents of eval.split, the seeds fixed: the same command writes the
same metrics.json.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from cm3jax import vocab as vocab_lib
from cm3jax.data.documents import decode_document_record
from cm3jax.errors import BadInputError
from cm3jax.evaluation import scorers
from cm3jax.evaluation.frechet import frechet_distance_of_features
from cm3jax.evaluation.shapes_parser import parse_scene
from cm3jax.inference.decode import GREEDY, SamplingOptions
from cm3jax.inference.generate import Generator, contact_sheet
from cm3jax.storage import atomic_write_text, process_partial_folder, replace_folder, save_png
from cm3jax.workdir import Workdir

TASKS = ("reconstruction", "loss", "text_to_image", "caption", "vqa", "edit", "structure", "grounded")


@dataclasses.dataclass(frozen=True)
class HeldOut:
    caption: str
    codes: np.ndarray  # [grid, grid] VQ-GAN codes of the document's image
    meta: dict


def evaluate(config: ml_collections.ConfigDict, workdir: Workdir, generator: Generator | None = None,
             model: str = "lm") -> dict:
    """Scores `model` (eval.step's checkpoint, or the one `generator` holds), writes its folder under DIR/eval and
    returns the metrics."""
    e = config.eval
    if generator is None:
        generator = Generator.load(config, workdir, step=None if int(e.step) < 0 else int(e.step), model=model)
    final_dir = workdir.stage("eval") / eval_folder_name(config, generator.model, generator.step)
    examples = held_out_documents(generator, workdir, str(e.split), int(e.num_examples))
    # Written whole under another name, then named (an earlier evaluation of this checkpoint is kept aside).
    out_dir = process_partial_folder(final_dir) if jax.process_index() == 0 else None
    metrics: dict[str, Any] = {"model": generator.model, "step": generator.step, "split": str(e.split),
                               "examples": len(examples), "num_retrieved": int(e.num_retrieved)}
    predictions: list[dict] = []
    dataset = str(config.raw_data.dataset)
    for task in e.tasks:
        if task == "reconstruction":
            metrics["reconstruction"] = _reconstructions(generator, examples, dataset, predictions)
        elif task == "loss":
            metrics["loss"] = held_out_loss(config, generator)
        elif task == "text_to_image":
            for guidance in e.guidance:
                metrics.update(_text_to_image(config, generator, examples, guidance, dataset, predictions, out_dir))
        elif task == "caption":
            metrics["caption"] = _captions(generator, examples, dataset, predictions)
        elif task == "vqa":
            metrics["vqa"] = _vqa(generator, examples, predictions)
        elif task in ("edit", "structure"):
            metrics[task] = _conditioned_images(config, generator, examples, task, predictions, out_dir)
        elif task == "grounded":
            metrics[task] = _grounded(config, generator, examples, predictions, out_dir)
    if jax.process_index() == 0:
        atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1, sort_keys=True))
        atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(p, sort_keys=True) + "\n"
                                                                 for p in predictions))
        kept = replace_folder(out_dir, final_dir, keep_replaced=True)
        if kept is not None and _same_file(kept / "metrics.json", final_dir / "metrics.json"):
            kept.rmtree()  # the same evaluation again: nothing is lost
        elif kept is not None:
            print(f"eval: the earlier evaluation of {final_dir.name}, with other results, is kept in {kept}",
                  flush=True)
    return metrics


def _same_file(a: epath.Path, b: epath.Path) -> bool:
    return a.exists() and b.exists() and a.read_bytes() == b.read_bytes()


def eval_folder_name(config: ml_collections.ConfigDict, model: str, step: int) -> str:
    """<model>-<step>, then the split and the retrieved documents where they are not the defaults, so evaluations of
    one checkpoint with other data or K keep their own files."""
    from cm3jax.config import default

    e = config.eval
    name = f"{model}-{step}"
    if str(e.split) != default("eval.split"):
        name += f"-{e.split}"
    if int(e.num_retrieved):
        name += f"-retrieved{int(e.num_retrieved)}"
    return name


def evaluator_for_training(config: ml_collections.ConfigDict, workdir: Workdir,
                           model: str = "lm") -> Callable[[Any, int, Any], dict[str, float]]:
    """(params, step, mesh) -> `evaluate`'s numeric metrics as flat "task/metric" scalars, for the training loop of
    `model` (lm or sft); each call also writes DIR/eval/<model>-<step>/. The tokenizers load and the decoders
    compile once."""
    generator: Generator | None = None

    def run(params: Any, step: int, mesh: Any) -> dict[str, float]:
        nonlocal generator
        generator = (Generator.for_params(config, workdir, mesh, params, step, model) if generator is None
                     else generator.with_params(params, step))
        return flat_scalars(evaluate(config, workdir, generator))

    return run


def flat_scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of nested metrics as {"task/metric": value} (names and other text left out)."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flat_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            flat[f"{prefix}{key}"] = float(value)
    return flat


def held_out_documents(generator: Generator, workdir: Workdir, split: str, count: int,
                       start: int = 0) -> list[HeldOut]:
    """`count` caption-image documents of the split's token shards, from its `start`-th one on (eval scores the first
    ones; a sweep of decoding settings chooses on later ones)."""
    from cm3jax.data.shards import open_token_shards

    records = open_token_shards(str(workdir.tokens), split)
    vocab = generator.vocab
    found = []
    for index in range(len(records)):
        document, meta = decode_document_record(records[index])
        texts = [s.tokens for s in document if s.modality == vocab_lib.MODALITY_TEXT]
        images = [s.tokens for s in document if s.modality == vocab_lib.MODALITY_IMAGE]
        if texts and images:
            codes = vocab.image_codes(images[0]).reshape(generator.grid, generator.grid)
            found.append(HeldOut(generator.decode_text(texts[0]), codes, meta))
        if len(found) == start + count:
            break
    return found[start:]


def held_out_loss(config: ml_collections.ConfigDict, generator: Generator) -> dict[str, float]:
    """Mean loss per modality over eval.loss_batches batches of held-out documents (eval.num_retrieved retrieved
    documents before each, no loss on them)."""
    import flax.linen as nn

    from cm3jax.train.lm import held_out_batches, means_from_sums
    from cm3jax.train.loop import summed_over

    config = ml_collections.ConfigDict(config.to_dict())
    config.data.update(eval_split=config.eval.split, eval_num_retrieved=config.eval.num_retrieved)
    sums = _loss_sums_step(generator.decoder_config, float(config.train.z_loss_weight))
    with jax.set_mesh(generator.mesh), nn.logical_axis_rules(generator.rules):
        totals = summed_over(held_out_batches(config, generator.mesh, int(config.eval.loss_batches))(),
                             lambda batch: sums(generator.params, batch), generator.mesh,
                             int(config.train.global_batch_size))
    return {k: float(v) for k, v in jax.device_get(means_from_sums(totals)).items()}


@functools.cache
def _loss_sums_step(decoder_config, z_loss_weight: float) -> Callable:
    """(params, batch) -> the loss sums of one batch, compiled once per model (evaluations during training reuse it)."""
    from cm3jax.models.transformer import CM3LeonDecoder
    from cm3jax.train.lm import forward, loss_sums

    model = CM3LeonDecoder(decoder_config)
    return jax.jit(lambda params, batch: loss_sums(forward(model, params, batch), batch, z_loss_weight)[1])


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield start // size, items[start:start + size]


def _mean_scores(rows: list[dict]) -> dict[str, float]:
    totals: dict[str, float] = collections.defaultdict(float)
    for row in rows:
        for key, value in row.items():
            totals[key] += value
    return {key: value / len(rows) for key, value in totals.items()} if rows else {}


def _image_scorer(dataset: str) -> Callable[[np.ndarray, HeldOut], tuple[dict, str]]:
    """(generated image, example) -> (scores, what was read from the image: shapes' objects as (kind, colour,
    size, cell), a digit) for the datasets that can be read."""
    if dataset == "shapes":
        def score_scene(image, example):
            parsed = parse_scene(image)
            return (scorers.scene_scores(parsed, scorers.parse_caption(example.caption)),
                    [dataclasses.astuple(shape) for shape in parsed])
        return score_scene
    if dataset == "digits":
        from cm3jax.evaluation.digits import digit_classifier, ink_8x8

        classifier = digit_classifier()

        def score_digit(image, example):
            read = int(classifier.predict(ink_8x8(image[None]))[0])
            return {"digit": float(read == example.meta["label"])}, str(read)
        return score_digit
    return lambda image, example: ({}, "")


def _reconstructions(generator: Generator, examples: list[HeldOut], dataset: str, predictions: list[dict]) -> dict:
    """The held-out images as the VQ-GAN gives them back from their codes, scored as generated images are: the
    ceiling of every task that generates images (a scene the tokenizer loses cannot be generated exactly)."""
    score = _image_scorer(dataset)
    rows = []
    for example, image in zip(examples, generator.decode_codes(np.stack([x.codes for x in examples]))):
        scores, read = score(image, example)
        rows.append(scores)
        predictions.append({"task": "reconstruction", "index": example.meta.get("index"), "generated": read,
                            "reference": example.caption, "scores": scores})
    return _mean_scores(rows)


def _text_to_image(config, generator: Generator, examples: list[HeldOut], guidance: str, dataset: str,
                   predictions: list[dict], out_dir) -> dict[str, dict]:
    """{setting: metrics} for one guidance setting: the first image drawn per caption and, with
    eval.rerank_candidates > 1, the best of that many by the retriever's caption-image score (from the same draws)."""
    e = config.eval
    options = dataclasses.replace(SamplingOptions.from_config(config.generate), guidance=guidance)
    prompt_for = _text_to_image_prompter(generator, int(e.num_retrieved))
    draws = max(1, int(e.rerank_candidates))
    first, best, retrieved = [], [], []
    for batch_index, batch in _batches(examples, max(1, int(e.batch_size) // draws)):
        built = [prompt_for(x.caption) for x in batch]
        retrieved += [kept for _, kept in built]
        prompts = [prompt for prompt, _ in built for _ in range(draws)]
        out, _ = generator.run_batch(prompts, options, int(e.seed) + batch_index)
        codes = generator.vocab.image_codes(out).reshape(len(batch), draws, generator.grid, generator.grid)
        first += list(codes[:, 0])
        if draws > 1:
            best += [candidates[int(np.argmax(generator.caption_image_scores(x.caption, candidates)))]
                     for x, candidates in zip(batch, codes)]
    settings = {guidance: first} | ({f"{guidance}/best_of_{draws}": best} if draws > 1 else {})
    score = _image_scorer(dataset)
    results = {}
    for setting, chosen in settings.items():
        images = generator.decode_codes(np.stack(chosen))
        rows = []
        for example, image in zip(examples, images):
            scores, read = score(image, example)
            rows.append(scores)
            predictions.append({"task": "text_to_image", "guidance": setting, "index": example.meta.get("index"),
                                "prompt": example.caption, "generated": read, "reference": example.caption,
                                "scores": scores})
        metrics = _mean_scores(rows)
        fd = _retriever_frechet_distance(generator, np.stack(chosen), [x.codes for x in examples])
        if fd is not None:
            metrics["fd_retriever"] = fd
        if int(e.num_retrieved):
            metrics["retrieved_documents"] = float(np.mean(retrieved))
        if str(e.inception_weights) and len(images) > 1:
            metrics["fid"] = _inception_frechet_distance(str(e.inception_weights), images,
                                                         generator.decode_codes(np.stack([x.codes for x in examples])))
        if int(e.sheet_images) and jax.process_index() == 0:
            sheet = contact_sheet(images[:int(e.sheet_images)], columns=8)
            save_png(out_dir / f"text_to_image-{setting.replace('/', '-')}.png", sheet)
        results[f"text_to_image/{setting}"] = metrics
    return results


def score_image_task(config: ml_collections.ConfigDict, generator: Generator, examples: list[HeldOut],
                     task: str) -> dict:
    """One image task's metrics on `examples` at config.generate's settings (text_to_image: for every eval.guidance),
    writing nothing: what a sweep of decoding settings compares."""
    config = config.copy_and_resolve_references()
    config.eval.sheet_images = 0
    if task == "text_to_image":
        return {name: metrics for guidance in config.eval.guidance
                for name, metrics in _text_to_image(config, generator, examples, guidance,
                                                    str(config.raw_data.dataset), [], None).items()}
    if task in ("edit", "structure"):
        return _conditioned_images(config, generator, examples, task, [], None)
    if task == "grounded":
        return _grounded(config, generator, examples, [], None)
    raise ValueError(f"{task!r} is not an image task (text_to_image, edit, structure, grounded)")


def _conditioned_images(config, generator: Generator, examples: list[HeldOut], task: str, predictions: list[dict],
                        out_dir) -> dict:
    """Editing (the record's edit instruction on its image) or structure-to-image (its segmentation map and caption),
    for the records that have them, scored as shapes scenes against the scene the result should show."""
    from cm3jax.data.record_meta import meta_image_ids

    def condition_codes(ids: bytes) -> np.ndarray:
        return generator.vocab.image_codes(meta_image_ids(ids)).reshape(generator.grid, generator.grid)

    if task == "edit":
        items = [(x, x.meta["edit"]["instruction"], x.meta["edit"]["caption"]) for x in examples if "edit" in x.meta]
        guidance = "edit"
        build = (lambda x, text: generator.prompter.edit(x.codes, text))
    else:
        items = [(x, x.caption, x.caption) for x in examples if "segmentation" in x.meta]
        guidance = "cfg"
        build = (lambda x, text: generator.prompter.structure_to_image(
            "segmentation", condition_codes(x.meta["segmentation"]), text))
    items = [item for item in items if scorers.parse_caption(item[2]) is not None]  # scenes the scorer can read
    if not items:
        return {"examples": 0}
    options = dataclasses.replace(SamplingOptions.from_config(config.generate), guidance=guidance)
    chosen = []
    for batch_index, batch in _batches(items, int(config.eval.batch_size)):
        out, _ = generator.run_batch([build(x, text) for x, text, _ in batch], options,
                                     int(config.eval.seed) + batch_index)
        chosen += list(generator.vocab.image_codes(out).reshape(len(batch), generator.grid, generator.grid))
    images = generator.decode_codes(np.stack(chosen))
    rows = []
    for (example, text, target), image in zip(items, images):
        parsed = parse_scene(image)
        scores = scorers.scene_scores(parsed, scorers.parse_caption(target))
        rows.append(scores)
        predictions.append({"task": task, "index": example.meta.get("index"), "prompt": text,
                            "generated": [dataclasses.astuple(shape) for shape in parsed], "reference": target,
                            "scores": scores})
    if int(config.eval.sheet_images) and jax.process_index() == 0:
        save_png(out_dir / f"{task}.png", contact_sheet(images[:int(config.eval.sheet_images)], columns=8))
    return {"examples": len(items), **_mean_scores(rows)}


def _grounded(config, generator: Generator, examples: list[HeldOut], predictions: list[dict], out_dir) -> dict:
    """An image from each record's caption and its objects' boxes (the records that have boxes), every parsed object
    checked against its box (`objects`: the share placed right; `all`: every one placed and nothing else drawn)."""
    from cm3jax.data.sft import record_boxes
    from cm3jax.evaluation.shapes_parser import parse_objects

    items = [x for x in examples if x.meta.get("objects", {}).get("bbox")]
    if not items:
        return {"examples": 0}
    options = dataclasses.replace(SamplingOptions.from_config(config.generate), guidance="cfg")
    chosen = []
    for batch_index, batch in _batches(items, int(config.eval.batch_size)):
        prompts = [generator.prompter.grounded(x.caption, record_boxes(x.meta, generator.image_size)) for x in batch]
        out, _ = generator.run_batch(prompts, options, int(config.eval.seed) + batch_index)
        chosen += list(generator.vocab.image_codes(out).reshape(len(batch), generator.grid, generator.grid))
    images = generator.decode_codes(np.stack(chosen))
    rows = []
    for example, image in zip(items, images):
        objects = example.meta["objects"]
        requested = list(zip(objects["color"], objects["kind"], objects["bbox"]))
        parsed = parse_objects(image)
        scores = scorers.grounding_scores(parsed, requested)
        rows.append(scores)
        predictions.append({"task": "grounded", "index": example.meta.get("index"), "prompt": example.caption,
                            "boxes": [list(box) for box in objects["bbox"]],
                            "generated": [[*dataclasses.astuple(o.shape), list(o.box)] for o in parsed],
                            "scores": scores})
    if int(config.eval.sheet_images) and jax.process_index() == 0:
        save_png(out_dir / "grounded.png", contact_sheet(images[:int(config.eval.sheet_images)], columns=8))
    return {"examples": len(items), **_mean_scores(rows)}


def _text_to_image_prompter(generator: Generator, k: int) -> Callable[[str], tuple[Any, int]]:
    """caption -> (its text -> image prompt after up to k retrieved documents, how many were kept). The least
    relevant documents are dropped until prompt and image fit the model's positions, as training drops retrieved
    documents that do not fit its sequence."""
    if not k:
        return lambda caption: (generator.prompter.text_to_image(caption, None), 0)
    from cm3jax.retrieval.memory import prepend_retrieved

    memory = generator.memory()
    positions = generator.decoder_config.max_seq_len

    def prompt_for(caption: str) -> tuple[Any, int]:
        documents = list(memory.retrieve(caption, k=k))
        while True:
            context = prepend_retrieved(documents, np.array([vocab_lib.EOS], np.int32)) if documents else None
            prompt = generator.prompter.text_to_image(caption, context)
            if not documents or max(map(len, prompt.streams)) + len(prompt.schedule.forced) <= positions:
                return prompt, len(documents)
            documents.pop()

    return prompt_for


def _retriever_frechet_distance(generator: Generator, generated: np.ndarray,
                                reference: Sequence[np.ndarray]) -> float | None:
    """Frechet distance between generated and held-out images in the retriever's image space; None without a
    trained retriever (retrieval.embeddings computed elsewhere) or with fewer than two images."""
    if len(generated) < 2 or not generator.workdir.retrieval.retriever.checkpoints.is_dir():
        return None
    encoder = generator.memory().encoder
    if encoder is None:
        return None

    def embed(grids) -> np.ndarray:
        return np.asarray(encoder(generator.image_queries(grids)), np.float64)

    return frechet_distance_of_features(embed(generated), embed(reference))


def _inception_frechet_distance(weights: str, generated: np.ndarray, reference: np.ndarray) -> float:
    """FID between generated images and the held-out images as the VQ-GAN reconstructs them (what the LM can reach
    through its codes), in FID's InceptionV3 pool features."""
    from cm3jax.evaluation.inception import inception_features, load_inception

    variables = load_inception(weights)
    return frechet_distance_of_features(inception_features(variables, generated),
                                        inception_features(variables, reference))


def _text_prompts(generator: Generator, build: Callable[[int], list]) -> list:
    """Prompts for generate.max_text_tokens of text, or fewer where the longest prompt leaves less room in the
    model's positions."""
    prompts = build(int(generator.config.generate.max_text_tokens))
    room = generator.decoder_config.max_seq_len - max(len(p.streams[0]) for p in prompts)
    if room < 1:
        raise BadInputError(f"a prompt of {generator.decoder_config.max_seq_len - room} tokens leaves no room to "
                         f"answer in the model's {generator.decoder_config.max_seq_len} positions")
    return build(room) if room < len(prompts[0].schedule.forced) else prompts


def _captions(generator: Generator, examples: list[HeldOut], dataset: str, predictions: list[dict]) -> dict:
    captions = []
    for batch_index, batch in _batches(examples, int(generator.config.eval.batch_size)):
        prompts = _text_prompts(generator, lambda n, batch=batch: [
            generator.prompter.caption(x.codes, generator.caption_style, n) for x in batch])
        out, lengths = generator.run_batch(prompts, GREEDY, int(generator.config.eval.seed) + batch_index)
        captions += [generator.decode_text(row[:n]) for row, n in zip(out, lengths)]
    rows = []
    for example, text in zip(examples, captions):
        if dataset == "shapes":
            scores = scorers.scene_scores(scorers.parse_caption(text), scorers.parse_caption(example.caption))
        elif dataset == "digits":
            from cm3jax.evaluation.digits import caption_digit

            scores = {"digit": float(caption_digit(text) == example.meta["label"])}
        else:
            scores = {}
        rows.append(scores)
        predictions.append({"task": "caption", "index": example.meta.get("index"), "generated": text,
                            "reference": example.meta.get("references") or [example.caption], "scores": scores})
    metrics = _mean_scores(rows)
    if examples:
        keys = [str(i) for i in range(len(examples))]
        metrics["cider_d"], _ = scorers.cider_d(
            dict(zip(keys, captions)),
            {k: x.meta.get("references") or [x.caption] for k, x in zip(keys, examples)})
    return metrics


def _vqa(generator: Generator, examples: list[HeldOut], predictions: list[dict]) -> dict:
    items = [(x, q, a) for x in examples if "vqa" in x.meta
             for q, a in zip(x.meta["vqa"]["question"], x.meta["vqa"]["answer"])]
    answers = []
    for batch_index, batch in _batches(items, int(generator.config.eval.batch_size)):
        prompts = _text_prompts(generator, lambda n, batch=batch: [generator.prompter.vqa(x.codes, q, n)
                                                                   for x, q, _ in batch])
        out, lengths = generator.run_batch(prompts, GREEDY, int(generator.config.eval.seed) + batch_index)
        answers += [generator.decode_text(row[:n]) for row, n in zip(out, lengths)]
    by_form: dict[str, list[float]] = collections.defaultdict(list)
    for (example, question, answer), predicted in zip(items, answers):
        score = scorers.vqa_accuracy(predicted, [answer])
        by_form[" ".join(question.split()[:2])].append(score)
        predictions.append({"task": "vqa", "index": example.meta.get("index"), "prompt": question,
                            "generated": predicted, "reference": answer, "scores": {"exact": score}})
    if not items:
        return {"questions": 0}
    metrics = {"questions": len(items), "exact": float(np.mean([s for v in by_form.values() for s in v]))}
    metrics.update({f"exact/{form}": float(np.mean(v)) for form, v in sorted(by_form.items())})
    return metrics
