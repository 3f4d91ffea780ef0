"""`omnistream submit` and `omnistream jobs list|status|logs|stop`: the Ray Jobs API.

No torch, deepspeed or mlflow here: a client that only talks to a cluster starts fast.
"""

from __future__ import annotations

import sys

from ._common import add_config

ADDR_HELP = "Ray dashboard address (default $RAY_DASHBOARD_ADDRESS or http://127.0.0.1:8265)"
INSECURE_HELP = "send the Ray token over plain http to a host other than this one (refused without it)"


def register(sub) -> None:
    p = sub.add_parser(
        "submit",
        help="submit a training job to a Ray cluster (Ray Jobs API)",
        description="Validate CONFIG here, resolve its paths, and submit `omnistream train` as a Ray "
        "job whose working directory carries omnistream's code and the resolved config. "
        "Prints the job id; with --follow streams the logs and exits with the job's "
        "outcome (0 SUCCEEDED, 1 otherwise). Paths in the config must be readable from "
        "the cluster (shared disk or s3://...).",
    )
    add_config(p)
    p.add_argument("--address", default="", help=ADDR_HELP)
    p.add_argument(
        "--follow",
        action="store_true",
        help="follow the job to its end: its steps, evaluations and warnings, and the run's page on the "
        "tracking server (the whole log on failure)",
    )
    p.add_argument(
        "--raw", action="store_true", help="with --follow: stream every line of the job's log as Ray writes it"
    )
    p.add_argument("--insecure", action="store_true", help=INSECURE_HELP)
    p.set_defaults(func=submit)
    jb = sub.add_parser("jobs", help="jobs on a Ray cluster").add_subparsers(
        dest="jobs_cmd", required=True, metavar="COMMAND"
    )
    p = jb.add_parser("list", help="every job with its status")
    p.add_argument("--address", default="", help=ADDR_HELP)
    p.add_argument("--insecure", action="store_true", help=INSECURE_HELP)
    p.set_defaults(func=list_jobs)
    for name, hlp, fn in (
        ("status", "one job's status", status),
        ("logs", "one job's logs (--follow to stream)", logs),
        ("stop", "stop a running job", stop),
    ):
        p = jb.add_parser(name, help=hlp)
        p.add_argument("job_id", help="the id `omnistream submit` printed")
        p.add_argument("--address", default="", help=ADDR_HELP)
        p.add_argument("--insecure", action="store_true", help=INSECURE_HELP)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        p.set_defaults(func=fn)


def submit(args) -> int:
    from omnistream.cluster import jobs

    c, job_id = jobs.submit(args.config, args.overrides, args.address, args.insecure)
    print(f"submitted job {job_id}", flush=True)
    if not args.follow:
        return 0
    st = jobs.follow(c, job_id, raw=args.raw)
    print(f"job {job_id} {st}")
    return 0 if st == "SUCCEEDED" else 1


def list_jobs(args) -> int:
    from omnistream.cluster import jobs

    c = jobs.client(args.address, args.insecure)
    for j in jobs._call(args.address, c.list_jobs):
        print(f"{j.submission_id or j.job_id}\t{str(j.status).split('.')[-1]}\t{j.entrypoint}")
    return 0


def status(args) -> int:
    from omnistream.cluster import jobs

    c = jobs.client(args.address, args.insecure)
    print(str(jobs._call(args.address, c.get_job_status, args.job_id)).split(".")[-1])
    return 0


def logs(args) -> int:
    from omnistream.cluster import jobs

    c = jobs.client(args.address, args.insecure)
    if args.follow:
        return 0 if jobs.follow(c, args.job_id) == "SUCCEEDED" else 1
    sys.stdout.write(jobs._call(args.address, c.get_job_logs, args.job_id))
    return 0


def stop(args) -> int:
    from omnistream.cluster import jobs

    c = jobs.client(args.address, args.insecure)
    stopped = jobs._call(args.address, c.stop_job, args.job_id)
    print(f"job {args.job_id} {'stopping' if stopped else 'was not running'}")
    return 0
