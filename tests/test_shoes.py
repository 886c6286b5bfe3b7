import json

import numpy as np
import pytest
from fixtures.materialise import materialise

from cirlab.data.errors import DataFormatError
from cirlab.data.evalsets import recall_at_k
from cirlab.data.shoes import check_shoes, load_shoes

# Rows: pumps_1 -> pumps_2, pumps_3 -> pumps_4; columns: pumps_1..pumps_4.
SCORES = np.array([[0.9, 0.8, 0.1, 0.1],    # reference first, target first once it is removed
                   [0.7, 0.2, 0.9, 0.1]])   # target third once the reference is removed


@pytest.fixture
def root(tmp_path):
    return materialise("shoes", tmp_path)


def test_eval_set_and_metrics(root):
    train, evalset = load_shoes(root)
    assert evalset.gallery == [f"img_womens_pumps_{i}.jpg" for i in range(1, 5)]
    assert [q.text for q in evalset.queries] == ["has a higher heel", "is red"]
    assert evalset.queries[0].excluded == frozenset({"img_womens_pumps_1.jpg"})
    assert evalset.image_paths["img_womens_pumps_3.jpg"] == root / "womens_pumps" / "1" / "img_womens_pumps_3.jpg"
    assert evalset.ks == (1, 10, 50)
    assert recall_at_k(SCORES, evalset) == pytest.approx({"R@1": 50.0, "R@10": 100.0, "R@50": 100.0})
    assert recall_at_k(SCORES, evalset, ks=(2, 3)) == pytest.approx({"R@2": 50.0, "R@3": 100.0})
    assert [(t.reference, t.text, t.target) for t in train.triplets] == [
        ("img_womens_clogs_1.jpg", "is more of a textured material", "img_womens_clogs_2.jpg"),
        ("img_womens_clogs_2.jpg", "is taller and darker", "img_womens_boots_1.jpg")]


def test_check_reports_every_planted_problem(root):
    assert check_shoes(root) == []
    (root / "womens_pumps" / "1" / "img_womens_pumps_4.jpg").unlink()
    path = root / "relative_captions_shoes.json"
    entries = json.loads(path.read_text())
    del entries[0]["RelativeCaption"]
    entries[2]["ReferenceImageName"] = "img_womens_clogs_1.jpg"
    path.write_text(json.dumps(entries))
    problems = check_shoes(root)
    assert problems == [
        f"{path}: entry 0: missing or non-string 'RelativeCaption'",
        f"{path}: entry 2: reference and target are not both train or both eval images",
        f"image 'img_womens_pumps_4.jpg': no file of that name below {root}",
    ]
    with pytest.raises(DataFormatError, match="entry 0: missing or non-string 'RelativeCaption'"):
        load_shoes(root)


def test_missing_names_file_is_named(root):
    (root / "eval_im_names.txt").unlink()
    with pytest.raises(DataFormatError, match="eval_im_names.txt: missing file"):
        load_shoes(root)
    assert check_shoes(root)[0] == f"{root / 'eval_im_names.txt'}: missing file"
