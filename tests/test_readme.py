"""Every command in the README's shell blocks runs, as written, in a fresh folder, and does what the README
says it does; so the door a newcomer walks through never rots.

`cirlab` commands run in this process (the same `main` the console script calls). So that they take seconds,
`data make-css` gets `--families 4` (a small dataset of the same kind) and training commands
`--set train.iterations=N`. `serve` starts the real server on a free port
(the README's port may be taken), and `curl` is sent to that port.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

from cirlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
CIRLAB = ".venv/bin/cirlab"


def readme_commands() -> list[list[str]]:
    """The README's shell commands, continuation lines joined and comments dropped; `make` lines are the two
    set-up commands, which are `make test` itself and the demo (tests/test_end_to_end.py runs `cirlab demo`)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] != "make":
                commands.append(words)
    return commands


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, server.communicate()[0]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.3)
    raise TimeoutError(url)


def test_the_readme_shows_the_three_quick_starts():
    subcommands = [" ".join(words[1:3]) for words in readme_commands() if words[0] == CIRLAB]
    for expected in ("data make-css", "train --config", "eval runs/tirg/best", "index build", "search runs/index",
                     "serve runs/index", "explain runs/tirg/best"):
        assert any(command.startswith(expected) for command in subcommands), expected


def send_curl(words: list[str]) -> str:
    """Run a `curl -F name=value ... URL` line; where curl is not installed, send the same form with httpx."""
    if shutil.which("curl"):
        return subprocess.run(words, capture_output=True, text=True, check=True).stdout
    fields = [words[i + 1].split("=", 1) for i, word in enumerate(words) if word == "-F"]
    response = httpx.post("http://" + words[-1].removeprefix("http://"),
                          files=[(name, (None, value)) for name, value in fields])  # multipart, as curl -F sends
    response.raise_for_status()
    return response.text


def test_every_readme_command_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    port = free_port()
    server = None
    steps = iter([2, 4])  # the first run trains 2 steps, the resumed one continues to 4
    try:
        for words in readme_commands():
            if words[0] == "curl":
                words = [word.replace("localhost:8000", f"localhost:{port}") for word in words]
                wait_for(f"http://127.0.0.1:{port}/health", server)
                assert len(json.loads(send_curl(words))["results"]) == 5
                continue
            assert words[0] == CIRLAB, f"the README shows a command this test cannot run: {shlex.join(words)}"
            args = words[1:]
            if args[0] == "serve":
                args = [word if word != "8000" else str(port) for word in args]
                server = subprocess.Popen([sys.executable, "-m", "cirlab", *args], stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True,
                                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
                continue
            if args[:2] == ["data", "make-css"]:
                args += ["--families", "4"]  # a few edit trees instead of the demo preset's hundreds
            if args[0] == "train":
                iterations = next(steps)
                args += ["--set", f"train.iterations={iterations}", "--set", f"train.eval_every={iterations}"]
            assert main(args) == 0, shlex.join(words)
            printed = capsys.readouterr().out
            check_effect(args, printed, tmp_path)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def check_effect(args: list[str], printed: str, work: Path) -> None:
    """What the README says each command gives."""
    command = " ".join(args[:2])
    if command == "data make-css":
        assert (work / "data/css/generation.json").is_file()
    elif command == "data check":
        assert "data/css: 0 problem(s) found (css format)" in printed, printed
    elif command == "train --config":
        assert (work / "runs/tirg/best/model.safetensors").is_file()
        steps = [int(arg.split("=")[1]) for arg in args if arg.startswith("train.iterations=")][-1]
        assert json.loads((work / "runs/tirg/last/trainer.json").read_text())["step"] == steps
    elif command == "data make-circo":
        assert (work / "data/circo/generation.json").is_file()
    elif command == "eval runs/tirg/best" and "data.format=circo" in args:
        result = json.loads((work / "runs/tirg/eval-circo-val.json").read_text())
        assert result["queries"] == 30 and {"mAP@10", "R@5"} <= set(result["metrics"])
    elif command == "eval runs/tirg/best" and "--explain" not in args:
        metrics = json.loads((work / "runs/tirg/eval-test.json").read_text())
        assert "protocol" in json.dumps(metrics) and (work / "runs/tirg/eval-test.md").is_file()
    elif command == "eval runs/tirg/best":
        assert "pointing game" in (work / "runs/tirg/eval-test.md").read_text()
    elif command == "models":
        assert {"tirg", "cmap", "offset"} <= set(printed.split())
    elif command == "index info":
        assert "runs/tirg/best" in printed
    elif args[0] == "search" and "--json" in args:
        assert len(json.loads(printed)) == 5
    elif args[0] == "search" and "--explain" in args:
        assert Image.open(work / args[args.index("--explain") + 1]).size[0] > 0
    elif args[0] == "explain":
        assert Image.open(work / args[args.index("--out") + 1]).size[0] > 0


def test_every_relative_link_of_the_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [f"{page.relative_to(ROOT)}: {target}"
              for page in pages for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
              if not target.startswith(("http://", "https://")) and not (page.parent / target).exists()]
    assert broken == []
    linked = set(re.findall(r"\]\(docs/([^)#]+)\)", (ROOT / "README.md").read_text()))
    assert {page.name for page in pages[1:]} <= linked  # every docs/ page is reachable from the README
