"""`transferlab serve`: the Serve application of serving/config.yaml on a local (or $RAY_ADDRESS) Ray.

The convenience over `serve run serving/config.yaml`: the store and port as flags, settings validated
before Ray starts (a bad one is one line and exit 2), and the repository importable by the replicas.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rayjobs.config import ConfigError
from serving.settings import ServeSettings

CONFIG = Path(__file__).resolve().parent / "config.yaml"


def load_serve_config(path: str | Path, overrides: dict[str, Any], max_batch_size: int | None = None
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the config's first application with `http_options`, its validated and resolved settings with
    `overrides` applied). The file is checked against Serve's own schema (`serve deploy` would refuse what
    it refuses); `max_batch_size` replaces both deployments' `user_config.max_batch_size`."""
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema  # lazy: ray only on the cluster path


    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"serve config {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
        app = raw["applications"][0]
    except (yaml.YAMLError, KeyError, IndexError, TypeError) as e:
        raise ConfigError(f"serve config {p}: expected `applications: [...]` ({type(e).__name__}: {e})") from None
    try:
        ServeDeploySchema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"serve config {p}: not a Serve config: {e}".replace("\n", "; ")) from None
    args = {**(app.get("args") or {}), **{k: v for k, v in overrides.items() if v is not None}}
    try:
        settings = ServeSettings.model_validate(args).resolved()
    except ValidationError as e:
        raise ConfigError(f"serve config {p}: {e}".replace("\n", "; ")) from None
    deployments = [dict(d) for d in app.get("deployments") or []]
    known = set(DeploymentSchema.model_fields)
    for d in deployments:  # Serve's schema lets unknown keys through; `serve deploy` would then ignore a typo
        unknown = sorted(set(d) - known)
        if unknown or d.get("name") not in ("Ingress", "Scorer"):
            raise ConfigError(f"serve config {p}: deployment {d.get('name')!r}: "
                              + (f"unknown field(s) {unknown}" if unknown else "no such deployment (Ingress, Scorer)"))
    if max_batch_size is not None:
        for name in ("Ingress", "Scorer"):
            entry = next((d for d in deployments if d.get("name") == name), None)
            if entry is None:
                deployments.append(entry := {"name": name})
            entry["user_config"] = {**(entry.get("user_config") or {}), "max_batch_size": max_batch_size}
    return {**app, "deployments": deployments, "http_options": raw.get("http_options") or {}}, settings.model_dump()


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray's direct ingress (experimental in Ray 2.60): requests skip the HTTP proxy actor, the ingress
    replica itself listens on `port` (the lowest free port of [port, port + 10)). It saves the proxy hop, most
    of Serve's CPU per request on a small model (see bench-serve). Ray still starts a proxy on the head
    node, which the caller puts on another port. No port quarantine: on one node with one application, a
    replaced replica takes the same port again. Must be in the environment of every Ray process, i.e. set
    before Ray starts."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 10), "RAY_SERVE_PORT_QUARANTINE_S": "0"}


def free_port(host: str, port: int = 0) -> int:
    """`port` if it can be bound (else OSError); with 0, any free port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        s.bind((host, port))
        return int(s.getsockname()[1])


def answering_port(host: str, ports: range, timeout_s: float = 120.0) -> int | None:
    """The first of `ports` whose /healthz answers (where the direct-ingress replica listens)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for p in ports:
            try:
                with urllib.request.urlopen(f"http://{host}:{p}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return p
            except OSError:
                continue
        time.sleep(1)
    return None


def _cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    db = args.db or os.environ.get("TRANSFERLAB_DB")
    if db:  # the store given here: its checkpoints are next to it unless --results says otherwise
        overrides.update(db=db, results=args.results or str(Path(db).expanduser().resolve().parent))
    elif args.results:
        overrides["results"] = args.results
    app, settings = load_serve_config(args.config, overrides, args.max_batch_size)
    if args.check:
        print(json.dumps({**settings, "deployments": app["deployments"]}, indent=2))
        return 0
    import ray  # lazy: ray only on the cluster path
    from ray import serve  # lazy: ray only on the cluster path

    from serving.app import application  # lazy: ray only on the cluster path

    http = app["http_options"]
    host, port = args.host or http.get("host", "127.0.0.1"), args.port or http.get("port", 8000)
    address = os.environ.get("RAY_ADDRESS")
    if args.direct_ingress:
        if address or ray.is_initialized():
            raise ConfigError("--direct-ingress starts its own local Ray; on a running cluster start Ray with "
                              "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 instead (see the README)")
        try:
            free_port(host, int(port))
        except OSError as e:
            raise ConfigError(f"--direct-ingress: port {port} on {host} is not free ({e.strerror})") from None
        os.environ.update(direct_ingress_env(int(port)))  # inherited by the Ray processes started below
    if not ray.is_initialized():
        root = str(Path(__file__).resolve().parent.parent)  # replicas import serving/rayjobs/analysis from here
        env = {**((app.get("runtime_env") or {}).get("env_vars") or {}),
               "PYTHONPATH": os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH", "")] if p)}
        ray.init(address=address, runtime_env=None if address else {"env_vars": env})
    name, prefix = app.get("name", "transferlab"), app.get("route_prefix", "/")
    # direct ingress: Ray still starts a proxy on the head node; it gets a free port, the replica gets `port`
    serve.start(http_options={"host": host, "port": free_port(host) if args.direct_ingress else int(port)})
    serve.run(application(settings, app["deployments"]), name=name, route_prefix=prefix)  # returns once the application is ready
    if args.direct_ingress:
        got = answering_port(host, range(int(port), int(port) + 10))
        if got is None:
            print(f"transferlab: the ingress replica does not answer on ports {port}-{int(port) + 9}", flush=True)
            return 1
        port = got
    print(f"transferlab: serving on http://{host}:{port} ({'direct ingress, ' if args.direct_ingress else ''}"
          f"store {settings['db']}); docs at /docs; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        if not address:  # the local Ray started here goes; an application on a cluster stays deployed
            serve.shutdown()
            ray.shutdown()
    return 0


def add_subcommand(sub: Any, default_db: Callable[[], str]) -> None:
    """Register `transferlab serve` on the CLI's subparsers."""
    help_ = "run the Serve application (scoring, completions, source ranking over HTTP; OpenAPI at /docs)"
    p = sub.add_parser("serve", help=help_, description=help_ + f". Without --db: $TRANSFERLAB_DB, else the "
                                                                f"config's store (the CLI default is {default_db()}).")
    p.add_argument("--db", default=None, help="DuckDB results store to answer /v1/rank/sources from")
    p.add_argument("--results", default=None, help="results folder with checkpoints for run:<key> (default: the "
                                                   "db's folder)")
    p.add_argument("--config", default=str(CONFIG), help="Serve config file (default: %(default)s)")
    p.add_argument("--host", default=None, help="HTTP host (default: the config's http_options)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, 8000)")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="requests per dynamic batch, both deployments' user_config (1 = unbatched)")
    p.add_argument("--direct-ingress", action="store_true",
                   help="no HTTP proxy: the ingress replica listens on --port itself (Ray's experimental direct "
                        "ingress; 1.6-1.7x the throughput of a small model on a 2-core CPU, see bench-serve); "
                        "local Ray only")
    p.add_argument("--check", action="store_true", help="validate and print the resolved settings, start nothing")
    p.set_defaults(func=_cmd_serve)
