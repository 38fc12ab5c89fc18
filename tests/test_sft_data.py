"""data/sft.py: every template's tokens read back as its fields, loss weights exactly on the answer with
sft.loss_on=target, and the task mixture's frequencies."""
import collections
import dataclasses
import re

import numpy as np
import pytest

from cm3jax import vocab as vocab_lib
from cm3jax.data import cm3
from cm3jax.data.documents import encode_document_record, image_segment, serialize_document, text_segment
from cm3jax.data.embedded.shapes import caption, questions, random_edit, random_scene, shape_box
from cm3jax.data.pipeline import PipelineOptions
from cm3jax.data.sft import (
    CAPTION_INSTRUCTION,
    EDIT_INSTRUCTION,
    GUIDED_TASKS,
    STRUCTURE_INSTRUCTION,
    TASKS,
    TEMPLATE_TEXTS,
    Record,
    RecordToTaskExample,
    SFTOptions,
    TaskExample,
    TaskTemplates,
    choose_task,
    fit_task_example,
    guidance_stream_forms,
)
from cm3jax.inference.tasks import TaskPrompter
from cm3jax.tokenizers.text import TextTokenizer

VOCAB = vocab_lib.UnifiedVocab(text_size=512, image_codebook_size=64, num_masks=8)
IMAGE_SIZE, CODES = 32, 16


def scene_record(rng):
    """A shapes record as the tokens stage writes it: caption and image ids, the source's fields in meta (edited
    image and segmentation map as image ids)."""
    scene = random_scene(rng)
    _, instruction, edited = random_edit(scene, rng)
    pairs = questions(scene, rng)

    def image_ids():
        return VOCAB.image_ids(rng.integers(0, VOCAB.image_codebook_size, CODES))

    meta = {
        "objects": {"kind": [s.kind for s in scene], "color": [s.color for s in scene],
                    "size": [s.size for s in scene], "position": [s.cell for s in scene],
                    "bbox": [(shape_box(s, IMAGE_SIZE) / IMAGE_SIZE).tolist() for s in scene]},
        "segmentation": np.asarray(image_ids(), "<i4").tobytes(),
        "edit": {"instruction": instruction, "image": np.asarray(image_ids(), "<i4").tobytes(),
                 "caption": caption(edited)},
        "vqa": {"question": [q for q, _ in pairs], "answer": [a for _, a in pairs]},
    }
    return scene, [text_segment(VOCAB.text_ids(TEXT.encode(caption(scene)))), image_segment(image_ids())], meta


def _sentences():
    rng = np.random.default_rng(0)
    out = list(TEMPLATE_TEXTS)
    for _ in range(300):
        scene = random_scene(rng)
        out += [caption(scene), random_edit(scene, rng)[1]] + [f"{q} {a}" for q, a in questions(scene, rng)]
    return out


TEXT = TextTokenizer.train(_sentences(), vocab_size=VOCAB.text_size)


def encode(text):
    return VOCAB.text_ids(TEXT.encode(text))


def decode(ids):
    return TEXT.decode(VOCAB.text_pieces(np.asarray(ids)))


def templates():
    return TaskTemplates(encode, IMAGE_SIZE)


