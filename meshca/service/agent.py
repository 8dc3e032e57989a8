"""The agent's state and its two loops: keep an SVID (renew at half-life, retry with
backoff) and follow the server's trust bundle (reconnect with backoff).

Whatever the server does, the last good SVID and bundle stay in ``AgentState`` and keep
being served; ``AgentState.upstream_problem`` says what is wrong meanwhile, for the log
and for health.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta

from meshca.core.agent import (
    AgentSvid,
    RenewalPolicy,
    TrustBundleView,
    Upstream,
    chain_tainted,
    renew_at,
    retry_delay,
)
from meshca.core.errors import MeshcaError
from meshca.core.ports import Clock

__all__ = ["AgentRunner", "AgentSnapshot", "AgentState", "KeyAndCsr"]

log = logging.getLogger("meshca.agent")

#: Makes a fresh private key and a CSR for it: (PKCS#8 DER key, DER CSR).
KeyAndCsr = Callable[[], tuple[bytes, bytes]]


@dataclass(frozen=True)
class AgentSnapshot:
    """What the agent serves now. ``version`` grows whenever the SVID or bundle changes."""

    svid: AgentSvid | None
    bundle: TrustBundleView | None
    version: int
    #: Why the server could not be used lately (None while the last contact worked).
    upstream_problem: str | None = "no SVID yet"


class AgentState:
    """The current snapshot, and a way to wait for the next one."""

    def __init__(self) -> None:
        self._snapshot = AgentSnapshot(None, None, 0)
        self._changed = asyncio.Condition()
        self._ticks = 0  # counts every change, upstream_problem included
        self._problems: dict[str, str] = {"renewal": "no SVID yet"}

    @property
    def current(self) -> AgentSnapshot:
        return self._snapshot

    @property
    def ticks(self) -> int:
        return self._ticks

    async def _publish(self, snapshot: AgentSnapshot) -> None:
        async with self._changed:
            self._snapshot = snapshot
            self._ticks += 1
            self._changed.notify_all()

    async def set_svid(self, svid: AgentSvid, roots_der: tuple[bytes, ...]) -> None:
        """Serve ``svid``; the server's roots sent with it fill in a missing bundle."""
        now = self._snapshot
        bundle = now.bundle
        if bundle is None or (roots_der and not set(roots_der) <= set(bundle.roots_der)):
            # No watch yet, or the signing answer knows a root the watch has not shown
            # (it will shortly): serve the roots that verify the new SVID.
            trust_domain = svid.spiffe_id.split("/")[2]
            sequence = bundle.sequence if bundle else 0
            crls = bundle.crls_der if bundle else ()
            jwt_bundle = bundle.jwt_bundle if bundle else b""
            bundle = TrustBundleView(
                trust_domain, roots_der, sequence, crls_der=crls, jwt_bundle=jwt_bundle
            )
        self._problems.pop("renewal", None)
        await self._publish(
            replace(
                now,
                svid=svid,
                bundle=bundle,
                version=now.version + 1,
                upstream_problem=self._problem_text(),
            )
        )

    async def set_bundle(self, bundle: TrustBundleView) -> None:
        now = self._snapshot
        if (
            now.bundle is not None
            and now.bundle.roots_der == bundle.roots_der
            and now.bundle.crls_der == bundle.crls_der
            and now.bundle.jwt_bundle == bundle.jwt_bundle
        ):
            return
        await self._publish(replace(now, bundle=bundle, version=now.version + 1))

    async def set_upstream_problem(self, loop: str, problem: str | None) -> None:
        """Record what ``loop`` ("renewal" or "bundle") found wrong; None clears it."""
        if problem is None:
            self._problems.pop(loop, None)
        else:
            self._problems[loop] = problem
        text = self._problem_text()
        if text != self._snapshot.upstream_problem:
            await self._publish(replace(self._snapshot, upstream_problem=text))

    def _problem_text(self) -> str | None:
        return "; ".join(self._problems[k] for k in sorted(self._problems)) or None

    async def wait_newer(self, version: int) -> AgentSnapshot:
        """The first snapshot whose ``version`` is above ``version``."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._snapshot.version > version)
            return self._snapshot

    async def wait_tick(self, tick: int) -> int:
        """Wait until anything changed after ``tick``; returns the new tick."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._ticks > tick)
            return self._ticks


