"""Embedded TFDS datasets and the raw sources: image modes, bad input skipped and counted."""
import io
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import PIL.Image
import pytest
from array_record.python import array_record_module

from cm3jax.config import base_config
from cm3jax.data import record_meta
from cm3jax.data.embedded import build_embedded, digits, shapes
from cm3jax.data.sources import (
    ArrayRecordExampleSource,
    ImageFolderSource,
    SkipCounts,
    TfdsSource,
    load_image,
    open_raw_source,
    read_captions,
    read_examples,
    resize_center_crop,
    to_rgb,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def encoded(image: PIL.Image.Image, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def raw_config(**overrides) -> ml_collections.ConfigDict:
    config = base_config().raw_data
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def embedded_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    build_embedded("digits", data_dir)
    build_embedded("shapes", data_dir, shapes_train_size=40)
    return data_dir


def test_digits_builds_and_reads_back(embedded_dir):
    sizes = {}
    for split in ("train", "validation", "test"):
        source = open_raw_source(raw_config(dataset="digits"), split, embedded_dir)
        sizes[split] = len(source)
        image, caption, meta = source.raw(0)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        label = meta["label"]
        assert digits.NAMES[label] in caption.decode() or str(label) in caption.decode()
    assert sizes == {"train": 1397, "validation": 200, "test": 200}  # all 1,797 scikit-learn digits
    counts = SkipCounts()
    examples = list(read_examples(open_raw_source(raw_config(dataset="digits"), "test", embedded_dir), 32, counts))
    assert len(examples) == 200 and not counts
    assert sorted({e.meta["label"] for e in examples}) == list(range(10))


def test_shapes_ground_truth_is_exact(embedded_dir):
    source = open_raw_source(raw_config(dataset="shapes", shapes_train_size=40), "train", embedded_dir)
    assert len(source) == 40
    data = source.data_source
    for i in range(len(source)):
        example = data[i]
        objects = example["objects"]
        n = len(objects["kind"])
        assert 1 <= n <= 3
        segmentation = example["segmentation"][..., 0]
        assert set(np.unique(segmentation)) == set(range(n + 1))  # every object is visible
        for k in range(n):
            ys, xs = np.nonzero(segmentation == k + 1)
            ymin, xmin, ymax, xmax = objects["bbox"][k] * 64
            assert ys.min() >= ymin - 1 and ys.max() <= ymax + 1 and xs.min() >= xmin - 1 and xs.max() <= xmax + 1
            # The caption names each object's colour and kind.
            color, kind = shapes.COLORS[objects["color"][k]], shapes.KINDS[objects["kind"][k]]
            assert f"{color} {kind}" in example["caption"].decode()
        answers = dict(zip([q.decode() for q in example["vqa"]["question"]],
                           [a.decode() for a in example["vqa"]["answer"]]))
        assert answers["how many shapes are there?"] == shapes.NUMBER_WORDS[n]
        assert not np.array_equal(example["edit"]["image"], example["image"])  # every edit changes the picture
    # Deterministic by seed: the generator gives the same scenes again (TFDS stores them in its own order).
    captions = {data[i]["caption"].decode() for i in range(len(source))}
    assert {shapes.scene_example(0, "train", i, 64)["caption"] for i in range(40)} == captions


def test_shapes_examples_keep_every_field_of_the_scene(embedded_dir):
    """Objects, the edit pair, the VQA pairs and the segmentation map reach the example's meta, readable."""
    source = open_raw_source(raw_config(dataset="shapes", shapes_train_size=40), "train", embedded_dir)
    scenes = {}  # TFDS keeps its own order: each example is found by its caption
    for i in range(40):
        scene = shapes.scene_example(0, "train", i, 64)
        scenes[scene["caption"]] = scene
    for example in read_examples(source, 32, SkipCounts(), range(10)):
        truth, meta = scenes[example.caption], example.meta
        assert meta["objects"]["kind"] == truth["objects"]["kind"]
        assert meta["objects"]["position"] == truth["objects"]["position"]
        np.testing.assert_allclose(meta["objects"]["bbox"], truth["objects"]["bbox"], atol=1e-6)
        assert meta["edit"]["instruction"] == truth["edit"]["instruction"] and meta["edit"]["kind"] in shapes.EDITS
        assert meta["vqa"] == {"question": [q["question"] for q in truth["vqa"]],
                               "answer": [q["answer"] for q in truth["vqa"]]}
        assert meta["edit"]["image"].shape == (32, 32, 3) and meta["edit"]["image"].dtype == np.uint8
        # The label map is drawn in its palette: one colour per object, the background colour elsewhere.
        colors = {tuple(c) for c in meta["segmentation"].reshape(-1, 3)}
        objects = len(truth["objects"]["kind"])
        assert colors == {record_meta.BACKGROUND_LABEL_COLOR, *record_meta.LABEL_MAP_COLORS[:objects]}


def test_a_label_map_keeps_its_labels_when_resized():
    labels = np.zeros((64, 96), np.uint8)
    labels[10:30, 40:60], labels[40:60, 20:30] = 1, 8
    drawn = record_meta.decode_meta_image(record_meta.MetaImage(labels[..., None], label_map=True), 32)
    assert drawn.shape == (32, 32, 3)  # short side to 32, centre crop: columns 16-80 of the original remain
    first, second = record_meta.LABEL_MAP_COLORS[0], record_meta.LABEL_MAP_COLORS[1]  # label 8 wraps to the second
    assert {tuple(c) for c in drawn.reshape(-1, 3)} == {record_meta.BACKGROUND_LABEL_COLOR, first, second}  # no blend
    assert tuple(drawn[10, 17]) == first and tuple(drawn[25, 4]) == second


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "PA", "L", "1", "I;16", "I", "F", "CMYK"])
def test_every_image_mode_becomes_rgb(mode):
    gradient = np.tile(np.linspace(0, 1, 60), (40, 1))  # dark left, bright right
    if mode in ("I;16", "I"):  # 16-bit scans, and 32-bit integer images holding 16-bit values
        image = PIL.Image.fromarray((gradient * 65535).astype(np.uint16 if mode == "I;16" else np.int32))
        assert image.mode == mode
    elif mode == "F":
        image = PIL.Image.fromarray(gradient.astype(np.float32), "F")
    else:
        image = PIL.Image.fromarray((gradient * 255).astype(np.uint8)).convert(mode)
    out = resize_center_crop(to_rgb(image), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    if mode in ("L", "I;16", "I", "F", "RGB"):
        # Grey levels survive the 8-bit scaling: dark on the left, bright on the right.
        assert out[:, 0].mean() < 80 and out[:, -1].mean() > 170


def test_transparency_is_composited_on_white():
    transparent = PIL.Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.all(resize_center_crop(to_rgb(transparent), 8) == 255)


def test_resize_short_side_then_center_crop():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 10:30] = 255  # a white centre square in a wide image
    out = resize_center_crop(PIL.Image.fromarray(image), 10)
    assert out.shape == (10, 10, 3) and out.mean() > 250


