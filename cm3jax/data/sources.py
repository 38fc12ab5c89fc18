"""Raw image-caption sources a real user has, read as RGB images of one size and non-empty captions.

    tfds          any TFDS dataset prepared as array_record (e.g. coco_captions), or the embedded digits / shapes
    array_record  ArrayRecord files of tf.train.Example (image bytes + caption), parsed without TensorFlow
    image_folder  a folder with images and captions.jsonl ({"file": "0001.jpg", "caption": "..."} per line)

Bad input never stops a run: an unreadable or corrupt image, a missing file, an empty or overlong caption or a
malformed manifest line is skipped and counted (`SkipCounts`, reasons in SKIP_REASONS), and the counts are logged
and kept in the `data` and `tokenize` summaries.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import posixpath
import stat
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import PIL.Image
import PIL.ImageOps
from absl import logging
from etils import epath

from cm3jax.data.record_meta import decode_meta_image, map_meta_images, tfds_meta
from cm3jax.errors import MissingInputError
from cm3jax.storage import PathLike, is_remote, local_mirror

RAW_SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class ImageCaption:
    image: np.ndarray  # uint8 [size, size, 3]
    caption: str
    meta: dict[str, Any]


# Why read_examples / read_captions skip a record (the keys of their SkipCounts).
SKIP_REASONS = ("unreadable_record", "empty_caption", "caption_too_long", "missing_image_file", "unreadable_image",
                "bad_manifest_line", "image_outside_folder", "image_not_a_file", "image_too_large")
MAX_CAPTION_CHARS = 4096  # longer captions are not captions (a pasted document, a corrupt field): skipped
MAX_IMAGE_FILE_BYTES = 128 << 20  # a manifest's image file larger than this is not read (a device, a stray archive)


class SkippedRecord(Exception):
    """A record refused for one of SKIP_REASONS before its data is read."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class SkipCounts(collections.Counter):
    """Examples skipped, by reason."""

    def log(self, what: str) -> None:
        if sum(self.values()):
            logging.warning("%s: skipped %s", what, dict(sorted(self.items())))


class RawSource(Protocol):
    def __len__(self) -> int: ...

    def raw(self, index: int) -> tuple[Any, Any, dict]:
        """(undecoded image: bytes / path / array, caption: str / bytes / list of them, meta)."""


# ---------------------------------------------------------------------------------------------------------- images
def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode -> RGB: transparency composited on white, 16/32-bit and float scaled to 8 bits, EXIF rotation."""
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, np.float64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0  # 16-bit range
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        return PIL.Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: PIL.Image.Image, size: int, resample: int = PIL.Image.BICUBIC) -> np.ndarray:
    """Resize so the short side is `size` (bicubic unless told), then crop the centre square."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def load_image(value: Any) -> PIL.Image.Image:
    """Encoded bytes, a file path or a uint8 array -> a fully decoded PIL image (raises on corrupt data)."""
    if isinstance(value, np.ndarray):
        array = value[..., 0] if value.ndim == 3 and value.shape[-1] == 1 else value
        return PIL.Image.fromarray(array.astype(np.uint8))
    if isinstance(value, ManifestImage):
        value = value.read_bytes()
    elif not isinstance(value, (bytes, bytearray)):
        value = epath.Path(value).read_bytes()  # a path, local or in a bucket
    image = PIL.Image.open(io.BytesIO(value))
    image.load()  # decode now: truncated or corrupt files fail here, not later
    return image


def decode_image(value: Any, size: int) -> np.ndarray:
    """Bytes / path / array -> uint8 [size, size, 3] RGB (raises on unreadable data)."""
    return resize_center_crop(to_rgb(load_image(value)), size)


