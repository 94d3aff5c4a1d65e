"""The client against services of other versions, through a fake transport that answers /healthz with a
chosen version: another major version stops every command before it starts (exit 3, both versions named),
another minor one is a one-line warning on stderr (once per client), the same version says nothing."""

from __future__ import annotations

import io
import json

import httpx
import pytest

from influence_client import IncompatibleServiceError, InfluenceClient, __version__
from influence_client.cli import main
from influence_client.cli.context import EXIT_INCOMPATIBLE

MAJOR, MINOR = (int(part) for part in __version__.split(".")[:2])
OTHER_MAJOR = f"{MAJOR + 1}.0.0"
OTHER_MINOR = f"{MAJOR}.{MINOR + 1}.0"
EMPTY_PAGE = {"items": [], "total": 0, "offset": 0, "limit": 50}
NO_HEALTHZ = "no /healthz"


class FakeService(httpx.MockTransport):
    """/healthz with `version` (no version field when None; a 404, as from a proxy that does not pass it on,
    when NO_HEALTHZ), an empty page of models; keeps the paths asked."""

    def __init__(self, version: str | None):
        self.paths: list[str] = []
        health = {"status": "ok"} | ({"version": version} if version is not None else {})

        def answer(request: httpx.Request) -> httpx.Response:
            self.paths.append(request.url.path)
            if request.url.path != "/healthz":
                return httpx.Response(200, json=EMPTY_PAGE)
            return httpx.Response(404, text="not found") if version == NO_HEALTHZ else httpx.Response(200, json=health)

        super().__init__(answer)


def _models_list(service: FakeService, *options: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["--url", "http://service", "--api-key", "key", *options, "models", "list"]
    code = main(argv, transport=service, stdout=stdout, stderr=stderr)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.mark.parametrize("version", [__version__, f"{MAJOR}.{MINOR}.99", None, NO_HEALTHZ])
def test_the_same_minor_version_or_none_said_runs_silently(version):
    service = FakeService(version)
    code, out, err = _models_list(service, "--json")
    assert (code, err) == (0, "") and json.loads(out) == EMPTY_PAGE
    assert service.paths == ["/healthz", "/v1/models"]


def test_another_major_version_stops_before_the_command_with_both_versions():
    service = FakeService(OTHER_MAJOR)
    code, out, err = _models_list(service)
    assert code == EXIT_INCOMPATIBLE == 3 and out == ""
    assert err.count("\n") == 1 and OTHER_MAJOR in err and __version__ in err and "major version" in err
    assert err.startswith("influence: the service at http://service is version")
    assert service.paths == ["/healthz"]  # the command itself never reached the service


def test_another_minor_version_warns_once_on_stderr_and_goes_on():
    service = FakeService(OTHER_MINOR)
    code, out, err = _models_list(service, "--json")
    assert code == 0 and json.loads(out) == EMPTY_PAGE
    assert err.count("\n") == 1 and err.startswith("influence: warning: ")
    assert OTHER_MINOR in err and __version__ in err and "minor version" in err
    assert service.paths == ["/healthz", "/v1/models"]


def test_the_client_compares_versions_on_its_first_check_only():
    service = FakeService(OTHER_MINOR)
    with InfluenceClient("http://service", transport=service) as client:
        warning = client.check_service_version()
        assert warning is not None and OTHER_MINOR in warning and "\n" not in warning
        assert client.check_service_version() is None
    assert service.paths == ["/healthz"]
    client = InfluenceClient("http://service", transport=FakeService(OTHER_MAJOR))
    with client, pytest.raises(IncompatibleServiceError) as refused:
        client.check_service_version()
    assert (refused.value.service_version, refused.value.client_version) == (OTHER_MAJOR, __version__)


def test_the_exit_status_table_names_the_version_refusal():
    stdout = io.StringIO()
    assert main(["--help"], stdout=stdout, stderr=io.StringIO()) == 0
    assert "3 a service of another major version" in " ".join(stdout.getvalue().split())
