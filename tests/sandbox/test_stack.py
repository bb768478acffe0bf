"""How the suite, the demo and `make serve` start the simulators: under the limits FIDELITY.md
documents, so that a code path that overruns them fails here rather than in production."""

from __future__ import annotations

from sandbox.demo import DEMO_GRAPH
from sandbox.graph import CONCURRENCY_PER_MAILBOX


def test_the_session_sandbox_serves_graph_under_its_documented_limits(sandbox):
    knobs = sandbox.graph.plan.knobs
    assert (knobs.max_concurrency, knobs.max_queued, knobs.max_query_chars) == (CONCURRENCY_PER_MAILBOX, 0, 2048), \
        "four at once per mailbox, the fifth refused with 429, query strings up to 2,048 characters"


def test_the_demo_refuses_a_fifth_request_to_a_mailbox_instead_of_queueing_it():
    assert (DEMO_GRAPH.max_concurrency, DEMO_GRAPH.max_queued, DEMO_GRAPH.max_query_chars) == \
        (CONCURRENCY_PER_MAILBOX, 0, 2048)
