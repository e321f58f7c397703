"""Write to the log topic with the agents' identity until /tmp/kl-rotation-stop exists, then read
everything back with the consumer's identity; write {sent, acked, failed, read, ...} as JSON.

Used by side_effect.yml during the certificate rotation. Passwords come from the environment
(the task's `environment`, never arguments).
"""

import json
import os
import sys
import time
import uuid

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

BOOTSTRAP = [f"kl-kafka-{n}:9092" for n in (1, 2, 3)]
TOPIC = "keplerlog"
STOP = "/tmp/kl-rotation-stop"


def auth(user: str, env: str) -> dict:
    return {
        "bootstrap_servers": BOOTSTRAP,
        "security_protocol": "SASL_SSL",
        "ssl_cafile": "/etc/kafka/tls/ca.crt",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": user,
        "sasl_plain_password": os.environ[env],
    }


def main() -> None:
    token = f"rotation-{uuid.uuid4().hex}"
    producer = KafkaProducer(
        acks="all",
        retries=1_000_000,
        request_timeout_ms=10000,
        **auth("keplerlog-agent", "KL_PASSWORD_AGENT"),
    )
    futures, failed, started = [], [], time.monotonic()
    i = 0
    while not os.path.exists(STOP) and time.monotonic() - started < 850:
        futures.append(producer.send(TOPIC, f"{token}-{i}".encode()))
        i += 1
        time.sleep(0.05)
    producer.flush(timeout=120)
    acked = 0
    for n, fut in enumerate(futures):
        try:
            fut.get(timeout=1)
            acked += 1
        except Exception as exc:  # every failure is counted and the first ones kept
            failed.append(f"{n}: {type(exc).__name__}: {exc}")
    producer.close()
    consumer = KafkaConsumer(
        enable_auto_commit=False,
        consumer_timeout_ms=5000,
        **auth("keplerlog-consumer", "KL_PASSWORD_CONSUMER"),
    )
    tps = [TopicPartition(TOPIC, p) for p in range(4)]
    consumer.assign(tps)
    consumer.seek_to_beginning()
    seen: set[str] = set()
    deadline = time.monotonic() + 120
    while len(seen) < len(futures) and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=1000).values():
            for record in batch:
                value = record.value.decode(errors="replace")
                if value.startswith(token):
                    seen.add(value)
    consumer.close()
    result = {
        "sent": len(futures),
        "acked": acked,
        "failed": len(failed),
        "failures": failed[:5],
        "read": len(seen),
        "seconds": round(time.monotonic() - started, 1),
    }
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
