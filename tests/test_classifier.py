import torch

from var.data import DigitsDataset
from var.eval.classifier import class_consistency


def test_digit_classifier_learns_held_out_digits(digit_classifier):
    classifier = digit_classifier
    held_out = DigitsDataset("test", image_size=16)
    assert class_consistency(classifier, held_out.images, held_out.labels) > 0.93
    # and it is a real judge: shuffled labels score near chance
    shuffled = held_out.labels[torch.randperm(len(held_out.labels), generator=torch.Generator().manual_seed(0))]
    assert class_consistency(classifier, held_out.images, shuffled) < 0.3


def test_digits_split_is_deterministic_and_disjoint():
    train, test = DigitsDataset("train", 8), DigitsDataset("test", 8)
    assert len(train) + len(test) == 1797
    assert torch.equal(DigitsDataset("test", 8).images, test.images)
    assert set(test.labels.tolist()) == set(range(10))
