"""Class maps by name: a split's labels in training's ids, for labels, label maps and detection categories
(the commands that use them are in test_bad_inputs.py: the demo classifier scored by name, refusals)."""
from __future__ import annotations

import pytest
import torch

from itpn_ds.data.class_map import ClassMap, ClassMapError, align
from itpn_ds.data.shards import Manifest
from itpn_ds.engine.tasks.detect import split_category_ids

TRAINED = ClassMap({"astronaut": 0, "chelsea": 1, "coffee": 2, "rocket": 3})


def test_a_subset_split_is_mapped_to_training_ids_and_counts_only_its_classes():
    split = ClassMap({"coffee": 0, "rocket": 1})
    alignment = align(TRAINED, split, "data.val_shards=V", "data.shards=T")
    assert alignment.index == {0: 2, 1: 3} and alignment.missing == ("astronaut", "chelsea")
    assert alignment.renumbers and alignment.trained_ids == [2, 3]
    labels = torch.tensor([0, 1, 1, 0])
    assert alignment.label_table()[labels].tolist() == [2, 3, 3, 2]
    label_map = torch.tensor([[0, 255], [1, 0]])  # segmentation: the ignore index stays ignored
    assert alignment.label_table()[label_map].tolist() == [[2, 255], [3, 2]]


def test_the_same_map_needs_no_mapping_and_a_class_training_lacks_is_refused_naming_it():
    same = align(TRAINED, TRAINED, "V", "T")
    assert not same.renumbers and not same.missing
    with pytest.raises(ClassMapError, match=r"V has 1 class\(es\) that T was not trained on \('rocket_renamed'"):
        align(TRAINED, ClassMap({"astronaut": 0, "chelsea": 1, "coffee": 2, "rocket_renamed": 3}), "V", "T")


def test_the_stored_form_is_the_manifests_and_older_files_store_none(demo_shards):
    manifest_map = ClassMap.of_manifest(Manifest.load(demo_shards))
    assert manifest_map == TRAINED
    assert ClassMap.from_json(TRAINED.to_json(), "meta.json") == TRAINED
    assert ClassMap.from_json({"step": 3}, "meta.json") is None
    with pytest.raises(ClassMapError, match="meta.json: 'classes' must map class names to label ids"):
        ClassMap.from_json({"classes": ["a", "b"]}, "meta.json")


def test_detection_scores_each_training_label_under_the_splits_category_id_of_its_name():
    trained = ClassMap({"circle": 1, "rectangle": 2, "triangle": 3}, (1, 2, 3))
    split = ClassMap({"rectangle": 1, "triangle": 2}, (20, 30))  # another file: its own ids, no circles
    align(trained, split, "V", "T")
    assert split_category_ids(trained, split) == [None, 20, 30]
