import pytest
import torch

import tlkit
from tlkit.incremental import DistillationLoss, expand_head, select_classes, with_classes, with_replay


def test_expanding_the_head_keeps_old_rows_and_old_predictions():
    tlkit.set_seed(0)
    model = tlkit.freeze(tlkit.create_model("efficientnet_lite0", 3, weights="imagenet"))
    x = torch.randn(6, 3, 32, 32)
    model.eval()
    before = model(x)
    old_w, old_b = model.head.weight.clone(), model.head.bias.clone()
    expand_head(model, 2)
    after = model(x)
    assert model.head.out_features == 5
    assert torch.equal(model.head.weight[:3], old_w) and torch.equal(model.head.bias[:3], old_b)
    assert torch.allclose(after[:, :3], before, atol=1e-6)  # same rows; only BLAS summation order differs
    assert torch.equal(after.argmax(1), before.argmax(1))
    assert model.head.weight.requires_grad


def test_expanding_needs_a_positive_count():
    model = tlkit.create_model("efficientnet_lite0", 3, weights=None)
    with pytest.raises(ValueError, match="num_new"):
        expand_head(model, 0)


def test_class_subsets_relabel_and_append_in_order():
    splits = tlkit.load_dataset("digits", seed=0)
    old = select_classes(splits.train, ["0", "1", "2"])
    assert set(old.targets) == {0, 1, 2} and old.classes == ["0", "1", "2"]
    new = select_classes(splits.train, ["3"])
    assert set(new.targets) == {0}
    everything = ["0", "1", "2", "3"]
    assert set(with_classes(new, everything).targets) == {3}
    mixed = with_replay(with_classes(new, everything), with_classes(old, everything), per_class=5, seed=0)
    labels = [mixed[i][1] for i in range(len(mixed))]
    assert labels.count(3) == len(new) and labels.count(0) == labels.count(1) == labels.count(2) == 5
    with pytest.raises(ValueError, match="not in the dataset"):
        select_classes(splits.train, ["ten"])


def test_distillation_is_zero_when_student_matches_teacher_and_grows_otherwise():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    student = torch.nn.Linear(4, 5)
    with torch.no_grad():
        student.weight[:3], student.bias[:3] = teacher.weight, teacher.bias
    loss = DistillationLoss(student, teacher, temperature=2.0, alpha=1.0)
    x, y = torch.randn(8, 4), torch.randint(0, 5, (8,))
    logits = student(x)
    assert loss(logits, y).item() == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), abs=1e-6)
    with torch.no_grad():
        student.weight[0] += 1.0  # changes the old classes relative to each other
    logits = student(x)
    assert loss(logits, y).item() > torch.nn.functional.cross_entropy(logits, y).item() + 1e-3
    loss.remove()