def write_folder(folder):
    os.makedirs(folder, exist_ok=True)
    good = PIL.Image.new("RGB", (30, 20), (10, 200, 30))
    with open(os.path.join(folder, "good.jpg"), "wb") as f:
        f.write(encoded(good, "JPEG"))
    with open(os.path.join(folder, "cmyk.jpg"), "wb") as f:
        f.write(encoded(good.convert("CMYK"), "JPEG"))
    with open(os.path.join(folder, "truncated.png"), "wb") as f:
        f.write(encoded(PIL.Image.new("RGB", (64, 64), (1, 2, 3)))[:60])
    with open(os.path.join(folder, "not_an_image.jpg"), "wb") as f:
        f.write(b"hello")
    lines = [{"file": "good.jpg", "caption": "  a green\nbox "}, {"file": "cmyk.jpg", "text": "cmyk box"},
             {"file": "truncated.png", "caption": "cut"}, {"file": "not_an_image.jpg", "caption": "text"},
             {"file": "missing.jpg", "caption": "gone"}, {"file": "good.jpg", "caption": "   "}]
    with open(os.path.join(folder, "captions.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(line) for line in lines) + "\n{not json\n")


def test_image_folder_skips_and_counts_bad_input(tmp_path):
    write_folder(tmp_path)
    source = ImageFolderSource(str(tmp_path))
    assert source.open_counts == {"bad_manifest_line": 1}
    counts = SkipCounts()
    examples = list(read_examples(source, 16, counts))
    assert [e.caption for e in examples] == ["a green box", "cmyk box"]
    assert all(e.image.shape == (16, 16, 3) for e in examples)
    assert abs(int(examples[0].image[8, 8, 1]) - 200) < 20  # the green survived decoding and resizing
    assert counts == {"unreadable_image": 2, "missing_image_file": 1, "empty_caption": 1}


def test_an_image_folder_reads_only_regular_files_it_names_inside_it_and_only_string_captions(tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    os.makedirs(folder)
    image = encoded(PIL.Image.new("RGB", (8, 8), (200, 10, 10)))
    (folder / "red.png").write_bytes(image)
    (folder / "big.png").write_bytes(image + b"\0" * 4096)
    (tmp_path / "secret.png").write_bytes(image)
    os.symlink(tmp_path / "secret.png", folder / "link.png")  # the folder's own link: followed
    os.symlink("/dev/zero", folder / "zero.png")  # a link to a device: not a regular file
    os.mkfifo(folder / "pipe.png")  # reading it would hang
    monkeypatch.setattr("cm3jax.data.sources.MAX_IMAGE_FILE_BYTES", len(image) + 100)
    lines = [{"file": "../secret.png", "caption": "up"}, {"file": str(tmp_path / "secret.png"), "caption": "abs"},
             {"file": "/dev/zero", "caption": "device"}, {"file": "link.png", "caption": "a linked box"},
             {"file": "zero.png", "caption": "linked device"}, {"file": "sub/../../secret.png", "caption": "up"},
             {"file": "pipe.png", "caption": "fifo"}, {"file": "big.png", "caption": "big"},
             {"file": "red.png", "caption": None}, {"file": "red.png", "caption": {"text": "a dict"}},
             {"file": 7, "caption": "a number"}, {"file": "red.png", "caption": ["a red box", "a red square"]}]
    (folder / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = ImageFolderSource(str(folder))
    assert source.open_counts == {"bad_manifest_line": 3}
    counts = SkipCounts()
    examples = list(read_examples(source, 8, counts))
    assert [e.caption for e in examples] == ["a linked box", "a red box"]
    assert examples[1].meta["references"] == ["a red box", "a red square"]
    assert counts == {"image_outside_folder": 4, "image_not_a_file": 2, "image_too_large": 1}


class _RecordsWithOneBroken:
    def __len__(self):
        return 4

    def raw(self, index):
        if index == 2:
            raise ValueError("truncated record")
        return b"not decoded", ["", "  a  red\tbox "] if index == 0 else ("" if index == 1 else "a cat"), {}


def test_caption_reading_skips_broken_records_and_empty_captions():
    counts = SkipCounts()
    assert list(read_captions(_RecordsWithOneBroken(), counts)) == ["a red box", "a cat"]
    assert counts == {"unreadable_record": 1, "empty_caption": 1}


def test_array_record_of_tf_examples(tmp_path):
    from tensorflow_datasets.proto import tf_example_pb2

    def example(image_bytes, caption):
        proto = tf_example_pb2.Example()
        proto.features.feature["image"].bytes_list.value.append(image_bytes)
        proto.features.feature["caption"].bytes_list.value.append(caption.encode())
        return proto.SerializeToString()

    path = str(tmp_path / "pairs-00000.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    writer.write(example(encoded(PIL.Image.new("RGB", (20, 20), (0, 0, 255))), "a blue square"))
    writer.write(example(b"\x89PNG broken", "broken"))
    writer.write(b"not a proto at all")
    writer.close()
    source = open_raw_source(raw_config(dataset="array_record", paths=str(tmp_path / "pairs-*.array_record")),
                             "train", "")
    assert isinstance(source, ArrayRecordExampleSource) and len(source) == 3
    counts = SkipCounts()
    examples = list(read_examples(source, 8, counts))
    assert [e.caption for e in examples] == ["a blue square"] and examples[0].image[4, 4, 2] > 200
    assert examples[0].meta["references"] == ["a blue square"]  # every caption of a record is kept
    assert counts == {"unreadable_image": 1, "unreadable_record": 1}
    with pytest.raises(FileNotFoundError, match="split"):
        open_raw_source(raw_config(dataset="array_record", paths=str(tmp_path / "*.array_record")), "test", "")


def test_missing_tfds_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build coco_captions --file_format=array_record"):
        TfdsSource.open("coco_captions", str(tmp_path), "train", "image", "captions/text")


def test_load_image_rejects_garbage():
    with pytest.raises(Exception, match="."):  # noqa: B017 - PIL's error class for unreadable bytes varies
        load_image(b"garbage")


@pytest.mark.slow
def test_data_command_builds_shapes(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "cm3jax", "data", "--config=configs/tiny.py",
                          f"--workdir={tmp_path}", "--config.raw_data.dataset=shapes",
                          "--config.raw_data.shapes_train_size=30"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # The console says what was built, not TFDS's download notice or its advice to install OpenCV.
    assert "built the embedded shapes dataset" in out.stdout
    assert "Downloading" not in out.stdout + out.stderr and "OpenCV" not in out.stdout + out.stderr
    summary = json.load(open(tmp_path / "data" / "COMPLETE.json"))
    assert summary["splits"]["train"] == {"examples": 30, "sampled_ok": 30, "skipped": {}}
    assert summary["splits"]["validation"]["examples"] == 10


def write_bad_corpus(folder) -> dict:
    """An image folder holding every kind of bad record next to good ones; returns the skip counts it must give."""
    os.makedirs(folder, exist_ok=True)
    for i in range(3):
        with open(os.path.join(folder, f"good{i}.png"), "wb") as f:
            f.write(encoded(PIL.Image.new("RGB", (24, 24), (40 * i, 200, 30))))
    with open(os.path.join(folder, "corrupt.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff garbage")
    os.makedirs(os.path.join(folder, "a_folder.png"))  # a directory named like an image
    os.symlink("loop.png", os.path.join(folder, "loop.png"))  # a symlink loop
    lines = [json.dumps({"file": f"good{i}.png", "caption": f"green box {i}"}).encode() for i in range(3)]
    lines += [json.dumps({"file": "good0.png", "caption": "x" * 1_000_000}).encode(),  # a 1 MB caption
              json.dumps({"file": "good1.png", "caption": " \t "}).encode(),
              json.dumps({"file": "missing.png", "caption": "gone"}).encode(),
              json.dumps({"file": "corrupt.jpg", "caption": "bad bytes"}).encode(),
              json.dumps({"file": "a_folder.png", "caption": "a folder"}).encode(),
              json.dumps({"file": "loop.png", "caption": "a loop"}).encode(),
              b'{"file": "good2.png", "caption": "caf\xe9 latin-1"}',  # not UTF-8
              b'{"file": "good2.png", "caption": "nul \x00 byte"}',  # a raw NUL inside the JSON string
              b"{not json", b'{"caption": "no file key"}', b"[1, 2]"]
    with open(os.path.join(folder, "captions.jsonl"), "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return {"caption_too_long": 1, "empty_caption": 1, "missing_image_file": 1, "unreadable_image": 2,
            "image_not_a_file": 1, "bad_manifest_line": 5}


def test_data_summary_counts_every_kind_of_bad_record(tmp_path):
    from cm3jax.data.prepare import prepare_raw_data

    expected = write_bad_corpus(tmp_path / "corpus")
    summary = prepare_raw_data(raw_config(dataset="image_folder", paths=str(tmp_path / "corpus"), image_size=16),
                               str(tmp_path / "data"))
    assert summary["train"] == {"examples": 9, "sampled_ok": 3, "skipped": expected}
