"""The whole `mlcseg run` with the images and the run folder in a bucket, against the same run on local disk,
side by side in one run. The bucket is moto's S3 server in its own process on loopback (no network latency: this
measures what the tool adds on a store — requests, serialisation, listings — not a real store's round trips).

    python bench/object_storage.py [--n 59] [--max-side 512] [--backbone random-vit-s8]
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import VOC_IMAGES, machine

MLCSEG = [sys.executable, "-m", "mlcseg_ray.cli", "run", "--json"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], env: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    res = subprocess.run(MLCSEG + args, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"run failed ({res.returncode}): {res.stderr[-2000:]}")
    return seconds, {s["stage"]: s["seconds"] for s in json.loads(res.stdout)["stages"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=59)
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--backbone", default="random-vit-s8")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlcseg-s3bench-"))
    images = work / "images"
    images.mkdir()
    for p in sorted(VOC_IMAGES.glob("*.jpg"))[: args.n]:
        shutil.copy(p, images / p.name)
    port = _port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        client = boto3.client("s3", endpoint_url=url, aws_access_key_id="b", aws_secret_access_key="b")
        for _ in range(100):
            try:
                client.create_bucket(Bucket="bench")
                break
            except Exception:
                time.sleep(0.1)
        for p in sorted(images.iterdir()):
            client.upload_file(str(p), "bench", f"images/{p.name}")
        config = [f"backbone={args.backbone}", f"max_side={args.max_side}"]
        local_s, local_stages = _run(["--images", str(images), "--out", str(work / "run"), *config], env)
        remote_s, remote_stages = _run(["--images", "s3://bench/images/", "--out", "s3://bench/run", *config], env)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    print(machine())
    print(f"{args.n} VOC photos, {args.backbone}, max_side {args.max_side}, defaults otherwise")
    print(f"{'stage':10s} {'local s':>9s} {'bucket s':>9s} {'ratio':>6s}")
    for stage in local_stages:
        lo, re = local_stages[stage], remote_stages.get(stage, float("nan"))
        print(f"{stage:10s} {lo:9.1f} {re:9.1f} {re / lo if lo else float('nan'):6.2f}")
    print(f"{'command':10s} {local_s:9.1f} {remote_s:9.1f} {remote_s / local_s:6.2f}")


if __name__ == "__main__":
    main()
