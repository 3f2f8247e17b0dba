"""The requests a whole `mlcseg run` makes to a bucket: its images and its run folder in moto's S3 server (in this
process, on loopback), every request counted from the server's own log, by method and by what it asked for.
``--before DIR`` runs the same command with an older checkout's package first (``git worktree add DIR REV``), side
by side. ``--inputs``: the images alone (the run folder local), as loose files, as WebDataset tars of 8 and as one
Parquet file side by side, the requests for them counted per image, for ingest + extract and for the rest of the run.

    python bench/bucket_requests.py [--n 4] [--shard-size 1] [--before DIR]
    python bench/bucket_requests.py --inputs --n 24 --shard-size 8
"""

import argparse
import collections
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import VOC_IMAGES, machine
from object_storage import _port

CONFIG = ["backbone=random-vit-tiny", "max_side=96", "num_classes=3", "num_categories=2"]


class Requests(logging.Handler):
    """werkzeug's access lines ("GET /bucket/key?query HTTP/1.1" 200 -), kept."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # werkzeug colours some status codes' lines (206 for a ranged GET): the escapes dropped
        self.lines.append(re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()))


def kind(line: str) -> str | None:
    m = re.search(r'"(\w+) (\S+) HTTP', line)
    if not m:
        return None
    method, target = m.groups()
    path, _, query = target.partition("?")
    if method == "GET" and "list-type" in query:
        return "LIST"
    what = re.sub(r"\d{5}", "N", path.split("/", 3)[-1] if path.count("/") >= 3 else path)
    what = re.sub(r"^(masks|binary)/.*", r"\1/<image>", what)
    return f"{method} {what}"


def image_kind(line: str) -> str | None:
    """A request for the images: its method and what it names (the access log does not show a Range header)."""
    m = re.search(r'"(\w+) /photos/(\S+) HTTP', line)
    if not m:
        return None
    method, target = m.groups()
    if "list-type" in target:
        return "LIST"
    name = "*.tar" if ".tar" in target else "*.parquet" if ".parquet" in target else "<image>"
    return f"{method} {target.split('/', 1)[0]}/{name}"


def packed_inputs(s3, photos: list[Path]) -> dict[str, str]:
    """The photos as loose objects, as tars of 8 and as one Parquet file (row groups of 8)."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    for p in photos:
        s3.upload_file(str(p), "photos", f"set/{p.name}")
    for n, i in enumerate(range(0, len(photos), 8)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for p in photos[i : i + 8]:
                tar.add(p, arcname=p.name)
        s3.put_object(Bucket="photos", Key=f"tars/part-{n:03d}.tar", Body=buf.getvalue())
    buf = io.BytesIO()
    table = pa.table({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in photos]})
    pq.write_table(table, buf, row_group_size=8)
    s3.put_object(Bucket="photos", Key="hub/train.parquet", Body=buf.getvalue())
    return {
        "folder": "--images s3://photos/set/",
        "tars": "--webdataset s3://photos/tars/",
        "parquet": "--parquet s3://photos/hub/",
    }


def count_inputs(s3, requests: Requests, env: dict, n: int, shard_size: int) -> None:
    import tempfile

    inputs = packed_inputs(s3, sorted(VOC_IMAGES.glob("*.jpg"))[:n])
    work = Path(tempfile.mkdtemp(prefix="bucket_requests_"))
    for label, given in inputs.items():
        out = work / label
        for command, args in (("extract", given.split()), ("run", [])):
            requests.lines.clear()
            cmd = [sys.executable, "-m", "mlcseg_ray.cli", command, *args, "--out", str(out), *CONFIG]
            res = subprocess.run([*cmd, f"shard_size={shard_size}"], capture_output=True, text=True, env=env)
            if res.returncode != 0:
                sys.exit(f"{command} failed ({res.returncode}): {res.stderr[-2000:]}")
            kinds = collections.Counter(k for k in map(image_kind, requests.lines) if k)
            what = "ingest + extract" if command == "extract" else "refine, describe, label, report"
            print(f"{label} ({given}), {what}: {sum(kinds.values())} requests for {n} images")
            for k, v in kinds.most_common():
                print(f"{v:6d}  {k}  ({v / n:.2f} an image)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--shard-size", type=int, default=1)
    ap.add_argument("--before", type=Path, help="an older checkout whose package runs first, for comparison")
    ap.add_argument("--inputs", action="store_true", help="the images' requests as files, tars and Parquet")
    args = ap.parse_args()
    print(f"# {machine()}")
    port = _port()
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    requests = Requests()
    logging.getLogger("werkzeug").setLevel(logging.INFO)
    logging.getLogger("werkzeug").addHandler(requests)
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
            region_name="us-east-1",
        )
        for bucket in ("photos", "runs"):
            s3.create_bucket(Bucket=bucket)
        if args.inputs:
            count_inputs(s3, requests, env, args.n, args.shard_size)
            return
        for p in sorted(VOC_IMAGES.glob("*.jpg"))[: args.n]:
            s3.upload_file(str(p), "photos", f"set/{p.name}")
        for label, code in ([("before", args.before)] if args.before else []) + [("now", None)]:
            requests.lines.clear()
            out = f"s3://runs/{label}"
            run_env = {**env, "PYTHONPATH": str(code)} if code else env
            cmd = [sys.executable, "-m", "mlcseg_ray.cli", "run", "--images", "s3://photos/set/", "--out", out]
            t0 = time.perf_counter()
            res = subprocess.run(
                [*cmd, *CONFIG, f"shard_size={args.shard_size}"],
                capture_output=True,
                text=True,
                env=run_env,
                cwd=code or Path.home(),  # `python -m` puts the working directory first on the path
            )
            seconds = time.perf_counter() - t0
            if res.returncode != 0:
                sys.exit(f"run failed ({res.returncode}): {res.stderr[-2000:]}")
            kinds = collections.Counter(k for k in map(kind, requests.lines) if k)
            total = sum(kinds.values())
            print(f"{label}: {args.n} images, shard_size {args.shard_size}: {total} requests in {seconds:.1f} s")
            for k, v in kinds.most_common(12):
                print(f"{v:6d}  {k}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
