"""A trimmed Ray wheel that fits the GPU box's 64 MiB carry (the full ray 2.60.0 wheel is 75.6 MiB).

    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d /tmp/ray-full ray==2.60.0
    python -m bench.trim_ray_wheel /tmp/ray-full/ray-2.60.0-cp312-*.whl --out .whl    # 75.6 -> 35.7 MiB
    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl jsonschema jsonschema-specifications referencing rpds-py
        # Ray's one requirement the GPU box's image lacks (0.5 MiB); it has pyarrow, pandas, aiohttp, ...

Then carry `.whl` (device tool: carry=[".whl"], with `/.whl/` in .git/info/exclude) and run
`bash bench/gpu_suite.sh --stages data_wait` (gpu_suite.sh installs .whl/ when Ray is missing).

What goes, and why nothing the suite runs needs it (checked by `--check`, which imports the trimmed copy
and runs a Ray Data pipeline on a local cluster):
  ray/jars/                     Ray's Java workers (30.7 MiB compressed: the bulk of the wheel)
  ray/dashboard/client/build/   the dashboard's web UI (static JS/CSS; the dashboard's Python stays)
  ray/rllib, ray/serve, ray/llm RL, model serving and LLM libraries
  */tests/                      Ray's own tests
and the three native binaries (_raylet.so, raylet, gcs_server) lose their symbol tables
(`strip --strip-unneeded`, when `strip` is on PATH). RECORD is rewritten with the new hashes, so pip
installs the result like any wheel:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/ray-*.whl
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

DROP = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/", "ray/serve/", "ray/llm/")
STRIP = ("ray/_raylet.so", "ray/core/src/ray/raylet/raylet", "ray/core/src/ray/gcs/gcs_server")


def dropped(name: str) -> bool:
    return name.startswith(DROP) or "/tests/" in name


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _stripped(data: bytes) -> bytes:
    if not shutil.which("strip"):
        return data
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
    try:
        subprocess.run(["strip", "--strip-unneeded", f.name], check=True)
        with open(f.name, "rb") as g:
            return g.read()
    finally:
        os.remove(f.name)


def trim(src: str, out_dir: str) -> dict:
    """Write the trimmed wheel (same file name) into out_dir; returns sizes and what was dropped."""
    os.makedirs(out_dir, exist_ok=True)
    dst = os.path.join(out_dir, os.path.basename(src))
    records, kept, gone = [], 0, 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        for info in zin.infolist():
            if info.filename == record or info.is_dir():
                continue
            if dropped(info.filename):
                gone += 1
                continue
            data = zin.read(info)
            if info.filename in STRIP:
                data = _stripped(data)
            zi = zipfile.ZipInfo(info.filename, info.date_time)
            zi.external_attr, zi.compress_type = info.external_attr, zipfile.ZIP_DEFLATED  # keeps +x
            zout.writestr(zi, data)
            records.append(_record_line(info.filename, data))
            kept += 1
        zout.writestr(record, "\n".join(records + [f"{record},,"]) + "\n")
    return {"wheel": dst, "mib_before": round(os.path.getsize(src) / 2**20, 1),
            "mib_after": round(os.path.getsize(dst) / 2**20, 1), "files_kept": kept, "files_dropped": gone,
            "dropped": list(DROP) + ["*/tests/"], "stripped": list(STRIP) if shutil.which("strip") else []}


CHECK = """
import ray, ray.data, sys
assert ray.__file__.startswith(sys.argv[1]), ray.__file__
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
ds = ray.data.range(4096).map_batches(lambda b: {"x": b["id"] * 2}, batch_size=256)
rows = sum(len(b["x"]) for b in ds.iter_batches(batch_size=512))
assert rows == 4096, rows
print("trimmed ray", ray.__version__, "from", ray.__file__, "ok:", rows, "rows through Ray Data")
ray.shutdown()
"""


def check(wheel: str) -> None:
    """Install the wheel into a temporary folder and run a Ray Data pipeline from it (this interpreter's
    other packages; the wheel must match this Python)."""
    with tempfile.TemporaryDirectory(prefix="ray-trimmed-") as site:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", site,
                        wheel], check=True)
        env = {**os.environ, "PYTHONPATH": site + os.pathsep + os.environ.get("PYTHONPATH", "")}
        subprocess.run([sys.executable, "-c", CHECK, site], check=True, env=env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wheel", help="the full ray wheel (pip download ... ray==2.60.0)")
    p.add_argument("--out", default=".whl", help="folder for the trimmed wheel (the device carry's .whl)")
    p.add_argument("--check", action="store_true", help="install it and run a Ray Data pipeline from it "
                                                        "(needs a wheel for this Python)")
    args = p.parse_args(argv)
    res = trim(args.wheel, args.out)
    print(f"{res['wheel']}: {res['mib_before']} -> {res['mib_after']} MiB ({res['files_dropped']} files dropped)")
    if args.check:
        check(res["wheel"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
