"""Liveness of the spawned tensor-parallel workers, so that rank 0 never waits out the
collectives' timeout for a worker that died or stopped (SIGSTOP, a frozen process).

Each worker writes the time into shared memory every ``BEAT_SECONDS`` from a thread of its own
(the thread that also watches for its parent's death), whatever its main thread is doing. A
watchdog thread on rank 0 wakes as often, reads the beats and the workers' exit sentinels, and on
a worker that exited or has not beaten for ``TIMEOUT_SECONDS`` records why and kills the
workers: rank 0's pending collective then fails at once (a closed connection) instead of after
minutes, and the engine raises the recorded reason. The step path pays nothing: no collective,
no lock, only these two threads waking twice a second.
"""
import os
import sys
import threading
import time
from multiprocessing.connection import wait

BEAT_SECONDS = 0.5
TIMEOUT_SECONDS = 5.0


def beat_until_orphaned(beats, slot: int, parent_pid: int):
    """A worker's side: beat, and end the process once its parent is gone, even while the main
    thread waits in a collective that a dead peer will never join (SIGKILL gives the parent no
    chance to stop its workers)."""
    while os.getppid() == parent_pid:
        beats[slot] = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the host
        time.sleep(BEAT_SECONDS)
    os._exit(1)


class Watchdog:
    """Rank 0's side, over the spawned workers (``beats[i]`` is worker i's)."""

    def __init__(self, workers, beats):
        self.workers, self.beats = workers, beats
        self.failure: str | None = None  # why the workers were stopped
        self._wake_reader, self._wake_writer = os.pipe()
        self._thread = threading.Thread(target=self._watch, name="minivllm-tp-watchdog", daemon=True)
        self._thread.start()

    def stop(self):
        """Ends the watch (before the workers are stopped on purpose)."""
        os.write(self._wake_writer, b"x")
        self._thread.join()
        os.close(self._wake_reader)
        os.close(self._wake_writer)

    def diagnose(self) -> str | None:
        """Why a worker cannot serve (it exited, or has not beaten for TIMEOUT_SECONDS); None when
        all are well. Reads the exit sentinels, never reaps, so any thread may ask."""
        for i, worker in enumerate(self.workers):
            if wait([worker.sentinel], timeout=0):
                return f"{worker.name} (pid {worker.pid}) exited"
            silence = time.monotonic() - self.beats[i]
            if silence > TIMEOUT_SECONDS:
                return f"{worker.name} (pid {worker.pid}) sent no heartbeat for {silence:.1f} s (stopped or frozen)"
        return None

    def _watch(self):
        sentinels = [worker.sentinel for worker in self.workers]
        while self._wake_reader not in wait([self._wake_reader, *sentinels], timeout=BEAT_SECONDS):
            self.failure = self.diagnose()
            if self.failure:
                print(f"minivllm: {self.failure}: stopping the tensor-parallel workers", file=sys.stderr, flush=True)
                for worker in self.workers:
                    worker.kill()
                return
