#!/usr/bin/python
# -*- coding: utf-8 -*-
# kepler-log: declarative Kafka topic management with kafka-python's admin client.
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: kafka_topic
short_description: Create Kafka topics, raise their partition count and apply topic configs
description:
  - Creates a topic with the given partition count, replication factor and configs.
  - On an existing topic raises the partition count and sets the given topic-level configs
    (incremental alter; configs not listed are left alone).
  - Fails clearly on a replication factor change or a partition decrease (Kafka cannot shrink
    partitions; changing replication needs a partition reassignment).
  - Reports C(changed) only when the cluster was (or in check mode would be) modified.
options:
  name:
    description: Topic name.
    type: str
    required: true
  state:
    description: C(present) creates/updates the topic, C(absent) deletes it.
    type: str
    choices: [present, absent]
    default: present
  partitions:
    description: Partition count. Required to create a topic.
    type: int
  replication_factor:
    description: Replication factor. Required to create a topic.
    type: int
  configs:
    description: Topic-level configs, e.g. C(retention.ms). Values are sent as strings; booleans as C(true)/C(false).
    type: dict
    default: {}
notes:
  - "Connection options (shared by kafka_topic, kafka_acl and kafka_scram_user, see
    module_utils/kafka_connection.py): bootstrap_servers (list, required), security_protocol
    (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL), ssl_cafile, ssl_certfile, ssl_keyfile,
    ssl_check_hostname, sasl_mechanism, sasl_username, sasl_password, client_id,
    request_timeout_ms, wait_timeout (seconds to wait for the cluster to answer and, here, for
    enough brokers to host the replicas)."
requirements:
  - kafka-python >= 3.0 (speaks to Kafka 4)
"""

EXAMPLES = r"""
- name: Log topic
  kafka_topic:
    name: keplerlog
    partitions: 4
    replication_factor: 2
    configs:
      min.insync.replicas: 1
      retention.ms: 604800000
    bootstrap_servers: ["kafka-1:9092", "kafka-2:9092"]
"""

RETURN = r"""
topic:
  description: Topic name.
  returned: always
  type: str
partitions:
  description: Partition count after the run (desired count in check mode).
  returned: when state=present
  type: int
replication_factor:
  description: Replication factor of the topic.
  returned: when state=present
  type: int
actions:
  description: What was (or would be) done, e.g. C(create), C(partitions 4->6), C(config retention.ms).
  returned: always
  type: list
  elements: str
"""

import contextlib
import time
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible.module_utils.kafka_connection import CONNECTION_ARGS, connect_admin

KAFKA_IMPORT_ERROR = None
try:
    from kafka.admin import ConfigResource, ConfigResourceType
    from kafka.errors import KafkaError
except ImportError:
    KAFKA_IMPORT_ERROR = traceback.format_exc()

UNKNOWN_TOPIC_OR_PARTITION = 3


def to_config_string(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def describe(admin, name):
    """The topic's metadata dict, or None when it does not exist."""
    for topic in admin.describe_topics([name]):
        if topic.get("name") != name:
            continue
        code = topic.get("error_code", 0)
        if code == UNKNOWN_TOPIC_OR_PARTITION:
            return None
        if code != 0:
            raise RuntimeError("describe_topics(%s) returned error code %s" % (name, code))
        return topic
    return None


def wait_for_brokers(module, admin, count, deadline):
    brokers = []
    while True:
        try:
            brokers = [
                b for b in admin.describe_cluster().get("brokers", []) if not b.get("is_fenced", False)
            ]
        except KafkaError:
            brokers = []
        if len(brokers) >= count:
            return
        if time.monotonic() >= deadline:
            module.fail_json(
                msg="Only %d broker(s) available, replication factor %d needs more" % (len(brokers), count)
            )
        time.sleep(2)


