"""One Vault client for meshca: login (token, AppRole, Kubernetes), token renewal, errors.

Every call goes through ``VaultClient.call``: it logs in or renews the token first
when needed, and turns every failure into ``BackendUnavailable`` with a message that
names Vault's address and never the token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import hvac
import requests
from hvac import exceptions as hvac_errors

from meshca.core.errors import BackendUnavailable

__all__ = ["VaultAuth", "VaultClient"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Renew (or log in again) once this share of the token's lifetime has passed.
RENEW_AT = 0.5


@dataclass(frozen=True)
class VaultAuth:
    """How meshca proves itself to Vault.

    ``method``: ``token`` (read from ``token_file``), ``approle`` (``role_id`` and the
    secret id in ``secret_id_file``) or ``kubernetes`` (``role`` and the service-account
    token in ``jwt_file``). ``mount`` defaults to the method's name.
    """

    method: str = "token"
    token_file: Path | None = None
    role_id: str | None = None
    secret_id_file: Path | None = None
    role: str | None = None
    jwt_file: Path | None = None
    mount: str | None = None


class VaultClient:
    def __init__(
        self,
        addr: str,
        auth: VaultAuth,
        *,
        ca_file: Path | None = None,
        timeout: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.addr = addr
        self._auth = auth
        self._monotonic = monotonic
        session = requests.Session()
        session.trust_env = False  # never send Vault traffic through an environment proxy
        self._client = hvac.Client(
            url=addr,
            verify=str(ca_file) if ca_file else True,
            timeout=max(1, round(timeout)),
            session=session,
        )
        self._lock = threading.Lock()
        self._renew_at: float | None = None
        self._logged_in = False

    @property
    def raw(self) -> hvac.Client:
        return self._client

    def call(self, fn: Callable[[hvac.Client], T], *, what: str) -> T:
        """Run ``fn`` against Vault; any failure becomes ``BackendUnavailable``."""
        try:
            self._ensure_token()
            try:
                return fn(self._client)
            except hvac_errors.Forbidden:
                # The token may have been revoked or expired early: log in once more.
                self._login()
                return fn(self._client)
        except BackendUnavailable:
            raise
        except (requests.ConnectionError, requests.Timeout) as error:
            raise BackendUnavailable(f"Vault at {self.addr} is unreachable ({what})") from error
        except hvac_errors.VaultError as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise BackendUnavailable(
                f"Vault at {self.addr} refused {what}: {type(error).__name__} {first[:300]}"
            ) from error
        except requests.RequestException as error:
            raise BackendUnavailable(f"Vault at {self.addr}: {what} failed") from error

    def get(self, path: str) -> Any:
        return self._client.adapter.get(f"/v1/{path}")

    def list(self, path: str) -> Any:
        return self._client.adapter.list(f"/v1/{path}")

    def post(self, path: str, payload: dict[str, Any]) -> Any:
        return self._client.adapter.post(f"/v1/{path}", json=payload)

    def delete(self, path: str) -> Any:
        return self._client.adapter.delete(f"/v1/{path}")

    # -- tokens --------------------------------------------------------------------------

    def _ensure_token(self) -> None:
        with self._lock:
            if not self._logged_in:
                self._login_locked()
            elif self._renew_at is not None and self._monotonic() >= self._renew_at:
                self._renew_locked()

    def _login(self) -> None:
        with self._lock:
            self._login_locked()

    def _login_locked(self) -> None:
        auth = self._auth
        match auth.method:
            case "token":
                if auth.token_file is None:
                    raise BackendUnavailable("vault-auth token needs --vault-token-file")
                self._client.token = _read_secret(auth.token_file)
                looked_up = self._client.auth.token.lookup_self()["data"]
                ttl, renewable = int(looked_up.get("ttl") or 0), bool(looked_up.get("renewable"))
            case "approle":
                if not auth.role_id or auth.secret_id_file is None:
                    raise BackendUnavailable(
                        "vault-auth approle needs --vault-role-id and --vault-secret-id-file"
                    )
                answer = self._client.auth.approle.login(
                    role_id=auth.role_id,
                    secret_id=_read_secret(auth.secret_id_file),
                    mount_point=auth.mount or "approle",
                )["auth"]
                ttl, renewable = int(answer["lease_duration"]), bool(answer["renewable"])
            case "kubernetes":
                if not auth.role or auth.jwt_file is None:
                    raise BackendUnavailable(
                        "vault-auth kubernetes needs --vault-role and a service-account token"
                    )
                answer = self._client.auth.kubernetes.login(
                    role=auth.role,
                    jwt=_read_secret(auth.jwt_file),
                    mount_point=auth.mount or "kubernetes",
                )["auth"]
                ttl, renewable = int(answer["lease_duration"]), bool(answer["renewable"])
            case other:
                raise BackendUnavailable(f"unknown vault-auth method {other!r}")
        self._logged_in = True
        self._schedule(ttl, renewable)
        log.info("logged in to Vault at %s (%s; token ttl %ss)", self.addr, auth.method, ttl)

    def _renew_locked(self) -> None:
        try:
            answer = self._client.auth.token.renew_self()["auth"]
            ttl, renewable = int(answer["lease_duration"]), bool(answer["renewable"])
            self._schedule(ttl, renewable)
            log.debug("renewed the Vault token (ttl %ss)", ttl)
        except (hvac_errors.VaultError, KeyError, TypeError):
            # Not renewable any more (max TTL reached): a fresh login gives a new token.
            self._login_locked()

    def _schedule(self, ttl: int, renewable: bool) -> None:
        if ttl <= 0:
            self._renew_at = None  # a root or periodic-less token that never expires
        elif renewable or self._auth.method != "token":
            self._renew_at = self._monotonic() + ttl * RENEW_AT
        else:
            self._renew_at = None


def _read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as error:
        raise BackendUnavailable(f"cannot read {path}: {error.strerror}") from error
