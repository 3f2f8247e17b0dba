"""A real S3 API server on loopback (moto's server mode, what s3fs tests against) and the environment a client
reaches it with: the standard AWS variables, nothing mocked in the client library."""

import contextlib
import logging
import socket
import threading

import boto3
from moto.server import ThreadedMotoServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 on 127.0.0.1; ``stop()`` and ``start()`` again keep the buckets (moto's state lives in this
    process, not in the server thread), as a store that went away and came back."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self._server = None
        self.client = boto3.client(
            "s3", endpoint_url=self.url, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
        )

    def start(self) -> None:
        import s3fs

        # fsspec keeps one client per set of options in a process, whatever the environment says now: a client
        # made for another test's server (gone) must not be reused
        s3fs.S3FileSystem.clear_instance_cache()
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def upload(self, folder, bucket: str, prefix: str) -> None:
        with contextlib.suppress(self.client.exceptions.BucketAlreadyOwnedByYou):
            self.client.create_bucket(Bucket=bucket)
        for p in sorted(folder.iterdir()):
            self.client.upload_file(str(p), bucket, f"{prefix}/{p.name}")

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object under ``prefix``, by key relative to it."""
        out = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                out[o["Key"][len(prefix) :].lstrip("/")] = self.client.get_object(Bucket=bucket, Key=o["Key"])[
                    "Body"
                ].read()
        return out

    def copy(self, bucket: str, prefix: str, to: str) -> None:
        """Every object under ``prefix/`` copied under ``to/`` (server-side): a run folder copied in the bucket."""
        for key in self.keys(bucket, prefix + "/"):
            self.client.copy_object(
                Bucket=bucket, Key=to + key[len(prefix) :], CopySource={"Bucket": bucket, "Key": key}
            )

    def read(self, bucket: str, key: str) -> bytes:
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


class FlakyProxy:
    """A loopback HTTP proxy in front of the S3 server that answers every ``every``-th request with S3's throttling
    reply (503 SlowDown) instead of passing it on: what a busy bucket does to a client. ``every=0``: it passes every
    request on, and only counts them (``log``: method, path and Range header of each)."""

    SLOW_DOWN = (
        b'<?xml version="1.0" encoding="UTF-8"?>'
        b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
    )

    def __init__(self, target_port: int, every: int = 4) -> None:
        import http.client
        import itertools
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        counter, proxy = itertools.count(1), self
        self.refused = 0
        self.requests = 0  # every request that reached the proxy, refused or passed on
        self.log: list[tuple[str, str, str | None]] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            def _any(self) -> None:
                body = self._body()
                proxy.requests = n = next(counter)
                proxy.log.append((self.command, self.path, self.headers.get("Range")))
                if every and n % every == 0:
                    proxy.refused += 1
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(FlakyProxy.SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(FlakyProxy.SLOW_DOWN)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FlakyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
