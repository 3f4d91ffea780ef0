"""`omnistream cluster up|down`: a local Ray head to submit jobs to (127.0.0.1 only, token auth)."""

from __future__ import annotations

import json


def register(sub) -> None:
    cl = sub.add_parser("cluster", help="a local Ray head to submit jobs to").add_subparsers(
        dest="cluster_cmd", required=True, metavar="COMMAND"
    )
    p = cl.add_parser(
        "up",
        help="start a Ray head on this machine (127.0.0.1 only, token authentication)",
        description="Start a Ray head whose servers all listen on 127.0.0.1, with Ray's token "
        "authentication on (the token: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or "
        "~/.ray/auth_token, created if missing). Also starts an MLflow "
        "tracking server on 127.0.0.1 (SQLite, artifacts proxied) that submitted jobs "
        "log to. Prints the dashboard address to submit to and where the token is.",
    )
    p.add_argument("--port", type=int, default=6379, help="GCS port (default 6379)")
    p.add_argument("--dashboard-port", type=int, default=8265, help="dashboard / Jobs API port (default 8265)")
    p.add_argument("--num-cpus", type=int, default=0, help="CPUs the head offers (default: all)")
    p.add_argument("--resources", default="", help="custom resources as JSON, e.g. '{\"data\": 1}'")
    p.add_argument(
        "--mlflow-port",
        type=int,
        default=5000,
        help="port of the MLflow tracking server started with the head (default 5000, or a free one); "
        "`omnistream submit` logs jobs there unless the config names tracking.uri",
    )
    p.add_argument(
        "--tracking-auth",
        action="store_true",
        help="protect the MLflow tracking server with MLflow's basic auth (a user and password made "
        "once, kept mode 0600 in its store; submitted jobs get them). Without it the server "
        "answers every process on this machine, so every local user can read and change runs "
        "and register models: use it on a machine others log in to",
    )
    p.add_argument(
        "--artifacts",
        default="",
        metavar="URL",
        help="where the tracking server keeps run artifacts (images, WAVs, models), e.g. "
        "s3://bucket/mlflow with the AWS environment (AWS_ENDPOINT_URL, credentials) set for "
        "`cluster up`; default: its store on this machine",
    )
    p.set_defaults(func=up)
    p = cl.add_parser("down", help="stop the head `cluster up` started (its own processes only)")
    p.add_argument("--port", type=int, default=6379, help="GCS port it was started on (default 6379)")
    p.set_defaults(func=down)


def up(args) -> int:
    from omnistream.cluster import head
    from omnistream.common.errors import UserError

    try:
        res = json.loads(args.resources) if args.resources else None
    except ValueError:
        raise UserError(f"--resources must be JSON, e.g. '{{\"data\": 1}}', not {args.resources!r}") from None
    info = head.cluster_up(
        args.port, args.dashboard_port, args.num_cpus, res, args.mlflow_port, args.tracking_auth, args.artifacts
    )
    t = info["tracking"]
    guard = (
        f"basic auth: user and password in {t['credentials']}"
        if t.get("credentials")
        else "no authentication: every user of this machine can use it (--tracking-auth protects it)"
    )
    print(
        f"Ray head up on {info['address']} (127.0.0.1 only, token authentication on)\n"
        f"  dashboard / Jobs API: {info['dashboard']}\n  token: {info['token_path']}\n"
        f"  MLflow tracking server: {t['uri']} (store: {t['dir']}; {guard}); submitted jobs log there\n"
        f"  submit:  omnistream submit CONFIG --address {info['dashboard']} --follow\n"
        f"  Ray's own CLI needs token mode: RAY_AUTH_MODE=token ray job list --address {info['dashboard']}\n"
        f"  stop:    omnistream cluster down --port {args.port}"
    )
    return 0


def down(args) -> int:
    from omnistream.cluster import head

    n, recorded = head.cluster_down(args.port)
    print(
        f"stopped the head on port {args.port} ({n} processes)"
        if recorded
        else f"stopped a head of ours on port {args.port} that had no record ({n} processes)"
    )
    return 0
