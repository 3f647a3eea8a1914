"""freetf.training.ray_ready: polling a Ray head's job API and agent, bounded."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from freetf.cli import main
from freetf.training.ray_ready import answers, job_agent_ready, wait_for_job_agent

pytestmark = pytest.mark.timeout(60)


class FakeHead:
    """A dashboard + agent on loopback: the agent answers 'success' after ``late`` polls."""

    def __init__(self, late: int = 0, agent_body: str = "raylet: success\ngcs: success"):
        self.polls = {"version": 0, "health": 0}
        head = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path == "/api/gcs_healthz":
                    head.polls["version"] += 1
                    self._send(200, "success")
                elif self.path == "/api/version":  # needs the cluster's token
                    self._send(401, "Unauthorized")
                elif self.path == "/api/local_raylet_healthz":
                    head.polls["health"] += 1
                    ready = head.polls["health"] > late
                    self._send(200 if ready else 503, agent_body if ready else "starting")
                else:
                    self._send(404, "no")

            def _send(self, code, body):
                self.send_response(code)
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
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


def test_answers_needs_200_and_the_expected_body(head):
    h = head(agent_body="raylet: failed")
    assert answers(f"{h.url}/api/gcs_healthz", expect="success")
    assert not answers(f"{h.url}/api/version")  # 401
    assert not answers(f"{h.url}/missing")  # 404
    assert answers(f"{h.url}/api/local_raylet_healthz", expect="raylet")
    assert not answers(f"{h.url}/api/local_raylet_healthz", expect="success")
    assert not answers("http://127.0.0.1:1/api/version")  # nothing listens
    assert not answers("not a url")


def test_ready_needs_both_the_dashboard_and_the_agent(head):
    h = head()
    assert job_agent_ready(h.url, h.url)
    assert not job_agent_ready("http://127.0.0.1:1", h.url)
    assert not job_agent_ready(h.url, "http://127.0.0.1:1")


def test_wait_polls_until_the_agent_answers(head):
    h = head(late=3)
    sleeps = []
    waited = wait_for_job_agent(h.url, h.url, timeout_s=60, poll_s=0.25, sleep=sleeps.append)
    assert sleeps == [0.25] * 3 and h.polls["health"] == 4
    assert waited >= 0


def test_wait_gives_up_after_its_timeout_with_one_clear_message(head):
    h = head(late=10 ** 6)
    now = [0.0]

    def sleep(s):
        now[0] += s
    with pytest.raises(TimeoutError, match=r"does not take jobs after 5 s.*dashboard_agent"):
        wait_for_job_agent(h.url, h.url, timeout_s=5, poll_s=1, clock=lambda: now[0],
                           sleep=sleep)
    assert now[0] == 5 and h.polls["health"] == 6  # polled at 0, 1, ..., 5 s


def test_cli_wait_ray(head, capsys):
    h = head(late=1)
    assert main(["wait-ray", "--dashboard", h.url, "--agent", h.url, "--timeout", "30"]) == 0
    assert "takes jobs" in capsys.readouterr().out
    code = main(["wait-ray", "--dashboard", "http://127.0.0.1:1", "--agent", h.url,
                 "--timeout", "0.5"])
    assert code == 2
    assert "does not take jobs" in capsys.readouterr().err