def test_every_template_reads_back_as_its_fields():
    rng = np.random.default_rng(1)
    scene, document, meta = scene_record(rng)
    record = Record(document[0].tokens, document[1].tokens, meta)
    built = {task: templates().build(task, record, np.random.default_rng(2), image_first=False) for task in TASKS}
    text = caption(scene)

    def texts(example):
        return [decode(s.tokens) if s.modality == vocab_lib.MODALITY_TEXT else s.tokens for s in example.document]

    assert texts(built["text_to_image"])[0] == text
    np.testing.assert_array_equal(texts(built["text_to_image"])[1], record.image)
    caption_text, image = texts(built["caption"])
    assert caption_text == f"{CAPTION_INSTRUCTION} {text}"
    np.testing.assert_array_equal(image, record.image)
    target = built["caption"].targets[0]
    assert decode(built["caption"].document[0].tokens[target.start:target.end]) == text
    question_text = texts(built["vqa"])[0]
    asked = [(q, a) for q, a in zip(meta["vqa"]["question"], meta["vqa"]["answer"])
             if question_text == f"Question: {q} Answer: {a}."]
    assert len(asked) == 1
    target = built["vqa"].targets[0]
    assert decode(built["vqa"].document[0].tokens[target.start:target.end]) == f" {asked[0][1]}."
    edit = texts(built["edit"])
    assert edit[0] == EDIT_INSTRUCTION and edit[2] == meta["edit"]["instruction"]
    np.testing.assert_array_equal(edit[1], record.image)
    np.testing.assert_array_equal(edit[3], np.frombuffer(meta["edit"]["image"], "<i4"))
    structure = texts(built["structure"])
    assert structure[0] == STRUCTURE_INSTRUCTION.format(kind="segmentation") and structure[2] == text
    np.testing.assert_array_equal(structure[1], np.frombuffer(meta["segmentation"], "<i4"))
    grounded = texts(built["grounded"])[0]
    boxes = []
    for s in scene:
        ymin, xmin, ymax, xmax = (round(float(v)) for v in shape_box(s, IMAGE_SIZE))
        boxes.append(f"{s.color} {s.kind} at ({xmin}, {ymin}) -> ({xmax}, {ymax})")
    assert grounded == f"Generate high quality image of {text} with segmentations {', '.join(boxes)}"
    for task in ("text_to_image", "edit", "structure", "grounded"):
        assert not built[task].infilled  # the image asked for is last
    assert built["caption"].infilled and built["vqa"].infilled
    image_first = templates().build("vqa", record, np.random.default_rng(2), image_first=True)
    assert not image_first.infilled and image_first.document[0].modality == vocab_lib.MODALITY_IMAGE


def test_each_guidance_stream_form_is_the_prompt_the_decoder_gives_that_stream():
    """sft.condition_dropout trains the unconditional streams of guided decoding: each form's tokens before its
    target are exactly the decoder's prompt of that stream (TaskPrompter), and its target is the image asked for."""
    rng = np.random.default_rng(8)
    scene, document, meta = scene_record(rng)
    record = Record(document[0].tokens, document[1].tokens, meta)
    prompter = TaskPrompter(VOCAB, TEXT.encode, grid=4)

    def grid(ids):
        return VOCAB.image_codes(np.asarray(ids)).reshape(4, 4)

    text = caption(scene)
    streams = {
        "text_to_image": prompter.text_to_image(text).streams,
        "structure": prompter.structure_to_image(
            "segmentation", grid(np.frombuffer(meta["segmentation"], "<i4")), text).streams,
        "edit": prompter.edit(grid(record.image), meta["edit"]["instruction"]).streams,
        "grounded": prompter.grounded(text, [(f"{s.color} {s.kind}", (0, 0, 1, 1)) for s in scene]).streams,
    }
    assert set(streams) == set(GUIDED_TASKS)
    for task in GUIDED_TASKS:
        example = templates().build(task, record, np.random.default_rng(2), image_first=False)
        forms = guidance_stream_forms(example, VOCAB)
        assert len(forms) == len(streams[task]) - 1, task
        for form, stream in zip(forms, streams[task][1:]):
            tokens = serialize_document(form.document)
            target = example.document[-1].tokens
            np.testing.assert_array_equal(tokens[:-len(target) - 1], stream, err_msg=task)
            np.testing.assert_array_equal(tokens[-len(target) - 1:-1], target)
            assert not form.infilled
    for task in ("caption", "vqa"):
        assert guidance_stream_forms(templates().build(task, record, rng, image_first=False), VOCAB) == []


