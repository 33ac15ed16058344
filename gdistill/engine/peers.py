"""Telling which process of a distributed run stopped answering.

A collective that waits on a hung peer (stopped, swapped out, stuck in I/O) fails after the
process group's timeout (``dist_timeout``) with an error of the backend that names no rank.
``Heartbeat`` has every process stamp the time into the process group's store from a thread
every ``period`` seconds; a stopped process stamps nothing (all its threads stop), so when a
collective fails, ``peer_failure`` names the ranks whose stamp is stale."""
import datetime
import threading
import time

import torch.distributed as dist

KEY = 'gdistill/alive/{}'
PEER_FAILURE_MARKS = ('timed out', 'timeout', 'connection closed by peer', 'connection reset by peer',
                      'broken pipe', 'connection refused', 'socket closed')


class PeerFailureError(RuntimeError):
    """A collective failed because another process of the run hung or died."""


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


class Heartbeat:
    """Stamps ``time.time()`` under ``gdistill/alive/<rank>`` every ``period`` seconds."""

    def __init__(self, period):
        self.period = float(period)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.store = _store()
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        if self.store is None:
            return self
        self._beat()
        self._thread = threading.Thread(target=self._run, name='gdistill-heartbeat', daemon=True)
        self._thread.start()
        return self

    def _beat(self):
        self.store.set(KEY.format(self.rank), repr(time.time()))

    def _run(self):
        while not self._stop.wait(self.period):
            try:
                self._beat()
            except Exception:  # the store is gone (the run is ending)
                return

    def stop(self):
        self._stop.set()

    def ages(self, wait=5.0):
        """Seconds since each rank's last stamp (None where it never stamped), or None when
        the store does not answer within ``wait`` seconds."""
        if self.store is None:
            return None
        try:
            self.store.set_timeout(datetime.timedelta(seconds=wait))
            now = time.time()
            out = {}
            for rank in range(self.world):
                key = KEY.format(rank)
                out[rank] = now - float(self.store.get(key).decode()) if self.store.check([key]) else None
            return out
        except Exception:
            return None


def is_peer_failure(err):
    """Whether ``err`` is what a collective raises when a peer hung or died."""
    if isinstance(err, PeerFailureError):
        return False
    if type(err).__name__ in ('DistBackendError', 'DistNetworkError'):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(mark in text for mark in PEER_FAILURE_MARKS)


def peer_failure(err, heartbeat, timeout, rank=None, world=None):
    """A :class:`PeerFailureError` for ``err`` naming the ranks that stopped answering (those
    whose heartbeat is older than three periods), or all other ranks when that is unknown."""
    rank = dist.get_rank() if rank is None else rank
    world = dist.get_world_size() if world is None else world
    ages = heartbeat.ages() if heartbeat is not None else None
    others = [r for r in range(world) if r != rank]
    if ages is not None:
        stale = [r for r in others if ages[r] is None or ages[r] > 3 * heartbeat.period]
        detail = ', '.join(f'rank {r} last seen {ages[r]:.0f} s ago' if ages[r] is not None
                           else f'rank {r} never seen' for r in stale) or 'every heartbeat is recent'
    else:
        stale, detail = [], 'the store did not answer, so which rank is unknown'
    who = (f'rank {stale[0]}' if len(stale) == 1 else f'ranks {stale}') if stale else \
        (f'rank {others[0]}' if len(others) == 1 else f'one of ranks {others}')
    limit = f'dist_timeout={timeout:g} s' if timeout else 'the process-group timeout'
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if any(mark in first.lower() for mark in PEER_FAILURE_MARKS[2:]):   # the connection went away
        return PeerFailureError(f'rank {rank}: {who} closed its connection (the process died or was killed; '
                                f'{detail}), so this run stops (the last checkpoint is intact). Backend: {first}')
    return PeerFailureError(f'rank {rank}: {who} stopped answering ({detail}); a collective waited {limit} '
                            f'and failed, so this run stops (the last checkpoint is intact). Backend: {first}')
