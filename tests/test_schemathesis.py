"""Property-based tests of the HTTP API against its own /openapi.json (schemathesis).

A live `tiller serve` on loopback; for every operation in the document, schemathesis generates
requests from the request schema -- valid ones (positive) and ones that break it (negative:
wrong types, missing fields, out-of-range values) -- and checks each answer: never a 5xx, a
status the document lists, the content type it lists, and a body that matches the response
schema. Examples per operation are bounded and derived deterministically (hypothesis'
derandomize), so a run is repeatable and takes about a minute.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.live_server import start_server

EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 20}  # per operation
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def live(shared_models: Path, tmp_path_factory: pytest.TempPathFactory):
    # a small server: generated n x prompts and budgets meet their limits quickly
    url, server = start_server(tmp_path_factory.mktemp("schemathesis"), "--parallel", "2",
                               "--max-queue", "4", "--max-feature-values", "200000",
                               "--max-body-mb", "1")
    yield url
    server.stop()


def test_every_operation_keeps_to_the_openapi_document(live: str):
    schema = schemathesis.openapi.from_url(live + "/openapi.json")
    session = requests.Session()
    failures: list[str] = []
    tried = 0
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode, examples in EXAMPLES.items():

            @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: schemathesis.Case) -> None:
                nonlocal tried
                tried += 1
                response = case.call(base_url=live, session=session, timeout=120)
                case.validate_response(response, checks=CHECKS)

            try:
                run()
            except Unsatisfiable:  # negative mode: an operation without inputs has none to break
                assert mode == GenerationMode.NEGATIVE and not operation.body
            except (Exception, BaseExceptionGroup) as e:  # one per operation and mode, all tried
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): "
                                f"{e}"[:3000])
    print(f"\nschemathesis: {tried} requests over {len(operations)} operations, "
          f"{len(failures)} failing")
    assert not failures, "\n\n".join(failures)
