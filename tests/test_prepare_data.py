"""jobs.prepare_data end to end: the real CLI in a subprocess, each run with its own local Ray (2 CPUs).

An ImageFolder tree of tiny PNGs with one corrupt file (skip mode names and counts it; fail mode
exits non-zero naming it), and an IDX pair converted with the expected count and padding.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shortcut_ray import shards
from tests.test_data import write_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "jobs.prepare_data", "--num-cpus", "2", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def image_folder(tmp_path):
    """root/{cat,dog}/ with non-square PNG/JPEG images of different sizes, one corrupt, one non-image."""
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (root / name / "nested").mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, (20 + 4 * i, 30, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
        Image.fromarray(np.full((12, 12, 3), 99, np.uint8)).save(root / name / "nested" / "x.jpg")
    corrupt = root / "dog" / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (root / "cat" / "notes.txt").write_text("ignored: not an image extension")
    return root, str(corrupt)


def test_imagefolder_skip_counts_and_names_the_corrupt_file(image_folder, tmp_path):
    root, corrupt = image_folder
    out = str(tmp_path / "out")
    r = run_cli("--input", str(root), "--output", out, "--image-size", "8", "--shard-size", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"skipped unreadable image {corrupt}" in r.stdout + r.stderr
    info = shards.verify_shards(out)  # checksums match the bytes
    assert info["count"] == 8 and info["skipped"] == 1
    assert info["skipped_files"][0]["path"] == corrupt
    assert info["classes"] == ["cat", "dog"] and info["class_counts"] == [4, 4]
    assert (info["image_size"], info["channels"], info["kind"]) == (8, 3, "pixels")
    assert [s["rows"] for s in info["shards"]] == [3, 3, 2]
    img = pq.read_table(os.path.join(out, "part-00000.parquet")).column("image")[0].as_py()
    with Image.open(io.BytesIO(img)) as im:
        assert im.size == (8, 8) and im.mode == "RGB"


def test_imagefolder_fail_mode_exits_nonzero_naming_the_file(image_folder, tmp_path):
    root, corrupt = image_folder
    out = str(tmp_path / "out")
    r = run_cli("--input", str(root), "--output", out, "--image-size", "8", "--on-error", "fail")
    assert r.returncode != 0
    assert corrupt in r.stderr and "--on-error skip" in r.stderr
    assert not os.path.exists(os.path.join(out, "manifest.json"))  # no half dataset that looks complete


def test_idx_conversion(tmp_path):
    src = tmp_path / "mnist"
    src.mkdir()
    imgs = np.full((50, 28, 28), 255, np.uint8)
    write_idx(src / "train-images-idx3-ubyte.gz", imgs, gz=True)
    write_idx(src / "train-labels-idx1-ubyte.gz", (np.arange(50) % 10).astype(np.uint8), gz=True)
    out = str(tmp_path / "out")
    r = run_cli("--input", str(src), "--output", out, "--image-size", "32", "--shard-size", "20")
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.load(open(os.path.join(out, "manifest.json")))
    assert info["count"] == 50 and info["skipped"] == 0 and info["num_classes"] == 10
    assert info["class_counts"] == [5] * 10 and info["channels"] == 1 and info["source_image_size"] == 28
    assert [s["rows"] for s in info["shards"]] == [20, 20, 10]
    img = pq.read_table(os.path.join(out, "part-00001.parquet")).column("image")[3].as_py()
    with Image.open(io.BytesIO(img)) as im:
        a = np.asarray(im)
    assert a.shape == (32, 32) and (a[2:30, 2:30] == 255).all() and a[:2].max() == 0  # padded, not resized