@pytest.mark.parametrize("cm3_on", [False, True])
def test_condition_dropout_trains_the_masked_prompt_with_the_image_after_it(cm3_on):
    """With sft.condition_dropout=0.5 about half the guided examples are a guidance stream's form: a mask token in
    the prompt, no random CM3 span, the weights on the target image and its <eos> alone; they are counted."""
    rng = np.random.default_rng(9)
    to_example = make_examples("target", cm3_on, mixture={"text_to_image": 1.0, "edit": 1.0, "caption": 1.0},
                               condition_dropout=0.5)
    dropped = guided = 0
    for index in range(200):
        _, document, meta = scene_record(rng)
        out = to_example((index, index, encode_document_record(document, meta)))
        task = TASKS[out["task"][0] - 1]
        guided += task in GUIDED_TASKS
        if not out["sft_unconditional"]:
            continue
        dropped += 1
        assert task in GUIDED_TASKS
        weighted = out["loss_weights"] > 0
        target = meta["edit"]["image"] if task == "edit" else document[1].tokens
        target = np.frombuffer(target, "<i4") if task == "edit" else target
        np.testing.assert_array_equal(out["targets"][weighted], np.append(target, vocab_lib.EOS))
        prompt = out["inputs"][:np.flatnonzero(weighted)[0]]
        assert VOCAB.mask_id(0) in prompt.tolist()
        assert vocab_lib.EOSS not in out["targets"].tolist()  # no CM3 span anywhere
    assert abs(dropped / guided - 0.5) < 0.15, (dropped, guided)


def make_examples(loss_on, cm3_on, mixture=None, seq_len=160, condition_dropout=0.0):
    options = PipelineOptions(seq_len=seq_len, global_batch_size=8, num_streams=1,
                              cm3=cm3.CM3Options(poisson_lambda=1.0, min_spans=0, max_spans=4))
    sft = SFTOptions(mixture=tuple((mixture or dict.fromkeys(TASKS, 1.0)).items()), loss_on=loss_on, cm3=cm3_on,
                     condition_dropout=condition_dropout)
    return RecordToTaskExample(VOCAB, options, sft, TEXT.model_proto, IMAGE_SIZE)


@pytest.mark.parametrize("cm3_on", [False, True])
def test_target_loss_weights_only_the_answer(cm3_on):
    """loss_on=target: weight 1 on predicting each answer token and the token that closes it (<eoss> after an
    infilled answer, <eos> after one in place), 0 everywhere else; in particular the first answer token is weighted
    and the prompt's last token is not."""
    rng = np.random.default_rng(3)
    to_example = make_examples("target", cm3_on)
    seen = collections.Counter()
    for index in range(60):
        _, document, meta = scene_record(rng)
        out = to_example((index, index, encode_document_record(document, meta)))
        task = TASKS[out["task"][0] - 1]
        seen[task] += 1
        weighted = out["loss_weights"] > 0
        assert set(np.unique(out["loss_weights"])) <= {0.0, 1.0}
        # Rebuild the example the maker drew (same seed) to know its answer tokens.
        drawn = np.random.default_rng([to_example.options.seed, index])
        choose_task(dict(to_example.sft.mixture), to_example.templates.available(Record(
            document[0].tokens, document[1].tokens, meta)), drawn)
        example = to_example.templates.build(task, Record(document[0].tokens, document[1].tokens, meta), drawn,
                                             image_first=bool(drawn.random() < to_example.options
                                                              .image_first_probability))
        (target,) = example.targets
        answer = example.document[target.segment].tokens[target.start:target.end]
        targets = out["targets"]
        if not cm3_on:
            # The weighted targets are exactly the answer and its closing token.
            closing = vocab_lib.EOSS if example.infilled else vocab_lib.EOS
            np.testing.assert_array_equal(targets[weighted], np.append(answer, closing))
            first = np.flatnonzero(weighted)[0]
            assert not weighted[first - 1]  # the token before the answer (the prompt's end) is not weighted
            if example.infilled:
                assert out["inputs"][first] == VOCAB.mask_id(0)  # predicted from the answer's <mask:0>
            elif target.start:  # image first: `image <break> Question: q Answer: a.`
                assert out["inputs"][first] == example.document[-1].tokens[target.start - 1]
            else:  # an image asked for after the prompt
                assert out["inputs"][first] == vocab_lib.BREAK
        else:
            # Random spans may move parts of the answer: the weighted tokens are its tokens, some <eoss> and <eos>.
            answer_tokens = collections.Counter(answer.tolist())
            other = collections.Counter(targets[weighted].tolist()) - answer_tokens
            assert set(other) <= {vocab_lib.EOSS, vocab_lib.EOS}
            assert sum(answer_tokens.values()) <= int(weighted.sum())
    assert set(seen) == set(TASKS)


