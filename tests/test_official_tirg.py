"""benchmarks/official_tirg.py and its shims (benchmarks/tirg_shims.py), without the TIRG code itself: the test
writes a small stand-in checkout with the same module names and entry points, using each old idiom the shims exist
for (.cuda(), resnet18(pretrained=True), np.load of a pickled dict, Python 2 range, an old-style autograd Function,
torch.set_num_threads(3), tensorboardX)."""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from official_tirg import main as official_main  # noqa: E402
from test_benchmark_scripts import rows, run_benchmark  # noqa: E402
from tirg_shims import MODULES, call_legacy, legacy_functions, load_tirg_code, python2_range  # noqa: E402
from train_speed import rate  # noqa: E402

# Old-style Functions are instantiated on purpose: that is the API the shims exist for.
pytestmark = pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")

STAND_IN = {
    "torch_functions.py": """
        import numpy as np
        import torch

        class MeanSquaredGap(torch.autograd.Function):  # the pre-1.3 API, as the TIRG code's triplet loss
            def __init__(self, pairs):
                super().__init__()
                self.pairs = pairs

            def forward(self, features):
                self.save_for_backward(features)
                f = features.numpy()
                return torch.FloatTensor((np.mean([((f[i] - f[j]) ** 2).sum() for i, j in self.pairs]),))

            def backward(self, grad_output):
                features, = self.saved_tensors
                f = features.numpy()
                grad = np.zeros_like(f)
                for i, j in self.pairs:
                    grad[i] += 2 * (f[i] - f[j]) / len(self.pairs)
                    grad[j] -= 2 * (f[i] - f[j]) / len(self.pairs)
                return torch.from_numpy(grad) * float(grad_output[0])
    """,
    "text_model.py": "",
    "img_text_composition_models.py": """
        import torch
        import torchvision
        import torch_functions

        class Tiny(torch.nn.Module):
            def __init__(self, texts):
                super().__init__()
                self.img_model = torchvision.models.resnet18(pretrained=True)  # would download without the shim
                self.img_model.fc = torch.nn.Linear(512, 8)
                self.words = {text: i for i, text in enumerate(sorted(set(texts)))}
                self.text = torch.nn.Embedding(len(self.words), 8)

            def extract_img_feature(self, imgs):
                return self.img_model(imgs)

            def compose_img_text(self, imgs, texts):
                ids = torch.tensor([self.words[t] for t in texts]).cuda()
                return self.img_model(imgs) + self.text(ids)

            def compute_loss(self, imgs_query, texts, imgs_target):
                features = torch.cat([self.compose_img_text(imgs_query, texts), self.extract_img_feature(imgs_target)])
                labels = range(len(texts)) + range(len(texts))  # Python 2
                pairs = [(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels))
                         if labels[i] == labels[j]]
                return torch_functions.MeanSquaredGap(pairs)(features)
    """,
    "datasets.py": """
        import numpy as np
        import PIL.Image
        import torch
        import torchvision

        class CSSDataset(torch.utils.data.Dataset):
            def __init__(self, path, split):
                data = np.load(path + '/css_toy_dataset_novel2_small.dup.npy').item()  # a pickled dict
                self.path, self.split = path, split
                self.queries = [(f, t, mod['to_str']) for mod in data[split]['mods']
                                for f, t in zip(mod['from'], mod['to'])]

            def get_all_texts(self):
                return [text for _, _, text in self.queries]

            def get_img(self, i):
                image = PIL.Image.open(self.path + '/images/css_%s_%06d.png' % (self.split, i)).convert('RGB')
                return torchvision.transforms.functional.to_tensor(image)

            def __len__(self):
                return len(self.queries)

            def __getitem__(self, n):
                f, t, text = self.queries[n]
                return self.get_img(f), text, self.get_img(t)
    """,
    "test_retrieval.py": """
        CALLS = []

        def test(opt, model, testset):
            CALLS.append(len(testset))
            return [('recall_top%d_correct_composition' % k, k / 100.0) for k in (1, 5, 10, 50, 100)]
    """,
    "main.py": """
        import argparse
        import datasets
        import img_text_composition_models
        import test_retrieval
        import torch
        from tensorboardX import SummaryWriter

        torch.set_num_threads(3)

        def parse_opt():
            parser = argparse.ArgumentParser()
            parser.add_argument('--dataset_path', type=str, default='')
            parser.add_argument('--num_iters', type=int, default=210000)
            parser.add_argument('--batch_size', type=int, default=2)
            return parser.parse_args()

        def load_dataset(opt):
            return datasets.CSSDataset(opt.dataset_path, 'train'), datasets.CSSDataset(opt.dataset_path, 'test')

        def create_model_and_optimizer(opt, texts):
            model = img_text_composition_models.Tiny(texts).cuda()
            return model, torch.optim.SGD(model.parameters(), lr=0.01)

        def train_loop(opt, logger, trainset, testset, model, optimizer):
            it = 0
            while it < opt.num_iters:
                test_retrieval.test(opt, model, testset)  # the loop's periodic evaluation
                torch.save(model.state_dict(), logger.file_writer.get_logdir() + '/latest_checkpoint.pth')
                loader = torch.utils.data.DataLoader(trainset, batch_size=opt.batch_size, shuffle=True, drop_last=True)
                for imgs_query, texts, imgs_target in loader:
                    it += 1
                    loss = model.compute_loss(imgs_query.cuda(), list(texts), imgs_target.cuda())
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
    """,
}