def topic_configs(admin, name):
    """{key: (value, source)} of all configs of the topic."""
    result = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)], config_filter="all")
    entries = result.get("topic", {}).get(name, {})
    return dict((key, (entry.get("value"), entry.get("config_source"))) for key, entry in entries.items())


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            partitions=dict(type="int"),
            replication_factor=dict(type="int"),
            configs=dict(type="dict", default={}),
            **CONNECTION_ARGS,
        ),
        supports_check_mode=True,
    )
    if KAFKA_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("kafka-python"), exception=KAFKA_IMPORT_ERROR)

    p = module.params
    name = p["name"]
    partitions = p["partitions"]
    replication = p["replication_factor"]
    desired_configs = dict((k, to_config_string(v)) for k, v in p["configs"].items())
    if partitions is not None and partitions < 1:
        module.fail_json(msg="partitions must be >= 1")
    if replication is not None and replication < 1:
        module.fail_json(msg="replication_factor must be >= 1")

    deadline = time.monotonic() + p["wait_timeout"]
    admin = connect_admin(module, deadline)
    result = dict(changed=False, topic=name, actions=[])
    diff = dict(before={}, after={})
    try:
        topic = describe(admin, name)

        if p["state"] == "absent":
            if topic is not None:
                result["actions"].append("delete")
                result["changed"] = True
                diff = dict(before=dict(topic=name), after={})
                if not module.check_mode:
                    admin.delete_topics([name])
            module.exit_json(diff=diff, **result)

        if topic is None:
            if partitions is None or replication is None:
                module.fail_json(
                    msg="Topic %s does not exist: partitions and replication_factor are required to create it"
                    % name
                )
            wait_for_brokers(module, admin, replication, deadline)
            spec = {
                name: dict(num_partitions=partitions, replication_factor=replication, configs=desired_configs)
            }
            if module.check_mode:
                admin.create_topics(spec, validate_only=True)
            else:
                admin.create_topics(spec)
                admin.wait_for_topics([name], timeout_ms=max(1000, int((deadline - time.monotonic()) * 1000)))
            result.update(changed=True, partitions=partitions, replication_factor=replication)
            result["actions"].append("create")
            diff["after"] = dict(
                partitions=partitions, replication_factor=replication, configs=desired_configs
            )
            module.exit_json(diff=diff, **result)

        current_partitions = len(topic.get("partitions") or [])
        replica_counts = set(len(part.get("replica_nodes") or []) for part in topic["partitions"])
        current_replication = max(replica_counts) if replica_counts else 0
        result.update(partitions=current_partitions, replication_factor=current_replication)
        diff["before"].update(partitions=current_partitions, replication_factor=current_replication)
        diff["after"].update(partitions=current_partitions, replication_factor=current_replication)

        if replication is not None and (replica_counts != set([replication])):
            module.fail_json(
                msg="Topic %s has replication factor %s, %d requested: changing the replication factor is not "
                "supported by this module (use a partition reassignment)"
                % (name, "/".join(str(c) for c in sorted(replica_counts)), replication),
                **result,
            )
        if partitions is not None and partitions < current_partitions:
            module.fail_json(
                msg="Topic %s has %d partitions, %d requested: Kafka cannot decrease the partition count"
                % (name, current_partitions, partitions),
                **result,
            )

        if partitions is not None and partitions > current_partitions:
            result["actions"].append("partitions %d->%d" % (current_partitions, partitions))
            result.update(changed=True, partitions=partitions)
            diff["after"]["partitions"] = partitions
            admin.create_partitions({name: partitions}, validate_only=module.check_mode)

        if desired_configs:
            current = topic_configs(admin, name)
            changes = {}
            for key, value in desired_configs.items():
                cur_value, source = current.get(key, (None, None))
                # In sync only when set on the topic itself: a value equal to the broker
                # default is still pinned, so broker default changes do not leak in.
                if cur_value != value or source != "DYNAMIC_TOPIC_CONFIG":
                    changes[key] = value
                    diff["before"].setdefault("configs", {})[key] = cur_value
                    diff["after"].setdefault("configs", {})[key] = value
            if changes:
                result["changed"] = True
                result["actions"].extend("config %s=%s" % (k, v) for k, v in sorted(changes.items()))
                res = admin.alter_configs(
                    [ConfigResource(ConfigResourceType.TOPIC, name, changes)], validate_only=module.check_mode
                )
                status = res.get("topic", {}).get(name)
                if status != "OK":
                    module.fail_json(msg="Altering configs of topic %s failed: %s" % (name, status), **result)
    except (KafkaError, RuntimeError, ValueError) as exc:
        module.fail_json(
            msg="Kafka admin operation on topic %s failed: %s" % (name, exc),
            exception=traceback.format_exc(),
            **result,
        )
    finally:
        with contextlib.suppress(Exception):  # closing must not mask the result
            admin.close()

    module.exit_json(diff=diff, **result)


if __name__ == "__main__":
    main()