def test_all_loss_weights_everything_but_the_masks():
    rng = np.random.default_rng(4)
    to_example = make_examples("all", True)
    for index in range(30):
        _, document, meta = scene_record(rng)
        out = to_example((index, index, encode_document_record(document, meta)))
        masks = VOCAB.is_mask(out["targets"])
        np.testing.assert_array_equal(out["loss_weights"], np.where(masks, 0.0, 1.0))


def test_mixture_frequencies():
    """Over 3,000 records every task is drawn with its weight's share, within 3 standard errors."""
    rng = np.random.default_rng(5)
    mixture = {"text_to_image": 2.0, "caption": 1.0, "vqa": 1.0, "edit": 0.5, "structure": 0.5, "grounded": 0.0}
    to_example = make_examples("all", False, mixture)
    _, document, meta = scene_record(rng)
    record = encode_document_record(document, meta)
    n = 3000
    counts = collections.Counter(TASKS[to_example((i, 0, record))["task"][0] - 1] for i in range(n))
    total = sum(mixture.values())
    for task, weight in mixture.items():
        p = weight / total
        assert abs(counts[task] / n - p) <= 3 * np.sqrt(p * (1 - p) / n) + 1e-9, (task, counts[task])


@pytest.mark.parametrize("image_first", [0.0, 1.0])
def test_sft_image_first_probability_orders_every_captioning_and_vqa_example(image_first):
    """sft.image_first_probability, not pretraining's data.image_first_probability, orders SFT's captioning and VQA:
    at 0 every answer is infilled after the image (the form eval prompts with), at 1 every answer follows it."""
    from cm3jax.config import base_config
    from cm3jax.train.sft import sft_training_config

    config = base_config()
    config.data.image_first_probability = 1.0 - image_first
    config.sft.image_first_probability = image_first
    options = PipelineOptions.from_config(sft_training_config(config), 1)
    assert options.image_first_probability == image_first
    to_example = RecordToTaskExample(VOCAB, dataclasses.replace(options, seq_len=160, num_streams=1),
                                     SFTOptions(mixture=(("caption", 1.0), ("vqa", 1.0)), loss_on="target", cm3=False),
                                     TEXT.model_proto, IMAGE_SIZE)
    rng = np.random.default_rng(8)
    closings = set()
    for index in range(20):
        _, document, meta = scene_record(rng)
        out = to_example((index, index, encode_document_record(document, meta)))
        closings.add(int(out["targets"][out["loss_weights"] > 0][-1]))
    assert closings == {vocab_lib.EOS if image_first else vocab_lib.EOSS}


