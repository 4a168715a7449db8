"""COCO-format splits: the Shapes world, COCO 2014 and 2017, Karpathy's splits, from files made here."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from training import shapes
from training.coco import load_split

# (image id, file name, captions): listed out of id order, as the JSON need not be sorted.
VAL = [
    (42, "COCO_val2014_000000000042.jpg", ["A dog on a couch.", "a brown dog sleeping"]),
    (7, "COCO_val2014_000000000007.jpg", ["Two cats."]),
]
TRAIN = [
    (3, "COCO_train2014_000000000003.jpg", ["A red bus", "a bus on a street", "the bus"]),
    (1, "COCO_train2014_000000000001.jpg", ["A man riding a horse."]),
]


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), (200, 10, 10)).save(path)


def write_coco_split(root: Path, folder: str, images: list, uncaptioned: int | None = None) -> None:
    """annotations/captions_<folder>.json and <folder>/*.jpg, captions given ids in reverse order."""
    entries = [{"id": i, "file_name": name, "width": 4, "height": 3} for i, name, _ in images]
    if uncaptioned is not None:
        entries.append({"id": uncaptioned, "file_name": "uncaptioned.jpg", "width": 4, "height": 3})
    texts = [(i, c) for i, _, caps in images for c in caps]
    annotations = [{"id": 1000 - n, "image_id": i, "caption": c} for n, (i, c) in enumerate(texts)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"captions_{folder}.json").write_text(
        json.dumps({"info": {}, "licenses": [], "images": entries, "annotations": annotations})
    )
    for _, name, _ in images:
        write_image(root / folder / name)


def karpathy_entry(cocoid: int, folder: str, split: str, sentences: list[str]) -> dict:
    return {
        "filepath": folder,
        "filename": f"COCO_{folder}_{cocoid:012d}.jpg",
        "cocoid": cocoid,
        "split": split,
        "imgid": cocoid,
        "sentids": [],
        "sentences": [{"raw": s, "tokens": s.lower().split()} for s in sentences],
    }


@pytest.fixture
def coco2014(tmp_path):
    write_coco_split(tmp_path, "val2014", VAL, uncaptioned=5)
    write_coco_split(tmp_path, "train2014", TRAIN)
    return tmp_path


def test_coco_2014_split_sorted_by_id_with_captions_in_annotation_order(coco2014):
    split = load_split(coco2014, "val2014")
    assert split.name == "val2014"
    assert split.image_ids == [7, 42]  # the uncaptioned image 5 is left out
    assert split.image_paths == [coco2014 / "val2014" / VAL[1][1], coco2014 / "val2014" / VAL[0][1]]
    # annotation ids were given in reverse order of the captions as listed
    assert split.captions == [["Two cats."], ["a brown dog sleeping", "A dog on a couch."]]
    assert split.references() == {7: ["Two cats."], 42: ["a brown dog sleeping", "A dog on a couch."]}
    assert split.instances is None
    assert len(split) == 2


def test_plain_split_names_map_onto_the_one_coco_year_present(coco2014, tmp_path_factory):
    train = load_split(coco2014, "train")
    assert train.name == "train"  # the name asked for: it names the output files
    assert replace(train, name="train2014") == load_split(coco2014, "train2014")
    assert train.image_ids == [1, 3]

    root17 = tmp_path_factory.mktemp("coco2017")
    write_coco_split(root17, "val2017", VAL)
    split = load_split(root17, "val")
    assert split.image_ids == [7, 42]
    assert all(p.parent == root17 / "val2017" and p.is_file() for p in split.image_paths)


def test_both_coco_years_need_the_year_in_the_split_name(coco2014):
    write_coco_split(coco2014, "val2017", VAL[:1])
    with pytest.raises(ValueError, match="val2014 or val2017"):
        load_split(coco2014, "val")
    assert load_split(coco2014, "val2017").image_ids == [42]


def test_a_missing_split_names_every_layout_looked_for(coco2014):
    with pytest.raises(FileNotFoundError) as error:
        load_split(coco2014, "test")
    message = str(error.value)
    assert str(coco2014 / "annotations" / "captions_test.json") in message
    assert str(coco2014 / "images" / "test") in message
    with pytest.raises(FileNotFoundError, match=r"captions_val2017\.json"):
        load_split(coco2014 / "elsewhere", "val")


@pytest.fixture
def karpathy(coco2014):
    entries = [
        karpathy_entry(42, "val2014", "test", ["A dog on a couch.", "a brown dog sleeping"]),
        karpathy_entry(9, "val2014", "restval", ["A kite."]),
        karpathy_entry(7, "val2014", "val", ["Two cats."]),
        karpathy_entry(3, "train2014", "train", ["A red bus", "a bus on a street"]),
        karpathy_entry(11, "val2014", "test", ["Snow."]),
        karpathy_entry(1, "train2014", "train", ["A man riding a horse."]),
    ]
    path = coco2014 / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": entries}))
    return path


def test_karpathy_splits_take_restval_into_train(coco2014, karpathy):
    train = load_split(coco2014, "train", karpathy)
    assert train.image_ids == [1, 3, 9]
    assert train.image_paths[2] == coco2014 / "val2014" / "COCO_val2014_000000000009.jpg"
    assert train.captions == [["A man riding a horse."], ["A red bus", "a bus on a street"], ["A kite."]]
    assert load_split(coco2014, "val", karpathy).references() == {7: ["Two cats."]}
    test = load_split(coco2014, "test", karpathy)
    assert (test.name, test.image_ids, test.captions[0]) == ("test", [11, 42], ["Snow."])


def test_karpathy_errors_say_what_is_wrong(coco2014, karpathy):
    with pytest.raises(ValueError, match="restval"):
        load_split(coco2014, "restval", karpathy)
    with pytest.raises(FileNotFoundError, match=r"no_such\.json"):
        load_split(coco2014, "test", coco2014 / "no_such.json")
    with pytest.raises(FileNotFoundError, match="val2014"):
        load_split(coco2014 / "elsewhere", "test", karpathy)


def test_shapes_world_split_carries_its_truth(tmp_path):
    shapes.generate(tmp_path, {"val": 3}, seed=1, workers=1)
    split = load_split(tmp_path, "val")
    assert split.image_ids == [1, 2, 3]
    assert split.image_paths[0] == tmp_path / "images" / "val" / shapes.file_name("val", 1)
    assert all(p.is_file() for p in split.image_paths)
    assert [len(c) for c in split.captions] == [5, 5, 5]
    assert split.instances == tmp_path / "annotations" / "instances_val.json"

    head = split.first(2)
    assert (head.image_ids, head.captions, head.instances) == ([1, 2], split.captions[:2], split.instances)


def test_a_captions_file_without_instances_is_not_the_shapes_world(tmp_path):
    write_coco_split(tmp_path, "val", VAL)
    (tmp_path / "images").mkdir()
    (tmp_path / "val").rename(tmp_path / "images" / "val")  # the Shapes layout, but no instances_val.json
    split = load_split(tmp_path, "val")
    assert split.image_ids == [7, 42]
    assert split.image_paths[0] == tmp_path / "images" / "val" / VAL[1][1]
    assert split.instances is None
