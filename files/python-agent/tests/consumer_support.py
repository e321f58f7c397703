"""Shared pieces of the consumer tests."""

from keplerlog.consumer.route import TsWindow

# The tests' fixed 2023 timestamps are years old for Sink.write(), which routes with the real
# clock: without a wide window every record would be filed under today (ts_out_of_range).
ANY_TIME = TsWindow(10**15, 10**15)
