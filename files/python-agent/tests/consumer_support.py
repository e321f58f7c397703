"""Shared pieces of the consumer tests."""

import os

from keplerlog.consumer.route import TsWindow
from keplerlog.consumer.sink import Sink

# The tests' fixed 2023 timestamps are years old for Sink.write(), which routes with the real
# clock: without a wide window every record would be filed under today (ts_out_of_range).
ANY_TIME = TsWindow(10**15, 10**15)


def die(sink: Sink) -> None:
    """What a kill -9 leaves: no cleanup, but the kernel drops the flocks and the descriptors."""
    os.close(sink.journal._lock_fd)
    for fd in sink.journal.intents._fds:  # the intent slots stay on disk as written
        os.close(fd)
    sink.journal.locks.close()  # its file and partition locks
    for handle in list(sink.files._handles.values()):
        os.close(handle.fd)
    sink.files._handles.clear()
