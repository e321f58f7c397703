#!/usr/bin/python
# -*- coding: utf-8 -*-
# kepler-log: Kafka ACLs as data, with kafka-python's admin client.
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: kafka_acl
short_description: Make a Kafka cluster's ACLs exactly the listed ones
description:
  - Creates every listed ACL that the cluster lacks and, with I(purge), deletes every ACL the
    cluster has that the list does not name, so the list is the whole truth (like the role's
    topics). Super users (C(super.users)) need no ACLs and are not listed.
  - Reports C(changed) only when the cluster was (or in check mode would be) modified; the
    C(created) and C(deleted) lists say what.
options:
  acls:
    description: The wanted ACLs.
    type: list
    elements: dict
    required: true
    suboptions:
      principal:
        description: C(User:name).
        type: str
        required: true
      resource_type:
        description: Resource kind.
        type: str
        choices: [topic, group, cluster, transactional_id, delegation_token, user]
        required: true
      resource_name:
        description: Resource name (C(kafka-cluster) for the cluster).
        type: str
        default: kafka-cluster
      pattern_type:
        description: C(literal) names one resource, C(prefixed) every resource starting with the name.
        type: str
        choices: [literal, prefixed]
        default: literal
      operation:
        description: Operation, e.g. C(read), C(write), C(describe), C(idempotent_write).
        type: str
        required: true
      permission:
        description: Allow or deny.
        type: str
        choices: [allow, deny]
        default: allow
      host:
        description: Client host the ACL applies to.
        type: str
        default: "*"
  purge:
    description: Delete ACLs that the list does not name.
    type: bool
    default: true
notes:
  - Connection options as for kafka_topic (module_utils/kafka_connection.py).
requirements:
  - kafka-python >= 3.0 (speaks to Kafka 4)
"""

EXAMPLES = r"""
- name: The agents may only write the log topic
  kafka_acl:
    acls:
      - {principal: "User:keplerlog-agent", resource_type: topic, resource_name: keplerlog, operation: write}
    bootstrap_servers: ["kafka-1:9094"]
    security_protocol: SSL
    ssl_cafile: /etc/kafka/tls/ca.crt
    ssl_certfile: /etc/kafka/tls/node.crt
    ssl_keyfile: /etc/kafka/tls/node.key
"""

RETURN = r"""
created:
  description: ACLs created (or that would be), as C(principal host permission operation type:pattern:name).
  returned: always
  type: list
  elements: str
deleted:
  description: ACLs deleted (or that would be), same form.
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
    from kafka.admin import (
        ACL,
        ACLFilter,
        ACLOperation,
        ACLPermissionType,
        ACLResourcePatternType,
        ResourcePattern,
        ResourcePatternFilter,
        ResourceType,
    )
    from kafka.errors import KafkaError
except ImportError:
    KAFKA_IMPORT_ERROR = traceback.format_exc()

ACL_SPEC = dict(
    principal=dict(type="str", required=True),
    resource_type=dict(
        type="str",
        required=True,
        choices=["topic", "group", "cluster", "transactional_id", "delegation_token", "user"],
    ),
    resource_name=dict(type="str", default="kafka-cluster"),
    pattern_type=dict(type="str", choices=["literal", "prefixed"], default="literal"),
    operation=dict(type="str", required=True),
    permission=dict(type="str", choices=["allow", "deny"], default="allow"),
    host=dict(type="str", default="*"),
)


def key_of(principal, host, permission, operation, resource_type, pattern_type, name):
    """One comparable, printable form for a wanted and an existing ACL."""
    return "%s %s %s %s %s:%s:%s" % (
        principal,
        host,
        permission,
        operation,
        resource_type,
        pattern_type,
        name,
    )


def wanted_acl(module, item):
    """(key, ACL) for a list entry; fails naming the entry when an enum value is unknown."""
    try:
        operation = ACLOperation[item["operation"].upper()]
    except KeyError:
        module.fail_json(msg="Unknown ACL operation %r in %r" % (item["operation"], item))
    if not item["principal"].startswith("User:"):
        module.fail_json(msg="ACL principal must look like User:name, got %r" % item["principal"])
    acl = ACL(
        principal=item["principal"],
        host=item["host"],
        operation=operation,
        permission_type=ACLPermissionType[item["permission"].upper()],
        resource_pattern=ResourcePattern(
            ResourceType[item["resource_type"].upper()],
            item["resource_name"],
            ACLResourcePatternType[item["pattern_type"].upper()],
        ),
    )
    return key_of_acl(acl), acl


def key_of_acl(acl):
    pattern = acl.resource_pattern
    return key_of(
        acl.principal,
        acl.host,
        acl.permission_type.name.lower(),
        acl.operation.name.lower(),
        pattern.resource_type.name.lower(),
        pattern.pattern_type.name.lower(),
        pattern.resource_name,
    )


def existing_acls(admin):
    """{key: ACL} of every ACL in the cluster."""
    acls, error = admin.describe_acls(
        ACLFilter(
            principal=None,
            host=None,
            operation=ACLOperation.ANY,
            permission_type=ACLPermissionType.ANY,
            resource_pattern=ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY),
        )
    )
    if error is not None and getattr(error, "errno", 0) != 0:
        raise RuntimeError("describe_acls failed: %s" % error)
    return dict((key_of_acl(acl), acl) for acl in acls)


def as_filter(acl):
    """A filter that matches exactly this one ACL (for delete_acls)."""
    pattern = acl.resource_pattern
    return ACLFilter(
        principal=acl.principal,
        host=acl.host,
        operation=acl.operation,
        permission_type=acl.permission_type,
        resource_pattern=ResourcePatternFilter(
            pattern.resource_type, pattern.resource_name, pattern.pattern_type
        ),
    )


def main():
    module = AnsibleModule(
        argument_spec=dict(
            acls=dict(type="list", elements="dict", required=True, options=ACL_SPEC),
            purge=dict(type="bool", default=True),
            **CONNECTION_ARGS,
        ),
        supports_check_mode=True,
    )
    if KAFKA_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("kafka-python"), exception=KAFKA_IMPORT_ERROR)
    wanted = dict(wanted_acl(module, item) for item in module.params["acls"])
    admin = connect_admin(module, time.monotonic() + module.params["wait_timeout"])
    result = dict(changed=False, created=[], deleted=[])
    try:
        have = existing_acls(admin)
        create = [acl for key, acl in sorted(wanted.items()) if key not in have]
        delete = (
            [acl for key, acl in sorted(have.items()) if key not in wanted] if module.params["purge"] else []
        )
        result["created"] = [key_of_acl(a) for a in create]
        result["deleted"] = [key_of_acl(a) for a in delete]
        result["changed"] = bool(create or delete)
        if not module.check_mode:
            if create:
                outcome = admin.create_acls(create)
                if outcome.get("failed"):
                    module.fail_json(msg="Creating ACLs failed: %s" % (outcome["failed"],), **result)
            if delete:
                for _filter, _matches, error in admin.delete_acls([as_filter(a) for a in delete]):
                    if error is not None and getattr(error, "errno", 0) != 0:
                        module.fail_json(msg="Deleting ACLs failed: %s" % (error,), **result)
    except (KafkaError, RuntimeError, ValueError) as exc:
        module.fail_json(
            msg="Kafka ACL operation failed: %s" % exc, exception=traceback.format_exc(), **result
        )
    finally:
        with contextlib.suppress(Exception):  # closing must not mask the result
            admin.close()
    module.exit_json(
        diff=dict(before="\n".join(sorted(have)) + "\n", after="\n".join(sorted(wanted)) + "\n"), **result
    )


if __name__ == "__main__":
    main()
