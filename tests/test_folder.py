import numpy as np
import pytest
from fixtures.materialise import materialise

from cirlab.data.errors import DataFormatError
from cirlab.data.evalsets import recall_at_k
from cirlab.data.folder import check_folder, load_folder

# Columns: shirts/a.jpg, shirts/b.jpg, shoes/c.png, d.jpg; rows: a -> b, c -> d.
SCORES = np.array([[0.9, 0.5, 0.6, 0.1],   # reference first; target 2nd after removal, 3rd if kept
                   [0.1, 0.2, 0.8, 0.7]])  # reference first; target 1st after removal, 2nd if kept


@pytest.fixture
def root(tmp_path):
    return materialise("folder", tmp_path)


def test_records_gallery_and_metrics(root):
    train, evalset = load_folder(root, root / "val.jsonl", root / "train.jsonl")
    assert evalset.gallery == ["shirts/a.jpg", "shirts/b.jpg", "shoes/c.png", "d.jpg"]
    assert evalset.queries[1].targets == frozenset({"d.jpg"})   # "./d.jpg" normalised
    assert evalset.image_paths["shoes/c.png"] == root / "shoes" / "c.png"
    assert recall_at_k(SCORES, evalset, ks=(1, 2)) == pytest.approx({"R@1": 50.0, "R@2": 100.0})
    assert [(t.reference, t.text, t.target) for t in train.triplets] == [("d.jpg", "make it red", "shirts/a.jpg")]
    _, kept = load_folder(root, root / "val.jsonl", reference="kept")
    assert recall_at_k(SCORES, kept, ks=(1, 2, 3)) == pytest.approx({"R@1": 0.0, "R@2": 50.0, "R@3": 100.0})


def test_folder_gallery_lists_every_image(root):
    train, evalset = load_folder(root, root / "val.jsonl", gallery="folder")
    assert train.triplets == [] and train.image_paths == {}
    assert evalset.gallery == ["d.jpg", "e.jpg", "shirts/a.jpg", "shirts/b.jpg", "shoes/c.png"]
    assert "every image file of the folder" in evalset.describe()


@pytest.mark.parametrize("path, reason", [
    ("../secret.jpg", "contains '..'"),
    ("shirts/../../secret.jpg", "contains '..'"),
    ("/etc/passwd", "is absolute"),
    ("C:/images/a.jpg", "is absolute"),
    ("shirts\\\\a.jpg", "uses backslashes"),
    ("escape/x.jpg", "resolves outside the image folder"),
])
def test_paths_outside_the_folder_are_rejected(root, tmp_path, path, reason):
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")
    bad = root / "bad.jsonl"
    bad.write_text('{"reference": "d.jpg", "text": "x", "target": "d.jpg"}\n'
                   f'{{"reference": "{path}", "text": "x", "target": "d.jpg"}}\n')
    with pytest.raises(DataFormatError, match=rf"bad\.jsonl: line 2: reference .* {reason}"):
        load_folder(root, bad)


def test_check_reports_every_planted_problem(root):
    assert check_folder(root, [root / "val.jsonl", root / "train.jsonl"]) == []
    (root / "shoes" / "c.png").unlink()
    bad = root / "val.jsonl"
    bad.write_text(bad.read_text() + '{"reference": "d.jpg", "target": "e.jpg"}\nnot json\n["a list"]\n')
    assert check_folder(root, [bad, root / "missing.jsonl"]) == [
        f"{bad}: line 4: missing or non-string 'text'",
        f"{bad}: line 5: not valid JSON (Expecting value)",
        f"{bad}: line 6: expected a JSON object, got list",
        f"{root / 'missing.jsonl'}: missing file",
        f"image 'shoes/c.png': missing file {root / 'shoes' / 'c.png'}",
    ]
