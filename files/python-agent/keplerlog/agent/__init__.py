"""The kepler-log tail agent: follows log files and ships their raw bytes to Kafka.

One module per job: `config` (YAML + environment), `identity` (which file is which),
`watch` (inotify or polling wake-ups), `tailer` (reading, rotation, truncation),
`assembler` (lines into records), `acks` (contiguous acked offsets), `checkpoint`
(the state file), `sender` (Kafka producer), `metrics` (counters, Prometheus),
`priority` (nice/ionice); the loop's three parts: `fileset` (discovery and identity),
`reader` (the read pass) and `ledger` (sends, acks, checkpoints); and `main` (the entry
point, whose `Agent` runs the parts in order).
"""
