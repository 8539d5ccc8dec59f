"""A real S3-protocol server on loopback for tests: moto in server mode, in a child process.

    with S3Server() as s3:
        s3.client("s3").create_bucket(Bucket="store")
        ... dvc remote modify <name> endpointurl s3.endpoint ...

moto's `ThreadedMotoServer` runs in a child process bound to 127.0.0.1 on a free port (the child
prints the port; the parent waits for it, bounded in time). A child process rather than a thread
because `enforce_auth()` flips moto's process-wide settings, which must not leak into other tests,
and because the child dies with its stdin: a crashed test cannot leave a server behind.

Extras for tests, on control paths under `/__test__/` that the child answers itself:
- `enforce_auth()`: from now on every request must be signed with an access key that exists in
  moto's IAM (`make_user()` creates one with full rights before enforcing); any other key gets
  `403 InvalidAccessKeyId`, as on AWS.
- `hold_puts_after(n)`: the first `n` object uploads (PUT with a key) go through; later ones are
  held, unanswered and unstored, until `release()` (or `stop()`) answers them `503 SlowDown`:
  kill the client meanwhile and you have a push interrupted part-way, with uploads in flight.
  `stats()` says how many uploads were stored and how many are being held.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Self

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
START_TIMEOUT_S = 60
HOLD_LIMIT_S = 300  # a held upload is let through after this long, whatever happens

_CHILD = r"""
import sys, threading, json
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server import threaded_moto_server as tms

HOLD_LIMIT_S = float(sys.argv[1])
lock = threading.Lock()
state = {"hold_after": None, "puts": 0, "held": 0}
gate = threading.Event()
gate.set()


def is_object_upload(environ):
    parts = [p for p in environ.get("PATH_INFO", "").split("/") if p]
    return environ.get("REQUEST_METHOD") == "PUT" and len(parts) >= 2


def wrap(app):
    def control(environ, start_response):
        path = environ["PATH_INFO"]
        if path.startswith("/__test__/hold/"):
            with lock:
                state["hold_after"] = int(path.rsplit("/", 1)[1])
                if state["puts"] >= state["hold_after"]:
                    gate.clear()
        elif path == "/__test__/release":
            with lock:
                state["hold_after"] = None
            gate.set()
        with lock:
            body = json.dumps(state).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def middleware(environ, start_response):
        if environ.get("PATH_INFO", "").startswith("/__test__/"):
            return control(environ, start_response)
        if not is_object_upload(environ):
            return app(environ, start_response)
        with lock:
            held = not gate.is_set()
            state["held"] += held
        if held:  # answered 503 once released: an upload in flight when the client died never lands
            gate.wait(HOLD_LIMIT_S)
            with lock:
                state["held"] -= 1
            body = b"<Error><Code>SlowDown</Code><Message>held by the test, then dropped</Message></Error>"
            start_response("503 Service Unavailable", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        status = []

        def recording_start_response(s, headers, exc_info=None):
            status.append(s)
            return start_response(s, headers, exc_info)

        result = app(environ, recording_start_response)
        if status and status[0].startswith("200"):
            with lock:
                state["puts"] += 1
                if state["hold_after"] is not None and state["puts"] >= state["hold_after"]:
                    gate.clear()
        return result

    return middleware


class GatedServer(ThreadedMotoServer):
    def _server_entry(self):
        app = tms.DomainDispatcherApplication(tms.create_backend_app)
        self._server = tms.make_server(self._ip_address, self._port, wrap(app), True, request_handler=tms.MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()


server = GatedServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print("PORT", server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the parent closes our stdin (stop() or the parent dying)
gate.set()
server.stop()
"""  # noqa: E501 (the child's source: code in a string, kept as the child runs it)


@dataclass
class Stats:
    puts: int  # object uploads answered 200
    held: int  # uploads waiting at the gate right now


class S3Server:
    """moto's S3 (and IAM) on http://127.0.0.1:<free port>, in a child process."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }
        env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)  # auth is off until enforce_auth()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(HOLD_LIMIT_S)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        line = ""
        while time.monotonic() < deadline and self._proc.poll() is None:
            ready, _, _ = select.select([self._proc.stdout], [], [], 0.2)
            if ready:
                line = self._proc.stdout.readline()
                break
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"moto server did not start on 127.0.0.1 within {START_TIMEOUT_S}s (got {line!r})")
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.stdin.close()
                proc.wait(timeout=20)
        except (subprocess.TimeoutExpired, OSError):
            proc.kill()
            proc.wait(timeout=20)
        finally:
            proc.stdout.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- clients and controls -----------------------------------------------------------------

    def client(self, service: str = "s3", key: str = ACCESS_KEY, secret: str = SECRET_KEY):
        import boto3

        return boto3.client(
            service, endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=key, aws_secret_access_key=secret
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under `prefix` (with the server's default test credentials)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def make_user(self, name: str = "pusher") -> tuple[str, str]:
        """An IAM user allowed everything; returns its (access key id, secret)."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName=name, PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def enforce_auth(self) -> None:
        """From now on, only requests signed with an IAM user's key (`make_user`) are served."""
        self._post("/moto-api/reset-auth", b"0")

    def hold_puts_after(self, n: int) -> None:
        self._post(f"/__test__/hold/{n}")

    def release(self) -> None:
        self._post("/__test__/release")

    def stats(self) -> Stats:
        state = json.loads(self._post("/__test__/stats"))
        return Stats(puts=state["puts"], held=state["held"])

    def _post(self, path: str, data: bytes = b"") -> bytes:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
        with opener.open(
            urllib.request.Request(
                self.endpoint + path, data=data, method="POST", headers={"Content-Type": "text/plain"}
            ),
            timeout=30,
        ) as resp:
            return resp.read()
