"""Draining on SIGTERM: requests already in flight finish, new ones get 503, and the process exits by a deadline.

`Drain` holds the state `RequestGate` reads and writes (the in-flight count, whether the server drains).
`DrainingServer` is uvicorn's server with the first SIGTERM or Ctrl-C turned into a drain: it keeps accepting
connections only to answer 503, and asks uvicorn to shut down once nothing is in flight or `drain_seconds`
have passed. A second signal shuts down at once, as uvicorn does by default.
"""

import logging
import time

import uvicorn

log = logging.getLogger("mmlm.serve")


class Drain:
    """The requests in flight and, once a drain began, its deadline."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.deadline: float | None = None  # time.monotonic() past which in-flight requests are cut off

    @property
    def draining(self) -> bool:
        """Return whether new requests are refused."""
        return self.deadline is not None

    def begin(self, seconds: float) -> None:
        """Refuse new requests from now on; in-flight ones get `seconds` to finish."""
        if self.deadline is None:
            self.deadline = time.monotonic() + seconds

    def done(self) -> bool:
        """Return whether the drain may end: nothing is in flight, or the deadline passed."""
        return self.deadline is not None and (self.in_flight == 0 or time.monotonic() >= self.deadline)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining `drain` for up to `seconds` on the first SIGTERM/SIGINT before it shuts down."""

    def __init__(self, config: uvicorn.Config, drain: Drain, seconds: float) -> None:
        super().__init__(config)
        self.drain, self.seconds = drain, seconds

    def handle_exit(self, sig: int, frame) -> None:
        """Begin the drain on the first signal; a second one is uvicorn's own (shut down now)."""
        if self.drain.draining or self.should_exit:
            super().handle_exit(sig, frame)
            return
        log.warning(
            "draining: %d request(s) in flight get up to %g s; new requests get 503",
            self.drain.in_flight, self.seconds,
        )  # fmt: skip
        self.drain.begin(self.seconds)

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's 0.1 s tick: end the drain when nothing is in flight or its deadline passed."""
        if not self.should_exit and self.drain.done():
            if self.drain.in_flight:
                log.warning("drain deadline passed; cutting off %d request(s)", self.drain.in_flight)
            self.should_exit = True
        return await super().on_tick(counter)
