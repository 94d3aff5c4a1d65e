"""The client's version, and what it can talk to: the service's major version must be the client's
(`InfluenceClient.check_service_version` refuses another one and warns, once, about another minor one)."""

from __future__ import annotations

import re

__version__ = "0.1.0"


def _major_minor(version: str) -> tuple[str, str]:
    """("1", "2") of "1.2.3" (or of "1.2rc1"); ("", "") when the version does not start with numbers."""
    found = re.match(r"(\d+)(?:\.(\d+))?", version)
    return (found.group(1), found.group(2) or "0") if found else ("", "")


class IncompatibleServiceError(Exception):
    """The service's major version is not this client's: its API may differ in ways the client cannot see."""

    def __init__(self, base_url: str, service_version: str, client_version: str = __version__):
        super().__init__(
            f"the service at {base_url} is version {service_version} and this client (influence-client) "
            f"{client_version}: another major version, whose API this client may misread; install the "
            "influence-client of the service's major version"
        )
        self.service_version = service_version
        self.client_version = client_version


def version_warning(base_url: str, service_version: str, client_version: str = __version__) -> str | None:
    """Whether this client can talk to a service of `service_version`: IncompatibleServiceError when the
    major versions differ, a one-line warning when only the minor ones do, None when they agree."""
    service, client = _major_minor(service_version), _major_minor(client_version)
    if service[0] != client[0]:
        raise IncompatibleServiceError(base_url, service_version, client_version)
    if service[1] != client[1]:
        return (
            f"the service at {base_url} is version {service_version} and this client {client_version}: "
            "another minor version, so options of the newer one may be missing on the other"
        )
    return None