def normalize_caption(value: Any) -> str:
    """str / bytes / a list of them (the first non-empty one) -> stripped text ('' when there is none)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        texts = [normalize_caption(v) for v in value]
        return next((t for t in texts if t), "")
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return " ".join(str(value).split())


def read_examples(source: RawSource, image_size: int, counts: SkipCounts,
                  indices: Iterable[int] | None = None) -> Iterator[ImageCaption]:
    """Decoded examples of `source`; bad ones are skipped and counted in `counts`. Their meta holds the source's
    other fields (data/record_meta.py), other images decoded at `image_size`, and `references`: every caption
    when the source gives several."""
    for index in range(len(source)) if indices is None else indices:
        try:
            image_value, caption_value, meta = source.raw(index)
        except SkippedRecord as e:
            counts[e.reason] += 1
            continue
        except Exception as e:  # noqa: BLE001 - a bad record is data, not a bug
            counts["unreadable_record"] += 1
            logging.debug("record %d unreadable: %s", index, e)
            continue
        caption = normalize_caption(caption_value)
        if not _usable_caption(caption, counts):
            continue
        try:
            image = decode_image(image_value, image_size)
            meta = map_meta_images(meta, lambda m: decode_meta_image(m, image_size))
        except FileNotFoundError:
            counts["missing_image_file"] += 1
            continue
        except SkippedRecord as e:
            counts[e.reason] += 1
            continue
        except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
            counts["unreadable_image"] += 1
            logging.debug("record %d: image unreadable: %s", index, e)
            continue
        if isinstance(caption_value, (list, tuple, np.ndarray)):
            meta["references"] = [text for text in map(normalize_caption, caption_value) if text]
        yield ImageCaption(image, caption, {"index": int(index), **meta})


def read_captions(source: RawSource, counts: SkipCounts, meta_texts: bool = False) -> Iterator[str]:
    """The normalised, non-empty captions of `source` (images are not decoded); bad records are skipped and counted.
    With `meta_texts`, each caption is followed by the text of the record's other fields (questions, answers, edit
    instructions: record_meta.meta_texts), which instruction tuning reads too."""
    from cm3jax.data.record_meta import meta_texts as texts_of

    for index in range(len(source)):
        try:
            _, caption, meta = source.raw(index)
            caption = normalize_caption(caption)
        except SkippedRecord as e:
            counts[e.reason] += 1
            continue
        except Exception as e:  # noqa: BLE001 - a bad record is data, not a bug
            counts["unreadable_record"] += 1
            logging.debug("record %d unreadable: %s", index, e)
            continue
        if _usable_caption(caption, counts):
            yield caption
            if meta_texts:
                yield from (text for text in texts_of(meta) if 0 < len(text) <= MAX_CAPTION_CHARS)


def _usable_caption(caption: str, counts: SkipCounts) -> bool:
    if not caption:
        counts["empty_caption"] += 1
    elif len(caption) > MAX_CAPTION_CHARS:
        counts["caption_too_long"] += 1
    return 0 < len(caption) <= MAX_CAPTION_CHARS


def open_counts(source: RawSource) -> SkipCounts:
    """What the source skipped when it was opened (e.g. malformed manifest lines), to add once to a summary."""
    return SkipCounts(getattr(source, "open_counts", {}))


# ---------------------------------------------------------------------------------------------------------- sources
def _feature(example: dict, key: str) -> Any:
    """`a/b` reads nested features (e.g. coco_captions' captions/text)."""
    for part in key.split("/"):
        example = example[part]
    return example


class TfdsSource:
    def __init__(self, data_source, image_key: str = "image", caption_key: str = "caption"):
        self.data_source = data_source
        self.image_key = image_key
        self.caption_key = caption_key
        self._features = data_source.dataset_info.features
        self._meta_skip = {image_key.split("/")[0], caption_key.split("/")[0]}

    @classmethod
    def open(cls, name: str, data_dir: str, split: str, image_key: str, caption_key: str) -> TfdsSource:
        import tensorflow_datasets as tfds

        try:
            data_source = tfds.data_source(name, data_dir=local_tfds_dir(name, data_dir), split=split)
        except Exception as e:  # noqa: BLE001 - TFDS raises several types for "not prepared"
            raise MissingInputError(
                f"TFDS dataset {name!r} split {split!r} is not prepared as array_record under "
                f"{data_dir or '~/tensorflow_datasets'} ({type(e).__name__}: {e}). Prepare it once on a machine with "
                f"TensorFlow and network: `tfds build {name} --file_format=array_record --data_dir=DIR`, copy DIR "
                f"here and set raw_data.tfds_data_dir=DIR.") from e
        return cls(data_source, image_key, caption_key)

    def __len__(self) -> int:
        return len(self.data_source)

    def raw(self, index: int) -> tuple[Any, Any, dict]:
        example = self.data_source[index]
        return (_feature(example, self.image_key), _feature(example, self.caption_key),
                tfds_meta(example, self._features, self._meta_skip))


class ArrayRecordExampleSource:
    """ArrayRecord files whose records are serialized tf.train.Example protos."""

    def __init__(self, paths: list[str], image_key: str = "image", caption_key: str = "caption"):
        import grain

        if not paths:
            raise MissingInputError("no ArrayRecord files matched raw_data.paths")
        self.records = grain.sources.ArrayRecordDataSource(paths)
        self.image_key = image_key
        self.caption_key = caption_key

    def __len__(self) -> int:
        return len(self.records)

    def raw(self, index: int) -> tuple[Any, Any, dict]:
        from tensorflow_datasets.proto import tf_example_pb2

        features = tf_example_pb2.Example.FromString(self.records[index]).features.feature
        image = features[self.image_key].bytes_list.value
        caption = features[self.caption_key].bytes_list.value if self.caption_key in features else []
        if not image:
            raise ValueError(f"record has no bytes feature {self.image_key!r}")
        return image[0], list(caption), {}


@dataclasses.dataclass(frozen=True)
class ManifestImage:
    """An image file a manifest names: read only when it is a regular file of at most MAX_IMAGE_FILE_BYTES (a
    device, a FIFO or a huge file is skipped and counted, never read)."""
    path: epath.Path

    def read_bytes(self) -> bytes:
        if is_remote(self.path):
            size = self.path.stat().length  # FileNotFoundError: counted as a missing file
        else:
            info = os.stat(self.path)
            if not stat.S_ISREG(info.st_mode):
                raise SkippedRecord("image_not_a_file", os.fspath(self.path))
            size = info.st_size
        if size > MAX_IMAGE_FILE_BYTES:
            raise SkippedRecord("image_too_large", f"{self.path}: {size} bytes")
        return self.path.read_bytes()


def _is_caption(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


class ImageFolderSource:
    """`folder/captions.jsonl`: one JSON object per line with the image path (key file, image or path; relative to
    the folder, which the name may not leave) and its caption (key caption or text: a string or a list of strings).
    Malformed lines are skipped and counted at open; names outside the folder, files that are not regular files and
    files over MAX_IMAGE_FILE_BYTES are skipped and counted when read."""

    def __init__(self, folder: PathLike):
        folder = epath.Path(folder)
        manifest = folder / "captions.jsonl"
        if not manifest.exists():
            raise MissingInputError(f"{manifest} not found: an image folder needs captions.jsonl with one "
                                    f'{{"file": "...", "caption": "..."}} per line')
        self.folder = folder
        self.entries: list[tuple[str, str | list[str]]] = []
        self.open_counts = SkipCounts()
        with manifest.open("rb") as f:  # bytes: a line that is not UTF-8 is one bad line, not a crash
            for raw_line in f:
                if not raw_line.strip():
                    continue
                try:
                    entry = json.loads(raw_line.decode("utf-8"))
                    path = next(entry[k] for k in ("file", "image", "path") if k in entry)
                    caption = next((entry[k] for k in ("caption", "text") if k in entry), "")
                except (ValueError, StopIteration, TypeError):  # UnicodeDecodeError is a ValueError
                    self.open_counts["bad_manifest_line"] += 1
                    continue
                if not isinstance(path, str) or not path or not _is_caption(caption):  # null, a number, a dict
                    self.open_counts["bad_manifest_line"] += 1
                    continue
                self.entries.append((path, caption))
        self.open_counts.log(str(manifest))

    def __len__(self) -> int:
        return len(self.entries)

    def _inside_folder(self, path: str) -> epath.Path:
        """The folder's file `path` names; SkippedRecord when the name leaves the folder (`..`, an absolute path, a
        URL). Judged on the name: a symbolic link the folder holds is followed (a folder of links into a shared
        store is common), and what it leads to must still be a regular file (ManifestImage)."""
        relative = posixpath.normpath(path.replace(os.sep, "/"))
        if "://" in path or posixpath.isabs(relative) or relative in (".", "..") or relative.startswith("../"):
            raise SkippedRecord("image_outside_folder", path)
        return self.folder / relative

    def raw(self, index: int) -> tuple[Any, Any, dict]:
        path, caption = self.entries[index]
        return ManifestImage(self._inside_folder(path)), caption, {"file": path}


def _split_path(pattern: str, split: str) -> str:
    if "{split}" in pattern:
        return pattern.replace("{split}", split)
    if split != "train":
        raise MissingInputError(f"raw_data.paths={pattern!r} has no {{split}} placeholder, so it only provides the "
                                f"train split (asked for {split!r})")
    return pattern


def local_tfds_dir(name: str, data_dir: str) -> str | None:
    """A TFDS data_dir that array_record can read: itself, or for a bucket a local mirror of the dataset's folder."""
    if not data_dir or not is_remote(data_dir):
        return data_dir or None
    dataset_folder = name.split("/")[0].split(":")[0]
    return os.path.dirname(local_mirror(epath.Path(data_dir) / dataset_folder))


def _matching_files(pattern: str) -> list[str]:
    """Local paths of the files matching a glob pattern (files in a bucket are read from a local mirror)."""
    pattern = epath.Path(pattern)
    folder = pattern.parent
    return [local_mirror(p) for p in sorted(folder.glob(pattern.name))] if folder.is_dir() else []


def open_raw_source(raw_config, split: str, default_data_dir: str) -> RawSource:
    """The configured raw source's `split` (raw_data section of the config)."""
    r = raw_config
    data_dir = r.tfds_data_dir or default_data_dir
    if r.dataset in ("digits", "shapes"):
        from cm3jax.data.embedded import embedded_builder

        builder = embedded_builder(r.dataset, local_tfds_dir(r.dataset, data_dir),
                                   shapes_train_size=r.shapes_train_size, shapes_image_size=r.shapes_image_size,
                                   seed=r.seed)
        if not builder.is_prepared():
            raise MissingInputError(f"embedded dataset {r.dataset!r} is not built under {data_dir}: run "
                                    f"`cm3jax data` first")
        return TfdsSource(builder.as_data_source(split))
    if r.dataset == "tfds":
        return TfdsSource.open(r.tfds_name, data_dir, split, r.image_key, r.caption_key)
    if r.dataset == "array_record":
        return ArrayRecordExampleSource(_matching_files(_split_path(r.paths, split)), r.image_key, r.caption_key)
    if r.dataset == "image_folder":
        return ImageFolderSource(_split_path(r.paths, split))
    raise ValueError(f"unknown raw_data.dataset {r.dataset!r}")
