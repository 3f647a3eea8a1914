"""Is a Ray head ready to take ``ray job submit``?  Poll, bounded, until it is.

``ray start --head`` returns before the head's dashboard agent (which runs submitted
jobs) is up; a submission in that window fails with ``No available agent to submit job``
(HTTP 500).  Ray's own readiness probes (KubeRay's) ask two HTTP endpoints, and so does
:func:`wait_for_job_agent`:

- the dashboard, ``{dashboard}/api/gcs_healthz``: the job API is served and its GCS is
  alive (a health endpoint: it answers without the cluster's auth token, which
  ``/api/version`` does not);
- the head's agent, ``{agent}/api/local_raylet_healthz``: the agent serves and its raylet
  is alive (the agent registers itself for jobs right after its HTTP server starts; the
  job API then waits up to 10 s for that registration on its own).

Standard library only: usable before Ray or torch are imported.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
DEFAULT_AGENT = "http://127.0.0.1:52365"  # ray start's --dashboard-agent-listen-port


def answers(url: str, expect: str = "", timeout_s: float = 2.0) -> bool:
    """``url`` answers HTTP 200 (and its body contains ``expect``)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200 and expect in response.read().decode(errors="replace")
    except (urllib.error.URLError, OSError, ValueError):
        return False


def job_agent_ready(dashboard: str = DEFAULT_DASHBOARD, agent: str = DEFAULT_AGENT) -> bool:
    return (answers(f"{dashboard.rstrip('/')}/api/gcs_healthz", expect="success")
            and answers(f"{agent.rstrip('/')}/api/local_raylet_healthz", expect="success"))


def wait_for_job_agent(dashboard: str = DEFAULT_DASHBOARD, agent: str = DEFAULT_AGENT,
                       timeout_s: float = 300.0, poll_s: float = 1.0,
                       clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> float:
    """Wait until the head takes jobs; return the seconds waited.

    Raises ``TimeoutError`` naming both addresses after ``timeout_s``.
    """
    start = clock()
    while True:
        if job_agent_ready(dashboard, agent):
            return clock() - start
        if clock() - start >= timeout_s:
            raise TimeoutError(
                f"the Ray head at {dashboard} does not take jobs after {timeout_s:.0f} s "
                f"(its dashboard or its job agent at {agent} does not answer); check "
                "`ray status` and the session's dashboard_agent.log")
        sleep(poll_s)
