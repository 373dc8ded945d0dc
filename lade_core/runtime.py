"""Process-level setup shared by the pipelines: Ray connection."""
from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS / ``address`` (as under ``ray job submit``) or start a local Ray.

    A local Ray gets ``num_cpus`` logical CPUs: on small machines give it more than the training workers reserve,
    or Ray Data's read/decode tasks get no CPU and the pipeline stalls.
    """
    import ray

    # Ray >= 2.59 may enable token auth by default; a local dev cluster runs without unless the user set it.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # The dashboard serves Ray's state API, which Ray Train V2 uses to release a finished or killed run's
        # placement group; without it, each trainer run under Tune leaks its workers' CPUs until Ray stops.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)


def local_num_cpus(requested: int | None, reserved: float) -> int:
    """Logical CPUs for a local Ray: ``requested`` if given, else this machine's cores (at least what training
    ``reserved``) plus 2, so Ray Data's read/decode tasks always have CPUs beside the training workers.

    Decide it once, before anything starts Ray: the first ``init_ray`` fixes the cluster's size.
    """
    return int(requested or max(os.cpu_count() or 1, reserved) + 2)