@pytest.mark.parametrize("image_first", [False, True])
def test_sft_vqa_pairs_asks_several_questions_and_learns_every_answer(image_first):
    """sft.vqa_pairs=5: a VQA example asks up to 5 of the record's pairs, every pair once and none whose answer another
    states, in the document as `Question: q Answer: a.` one after another. With loss_on=target the weighted tokens
    are exactly the answers: text-first each infilled after the image as `<mask:i> answer <eoss>` in question order,
    image-first in place and the last closed by <eos>."""
    options = PipelineOptions(seq_len=200, global_batch_size=8, num_streams=1,
                              image_first_probability=float(image_first))
    to_example = RecordToTaskExample(VOCAB, options, SFTOptions(mixture=(("vqa", 1.0),), loss_on="target", cm3=False,
                                                                vqa_pairs=5), TEXT.model_proto, IMAGE_SIZE)
    rng = np.random.default_rng(9)
    counts = collections.Counter()
    for index in range(60):
        _, document, meta = scene_record(rng)
        out = to_example((index, index, encode_document_record(document, meta)))
        asked = dict(zip(meta["vqa"]["question"], meta["vqa"]["answer"]))
        text = decode(out["inputs"][VOCAB.modality(out["inputs"]) == vocab_lib.MODALITY_TEXT])
        questions_asked = [q for q in text.split("Question: ")[1:]]
        counts[len(questions_asked)] += 1
        answers = [f" {asked[q.split(' Answer:')[0]]}." for q in questions_asked]
        assert len(set(questions_asked)) == len(questions_asked)
        for q in questions_asked:  # no question states another's answer
            for other in questions_asked:
                answer = asked[other.split(" Answer:")[0]]
                assert q == other or not re.search(rf"\b{answer}\b", q.split(" Answer:")[0]), (q, other)
        weighted = out["targets"][out["loss_weights"] > 0]
        if image_first:
            assert text == "".join(f"Question: {q}" for q in questions_asked)
            assert decode(weighted[:-1]) == "".join(answers) and weighted[-1] == vocab_lib.EOS
        else:
            closes = np.flatnonzero(weighted == vocab_lib.EOSS)
            assert len(closes) == len(answers)
            assert [decode(a[:-1]) for a in np.split(weighted, closes + 1)[:-1]] == [
                decode(encode(a)) for a in answers]
            for i, first in enumerate(np.flatnonzero(np.diff(np.r_[0, out["loss_weights"]]) > 0)):
                assert out["inputs"][first] == VOCAB.mask_id(i)  # answer i follows its <mask:i>
    # Each scene's where / colour / shape questions are about one shape and state each other's answers: at most
    # one of them, with `how many` and `is there`.
    assert set(counts) == {1, 2, 3}


def test_an_example_of_several_answers_is_cut_to_whole_answers():
    """fit_task_example keeps only whole answers of a several-answer example, its text ending with the last kept one
    (no question left without its answer); with one left it cuts inside it, keeping one token."""
    image = image_segment(VOCAB.image_ids(np.arange(CODES)))
    text = text_segment(VOCAB.text_ids(np.arange(30)))  # q1 0-5, a1 5-10, q2 10-15, a2 15-20, q3 20-25, a3 25-30
    example = TaskExample("vqa", [text, image], (cm3.Span(0, 5, 10), cm3.Span(0, 15, 20), cm3.Span(0, 25, 30)))
    full = serialize_document(example.document).size
    cut = fit_task_example(example, full - 3)  # a3 would lose 3 tokens: q3 and a3 go
    assert cut.targets == (cm3.Span(0, 5, 10), cm3.Span(0, 15, 20)) and len(cut.document[0].tokens) == 20
    cut = fit_task_example(example, full - 22)  # only 8 text tokens: inside a1
    assert cut.targets == (cm3.Span(0, 5, 8),) and len(cut.document[0].tokens) == 8
    assert fit_task_example(example, full) == example


def test_a_prompt_too_long_for_seq_len_becomes_text_to_image_and_is_counted():
    rng = np.random.default_rng(6)
    to_example = make_examples("all", False, {"vqa": 1.0}, seq_len=CODES + 8)
    _, document, meta = scene_record(rng)
    out = to_example((0, 0, encode_document_record(document, meta)))
    assert out["sft_too_long"] == 1 and out["task_text_to_image"] == 1 and out["task_vqa"] == 0
    assert len(out["inputs"]) <= CODES + 8


def test_digits_vqa_asks_for_the_label_name():
    rng = np.random.default_rng(7)
    names = tuple(f"digit{i}" for i in range(10))
    record = Record(encode("a handwritten three"), VOCAB.image_ids(rng.integers(0, 64, CODES)), {"label": 3})
    built = TaskTemplates(encode, IMAGE_SIZE, names)
    assert built.available(record) == ["text_to_image", "caption", "vqa"]
    example = built.build("vqa", record, rng, image_first=True)
    assert decode(example.document[1].tokens) == "Question: what digit is this? Answer: digit3."


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan")])
def test_a_condition_dropout_outside_0_1_is_refused_naming_the_field(value):
    from cm3jax.config import base_config
    from cm3jax.config_validation import ConfigError, validate_sft_config

    config = base_config()
    config.sft.condition_dropout = value
    with pytest.raises(ConfigError, match="sft.condition_dropout"):
        validate_sft_config(config)
