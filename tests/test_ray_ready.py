"""freetf.training.ray_ready: polling a Ray head's job API and agent, bounded."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from freetf.cli import main
from freetf.training.ray_ready import answers, job_agent_ready, wait_for_job_agent

pytestmark = pytest.mark.timeout(60)


class FakeHead:
    """A dashboard + agent on loopback, under ``prefix`` (a proxy's path): the agent
    answers 'success' after ``late`` polls."""

    def __init__(self, late: int = 0, agent_body: str = "raylet: success\ngcs: success",
                 gcs_body: str = "success", prefix: str = ""):
        self.polls = {"version": 0, "health": 0}
        head = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path == f"{prefix}/api/gcs_healthz":
                    head.polls["version"] += 1
                    self._send(200, gcs_body)
                elif self.path == f"{prefix}/api/version":  # needs the cluster's token
                    self._send(401, "Unauthorized")
                elif self.path == f"{prefix}/api/local_raylet_healthz":
                    head.polls["health"] += 1
                    ready = head.polls["health"] > late
                    self._send(200 if ready else 503, agent_body if ready else "starting")
                else:
                    self._send(404, "no")

            def _send(self, code, body):
                self.send_response(code)
                self.end_headers()
                self.wfile.write(body if isinstance(body, bytes) else body.encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{prefix}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def head():
    heads = []

    def make(**kw):
        heads.append(FakeHead(**kw))
        return heads[-1]
    yield make
    for h in heads:
        h.close()


def bounded(sleeps, most=20):
    """A fake sleep that records its argument and fails the test past ``most`` polls
    (a wait that never ends fails at once, not at the test's timeout)."""
    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) > most:
            pytest.fail(f"still polling after {most} polls")
    return sleep


def test_answers_needs_200_and_the_expected_body(head):
    h = head(agent_body="raylet: failed")
    assert answers(f"{h.url}/api/gcs_healthz", expect="success")
    assert answers(f"{h.url}/api/gcs_healthz")  # any body by default
    # a body that is not UTF-8 is read with replacement characters, not an error
    garbled = head(agent_body=b"\xff\xfe raylet: success")
    assert answers(f"{garbled.url}/api/local_raylet_healthz", expect="success")
    assert not answers(f"{h.url}/api/version")  # 401
    assert not answers(f"{h.url}/missing")  # 404
    assert answers(f"{h.url}/api/local_raylet_healthz", expect="raylet")
    assert not answers(f"{h.url}/api/local_raylet_healthz", expect="success")
    assert not answers("http://127.0.0.1:1/api/version")  # nothing listens
    assert not answers("not a url")


def test_answers_waits_two_seconds_by_default(monkeypatch):
    import urllib.request

    asked = []

    def urlopen(url, timeout):
        asked.append(timeout)
        raise OSError("refused")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    assert not answers("http://127.0.0.1:1/api/gcs_healthz")
    assert not answers("http://127.0.0.1:1/api/gcs_healthz", timeout_s=0.5)
    assert asked == [2.0, 0.5]


def test_ready_needs_both_the_dashboard_and_the_agent(head):
    h = head()
    assert job_agent_ready(h.url, h.url)
    assert not job_agent_ready("http://127.0.0.1:1", h.url)
    assert not job_agent_ready(h.url, "http://127.0.0.1:1")


def test_ready_needs_both_to_say_success(head):
    assert not job_agent_ready(head(gcs_body="unhealthy").url, head().url)
    assert not job_agent_ready(head().url, head(agent_body="raylet: failed").url)


def test_addresses_may_end_with_a_slash_or_a_path(head):
    h = head(prefix="/headX")
    assert job_agent_ready(h.url, h.url)
    assert job_agent_ready(f"{h.url}/", f"{h.url}/")
    assert not job_agent_ready(h.url[:-1], h.url)  # "/head" is not "/headX"


def test_wait_polls_until_the_agent_answers(head):
    h = head(late=3)
    sleeps, now = [], [100.0]

    def sleep(seconds):
        bounded(sleeps)(seconds)
        now[0] += seconds
    waited = wait_for_job_agent(h.url, h.url, timeout_s=60, poll_s=0.25, sleep=sleep,
                                clock=lambda: now[0])
    assert sleeps == [0.25] * 3 and h.polls["health"] == 4
    assert waited == 0.75


def test_wait_asks_the_given_dashboard_and_agent(head):
    """A dashboard that answers only as an agent would (or the reverse) is not enough."""
    dashboard, agent = head(agent_body="no"), head(gcs_body="no")
    sleeps = []
    assert wait_for_job_agent(dashboard.url, agent.url, sleep=bounded(sleeps)) >= 0
    assert sleeps == []


def test_wait_polls_every_second_for_five_minutes_by_default():
    sleeps, now = [], [0.0]

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds
    with pytest.raises(TimeoutError, match="after 300 s"):  # nothing listens on port 1
        wait_for_job_agent("http://127.0.0.1:1", "http://127.0.0.1:1", clock=lambda: now[0],
                           sleep=sleep)
    assert sleeps == [1.0] * 300


def test_wait_gives_up_after_its_timeout_with_one_clear_message(head):
    h = head(late=10 ** 6)
    now = [0.0]

    def sleep(s):
        now[0] += s
    with pytest.raises(TimeoutError) as raised:
        wait_for_job_agent(h.url, h.url, timeout_s=5, poll_s=1, clock=lambda: now[0],
                           sleep=sleep)
    assert str(raised.value) == (
        f"the Ray head at {h.url} does not take jobs after 5 s (its dashboard or its job "
        f"agent at {h.url} does not answer); check `ray status` and the session's "
        "dashboard_agent.log")
    assert now[0] == 5 and h.polls["health"] == 6  # polled at 0, 1, ..., 5 s


def test_cli_wait_ray(head, capsys):
    h = head(late=1)
    assert main(["wait-ray", "--dashboard", h.url, "--agent", h.url, "--timeout", "30"]) == 0
    assert "takes jobs" in capsys.readouterr().out
    code = main(["wait-ray", "--dashboard", "http://127.0.0.1:1", "--agent", h.url,
                 "--timeout", "0.5"])
    assert code == 2
    assert "does not take jobs" in capsys.readouterr().err