@pytest.fixture
def stand_in_checkout(tmp_path, monkeypatch):
    folder = tmp_path / "tirg"
    folder.mkdir()
    for name, source in STAND_IN.items():
        (folder / name).write_text(textwrap.dedent(source))
    for name in MODULES:  # the code imports these by bare name; another package's module is put back afterwards
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield folder
    for name in MODULES:
        sys.modules.pop(name, None)


def test_rate_by_hand():
    seconds = [1.0, 2.0, 3.0, 4.0, 6.0]
    assert rate(seconds, 32, 2, 5) == pytest.approx(32 * 3 / (6.0 - 2.0))
    assert rate(seconds, 32, 0, 5) == pytest.approx(32 * 5 / 6.0)


def test_python2_range_adds():
    assert python2_range(2) + python2_range(1, 3) == [0, 1, 1, 2]


def test_an_old_style_function_runs_its_own_forward_and_backward():
    module = types.ModuleType("legacy_example")

    class Scaled(torch.autograd.Function):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def forward(self, x):
            self.save_for_backward(x)
            return self.scale * x ** 3

        def backward(self, grad):
            x, = self.saved_tensors
            assert not x.requires_grad  # the old API handed plain tensors to backward
            return grad * self.scale * 3 * x ** 2

    Scaled.__module__ = module.__name__
    module.Scaled = Scaled
    assert legacy_functions(module) == [Scaled]
    with pytest.raises(RuntimeError, match="Legacy autograd function"):
        Scaled(2.0)(torch.ones(1, requires_grad=True))
    Scaled.__call__ = call_legacy
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = Scaled(2.0)(x)
    y.sum().backward()
    assert y.tolist() == [2.0, -16.0]
    assert x.grad.tolist() == [6.0, 24.0]  # 2 * 3 * x^2


def test_a_folder_without_the_code_is_named(tmp_path, monkeypatch):
    (tmp_path / "main.py").write_text("")
    with pytest.raises(FileNotFoundError, match="not a checkout of github.com/google/tirg.*datasets.py"):
        load_tirg_code(tmp_path)
    monkeypatch.setattr(sys, "argv", ["official_tirg.py", "--tirg-code", str(tmp_path)])
    with pytest.raises(SystemExit, match="official_tirg.py: .* is not a checkout"):
        official_main()


def test_benchmark_runs_the_stand_in_code_beside_cirlab(monkeypatch, tiny_css, stand_in_checkout, tmp_path,
                                                        one_torch_thread):
    out = tmp_path / "out"
    record = run_benchmark(monkeypatch, "official_tirg", "--tirg-code", str(stand_in_checkout), "--data",
                           str(tiny_css), "--steps", "4", "--short-steps", "3", "--warmup", "1", "--out", str(out))
    assert torch.get_num_threads() == 1  # main.py's set_num_threads(3) undone
    calls = sys.modules["test_retrieval"].CALLS
    assert len(calls) == 1  # the loop's periodic evaluation skipped; the final one on the test split
    assert (out / "official" / "latest_checkpoint.pth").is_file()
    table = rows(record)
    official = table["the TIRG code (float32, two passes)"]
    assert (official["steps"], official["x the code"], official["R@1"], official["R@50"]) == ("4", "1.00", "1.0",
                                                                                             "50.0")
    arithmetic = table["cirlab, the code's arithmetic (float32, two passes)"]
    assert arithmetic["steps"] == "3" and arithmetic["samples/s, whole loop"] == "" and arithmetic["R@1"] == ""
    defaults = table["cirlab defaults"]
    assert defaults["steps"] == "4" and 0.0 <= float(defaults["R@1"]) <= float(defaults["R@50"]) <= 100.0
    assert float(table["cirlab eval"]["seconds"]) > 0
