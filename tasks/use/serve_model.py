"""A registered model over HTTP with a request-size limit: `mlflow models serve`, plus the limit it lacks.

    python -m tasks.use.serve_model --task detection [--model models:/cv-detection@champion] [--port 5001]
    make serve-model TASK=detection

MLflow's own scoring server (``mlflow.pyfunc.scoring_server``: ``/ping``, ``/health``, ``/version`` and
``/invocations``, the same requests and answers as ``mlflow models serve --env-manager local``) runs on
uvicorn behind :class:`BodyLimit`: a request whose body is larger than ``serving.max_request_mb`` gets
HTTP 413 before the model sees it.
Stock ``mlflow models serve`` (MLflow 3.17) has no such setting and accepts any size. Host, port and the
limit come from params.yaml's ``serving`` section.
"""

from __future__ import annotations

import argparse
import json

from tasks.config import load_params


class BodyLimit:
    """ASGI middleware: bodies over ``max_bytes`` get 413 (naming the limit, never echoing the input).

    A body over the limit but under ``DRAIN`` times it is read to its end (keeping no more than the limit) before
    the answer, so that clients which send the whole body first (urllib, requests) read the 413 rather than a reset
    connection. A larger declared length, or one whose client waits for ``Expect: 100-continue``, is refused at
    once, before a byte of the body is read."""

    DRAIN = 4

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = int(headers.get(b"content-length", b"0"))
        if declared > self.max_bytes and (
            declared > self.DRAIN * self.max_bytes or b"100-continue" in headers.get(b"expect", b"")
        ):
            return await self.refuse(send)
        body = await self.read(receive)
        if body is None:
            return await self.refuse(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def read(self, receive) -> bytes | None:
        """The whole body, or None when it is over the limit (read on up to ``DRAIN`` times the limit, then dropped)."""
        chunks, size, more = [], 0, True
        while more and size <= self.DRAIN * self.max_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            size += len(message.get("body", b""))
            if size <= self.max_bytes:
                chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        return b"".join(chunks) if size <= self.max_bytes else None

    async def refuse(self, send) -> None:
        body = json.dumps(
            {
                "error_code": "REQUEST_TOO_LARGE",
                "message": f"request body over {self.max_bytes} bytes (serving.max_request_mb in params.yaml)",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.use.serve_model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", required=True, help="CV task name (a key of tasks: in params.yaml)")
    parser.add_argument("--model", help="an MLflow model URI (default: models:/<registry name>@<registry alias>)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--host", help="default: serving.host")
    parser.add_argument("--port", type=int, help="default: serving.port")
    args = parser.parse_args(argv)

    import mlflow
    import uvicorn
    from mlflow.pyfunc import scoring_server

    from tasks.track.registry import model_name
    from tasks.track.tracking import tracking_uri

    params = load_params(args.params)
    mlflow.set_tracking_uri(tracking_uri(params))
    uri = args.model or f"models:/{model_name(params, args.task)}@{params.registry.alias}"
    app = scoring_server.init(scoring_server.load_model_with_mlflow_config(uri))
    limit = int(params.serving.max_request_mb * 1024 * 1024)
    print(
        f"[serve {args.task}] {uri}; requests over {params.serving.max_request_mb} MB ({limit} bytes) get HTTP 413",
        flush=True,
    )
    uvicorn.run(BodyLimit(app, limit), host=args.host or params.serving.host, port=args.port or params.serving.port)


if __name__ == "__main__":
    main()