class AgentRunner:
    """The renewal loop and the bundle-watch loop over an ``Upstream``."""

    def __init__(
        self,
        state: AgentState,
        upstream: Upstream,
        *,
        read_token: Callable[[], str],
        key_and_csr: KeyAndCsr,
        clock: Clock,
        draw: Callable[[], float],
        policy: RenewalPolicy | None = None,
    ) -> None:
        self._state = state
        self._upstream = upstream
        self._read_token = read_token
        self._key_and_csr = key_and_csr
        self._clock = clock
        self._draw = draw
        self._policy = policy or RenewalPolicy()
        #: Set when the bundle says the SVID's issuer is tainted: renew now.
        self._renew_now = asyncio.Event()
        self._latest: TrustBundleView | None = None

    def tainted_issuer(self, svid: AgentSvid | None, *, roots: bool = True) -> str | None:
        """The tainted authority ``svid`` chains through, per the latest bundle; or None.

        With ``roots`` False only its intermediates count: a tainted root keeps signing
        (through a fresh intermediate) until its successor is active, which changes the
        bundle again and so triggers one more renewal then.
        """
        bundle = self._latest
        if svid is None or bundle is None:
            return None
        return chain_tainted(svid.chain_der, bundle.roots_der if roots else (), bundle.tainted)

    async def renew_once(self) -> AgentSvid:
        """Read the token, make a key and CSR, get and publish a new SVID."""
        token = self._read_token()
        key_der, csr_der = self._key_and_csr()
        svid, roots = await self._upstream.sign(token, csr_der, key_der)
        await self._state.set_svid(svid, roots)
        return svid

    async def run_renewal(self) -> None:
        """Forever: renew, sleep until the next renewal time (or the next retry)."""
        attempt = 0
        while True:
            try:
                svid = await self.renew_once()
            except Exception as exc:
                # The agent must outlive any failure: a bug here is logged with its
                # traceback and retried like an outage, never allowed to end the loop.
                if not isinstance(exc, MeshcaError):
                    log.exception("renewal failed unexpectedly")
                attempt += 1
                delay = retry_delay(attempt, self._policy, self._draw())
                held = self._state.current.svid
                problem = f"renewal failed: {_describe(exc)}"
                await self._state.set_upstream_problem("renewal", problem)
                if held is None:
                    log.warning("%s; no SVID yet; retrying in %.1fs", problem, _s(delay))
                else:
                    log.warning(
                        "%s; still serving SVID %s (serial %s, expires %s); retrying in %.1fs",
                        problem,
                        held.spiffe_id,
                        held.serial,
                        held.not_after.isoformat(),
                        _s(delay),
                    )
                await asyncio.sleep(_s(delay))
                continue
            if attempt:
                log.info("renewal works again after %d failed attempts", attempt)
            attempt = 0
            when = renew_at(svid, self._policy, self._draw())
            tainted = self.tainted_issuer(svid, roots=False)
            if tainted is not None:
                # A replica that has not followed the journal yet signed under the tainted
                # authority: try again soon, not at half-life.
                when = self._clock.now() + retry_delay(1, self._policy, self._draw())
                log.warning("new SVID still chains through tainted %s; renewing again", tainted)
            log.info(
                "SVID %s serial %s valid until %s; next renewal at %s",
                svid.spiffe_id,
                svid.serial,
                svid.not_after.isoformat(),
                when.isoformat(),
            )
            self._renew_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._renew_now.wait(), max(0.0, _s(when - self._clock.now()))
                )

    async def run_bundle_watch(self) -> None:
        """Forever: follow the server's bundle stream; reconnect with backoff when it ends."""
        attempt = 0
        while True:
            try:
                async for bundle in self._upstream.watch_bundle():
                    if attempt:
                        log.info("trust bundle watch reconnected")
                    attempt = 0
                    await self._state.set_upstream_problem("bundle", None)
                    log.info(
                        "trust bundle %s sequence %d: %d roots, %d CRLs",
                        bundle.trust_domain,
                        bundle.sequence,
                        len(bundle.roots_der),
                        len(bundle.crls_der),
                    )
                    await self._state.set_bundle(bundle)
                    self._latest = bundle
                    tainted = self.tainted_issuer(self._state.current.svid)
                    if tainted is not None:
                        log.warning(
                            "the SVID's issuer %s is tainted (bundle sequence %d): renewing now",
                            tainted[:16],
                            bundle.sequence,
                        )
                        self._renew_now.set()
                problem = "trust bundle watch ended"
            except Exception as exc:
                if not isinstance(exc, MeshcaError):
                    log.exception("trust bundle watch failed unexpectedly")
                problem = f"trust bundle watch failed: {_describe(exc)}"
            attempt += 1
            delay = retry_delay(attempt, self._policy, self._draw())
            await self._state.set_upstream_problem("bundle", problem)
            log.warning("%s; serving the last bundle; reconnecting in %.1fs", problem, _s(delay))
            await asyncio.sleep(_s(delay))


def _describe(exc: Exception) -> str:
    return exc.message if isinstance(exc, MeshcaError) else f"unexpected {type(exc).__name__}"


def _s(delta: timedelta) -> float:
    return delta.total_seconds()
