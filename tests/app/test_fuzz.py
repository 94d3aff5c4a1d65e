"""Property-based fuzzing of every operation in the OpenAPI document (schemathesis, a bounded deterministic run):
whatever a caller sends, valid or not, the answer is never a 5xx, its status is one the document declares, its
content type is the declared one and its body matches the declared schema. Runs on PostgreSQL, the stricter of
the two databases (it refuses NUL characters in text, for one)."""

from __future__ import annotations

import pytest
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

from tests.app.conftest import _empty_postgres, build_api, make_settings

# Random cases per operation and generation mode (valid, invalid), derandomized: the same cases every run.
MAX_EXAMPLES = 10
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, pg_url, allowed_root):
    _empty_postgres(pg_url)
    tmp = tmp_path_factory.mktemp("fuzz")
    api = build_api(make_settings(tmp, pg_url, [allowed_root], max_top_k=50, max_query_examples=4))
    yield api
    api.close()


@pytest.fixture(scope="module")
def fuzz_schema(fuzzed):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzzed.app)


def _operations() -> list[tuple[str, str]]:
    """Every operation of the OpenAPI document (an app that opens no connection just to describe itself)."""
    from app.config import Settings
    from app.main import create_app

    document = create_app(Settings(_env_file=None, database_url="sqlite://")).openapi()
    return sorted((method.upper(), path) for path, operations in document["paths"].items() for method in operations)


@pytest.mark.parametrize(("method", "path"), _operations(), ids=lambda value: value)
def test_no_input_makes_a_5xx_or_breaks_the_schema(fuzzed, fuzz_schema, method, path):
    operation = fuzz_schema[path][method]
    headers = {"Authorization": f"Bearer {fuzzed.token}"}
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    # 1. Schemathesis' coverage phase: a fixed set of boundary and malformed inputs per operation (huge and
    #    negative numbers, empty and odd strings, missing and extra fields, wrong types, NUL characters...).
    generation = fuzz_schema.config.generation_for(operation=operation)
    covered = 0
    for case in fuzz_schema.iter_coverage_cases(operation, generation_modes=modes, generation_config=generation):
        case.call_and_validate(headers=headers, checks=CHECKS)
        covered += 1
    assert covered > 0
    # 2. Random inputs, valid and invalid per the schema, the same ones every run (derandomized).
    for mode in modes:

        @settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(mode))
        def run(case):
            case.call_and_validate(headers=headers, checks=CHECKS)

        try:
            run()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE  # an operation with no input has no invalid input to send
