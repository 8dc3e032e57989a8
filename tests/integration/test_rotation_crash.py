"""kill -9 in the middle of every rotation step, then restart: the journal resumes.

Each case walks a CA through its lifecycle in this process up to the step under test,
then runs that step in a child process that SIGKILLs itself at the named point (after
the key is stored, after the journal commit, ...). A fresh service then runs the same
tick again and the CA must be whole: one active root, one active intermediate under it,
a bundle holding both, every live key on disk and no other, and a leaf that verifies.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from meshca import app
from meshca.adapters.keys.files import FileKeyManager
from meshca.adapters.storage.engine import make_engine
from meshca.config import Settings
from meshca.core.csr import CsrRequest
from meshca.core.issuance import IssuancePolicy, issue_leaf, leaf_lifetime
from meshca.core.rotation import AuthorityState
from meshca.service.authority import AuthorityService
from tests.core.builders import NOW, TRUST_DOMAIN, WORKLOAD_ID, signer_key
from tests.fakes import FakeClock

pytestmark = pytest.mark.integration

H = timedelta(hours=1)

CHILD = """
import os, signal, sys
from datetime import datetime
from pathlib import Path
from meshca import app
from meshca.adapters.storage.engine import make_engine
from tests.integration.test_rotation_crash import settings_for
from tests.fakes import FakeClock

data_dir, point, now = Path(sys.argv[1]), sys.argv[2], datetime.fromisoformat(sys.argv[3])

def checkpoint(name):
    if name == point:
        os.kill(os.getpid(), signal.SIGKILL)

settings = settings_for(data_dir)
engine = make_engine(settings.effective_database_url)
app.build_authorities(settings, engine, FakeClock(now), checkpoint).tick()
"""

#: Each crash point and the time (after T0) at which the lifecycle reaches it.
POINTS = [
    ("prepare-intermediate:key-stored", 2 * H),
    ("prepare-intermediate:recorded", 2 * H),
    ("activate-intermediate:before-record", 2 * H),
    ("activate-intermediate:recorded", 2 * H),
    ("remove:recorded", 4 * H),
    ("prepare-root:key-stored", 8 * H),
    ("prepare-root:recorded", 8 * H),
    ("activate-root:before-record", 9 * H),
    ("activate-root:recorded", 9 * H),
]
TIMELINE = [2 * H, 4 * H, 6 * H, 8 * H, 9 * H]


def settings_for(data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        trust_domain=TRUST_DOMAIN.name,
        root_ttl=24 * H,
        intermediate_ttl=4 * H,
        max_svid_ttl=H,
        propagation_delay=H,
        root_rotation=8 * H,
    )


def _service(data_dir: Path, now: datetime) -> AuthorityService:
    settings = settings_for(data_dir)
    engine = make_engine(settings.effective_database_url)
    return app.build_authorities(settings, engine, FakeClock(now))


def _assert_whole(data_dir: Path, service: AuthorityService, now: datetime) -> None:
    view = service.refresh()
    authorities = view.authorities
    active_roots = authorities.select(authorities.entries[0].kind.ROOT, AuthorityState.ACTIVE)
    assert len(active_roots) == 1
    inter = authorities.active_intermediate
    assert inter is not None and inter.parent_id == active_roots[0].id
    assert len(authorities.select(active_roots[0].kind, AuthorityState.PREPARED)) <= 1
    assert active_roots[0].certificate in view.bundle
    live = {
        e.key_ref
        for e in authorities.entries
        if e.key_ref is not None and e.state != AuthorityState.REMOVED
    }
    assert set(FileKeyManager(data_dir / "ca").key_refs()) == live
    authority = service.current()
    key = signer_key("ec-p256", 9)
    csr = CsrRequest(public_key=key.public_key(), uri_sans=(), sha256="")
    policy = IssuancePolicy(default_ttl=H, max_ttl=H)
    not_before, not_after = leaf_lifetime(now, None, policy, authority)
    leaf = issue_leaf(csr, WORKLOAD_ID, authority, not_before, not_after, 1 << 100)
    verifier = PolicyBuilder().store(Store(list(view.bundle))).time(now).build_client_verifier()
    verifier.verify(leaf, [authority.certificate, *authority.chain])


@pytest.mark.parametrize(("point", "at"), POINTS, ids=[p for p, _ in POINTS])
def test_kill_9_mid_step_then_restart_resumes(tmp_path: Path, point: str, at: timedelta) -> None:
    data_dir = tmp_path / "data"
    settings = settings_for(data_dir)
    data_dir.mkdir()
    engine = make_engine(settings.effective_database_url)
    app.prepare_database(settings, engine)
    engine.dispose()
    _service(data_dir, NOW).bootstrap()
    for step in TIMELINE:
        if step >= at:
            break
        _service(data_dir, NOW + step).tick()
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(data_dir), point, (NOW + at).isoformat()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    restarted = _service(data_dir, NOW + at)
    restarted.tick()
    _assert_whole(data_dir, restarted, NOW + at)
    # And the lifecycle goes on from there: the rest of the timeline and one more rotation.
    for step in [*(s for s in TIMELINE if s > at), 16 * H, 17 * H, 21 * H]:
        later = _service(data_dir, NOW + step)
        later.tick()
        _assert_whole(data_dir, later, NOW + step)
    roots = later.view.authorities.select(later.view.authorities.entries[0].kind.ROOT)
    assert sum(r.activated_at is not None for r in roots) == 3
    assert isinstance(later.view.bundle[0], x509.Certificate)
