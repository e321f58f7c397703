#!/usr/bin/python
# -*- coding: utf-8 -*-
# kepler-log: SASL/SCRAM users of a Kafka cluster, with kafka-python's admin client.
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: kafka_scram_user
short_description: Create, update or remove a SASL/SCRAM user of a Kafka cluster
description:
  - Kafka stores only a salted hash of a SCRAM password, so the password cannot be read back.
    To tell whether the stored password is still the wanted one, the module logs in as the
    user (I(login_bootstrap_servers), a SASL listener). If that works, nothing changes; if not
    (or the user lacks the mechanism), the credential is written again with a new salt.
    C(changed) is therefore truthful and a second run reports no change.
  - With I(update_password=on_create) an existing user is left alone whatever its password.
options:
  name:
    description: User name (the principal is C(User:name)).
    type: str
    required: true
  password:
    description: Wanted password. Required when I(state=present).
    type: str
  state:
    description: C(present) or C(absent) (removes the user's credential for I(mechanism)).
    type: str
    choices: [present, absent]
    default: present
  mechanism:
    description: SCRAM mechanism of the credential.
    type: str
    choices: [SCRAM-SHA-512, SCRAM-SHA-256]
    default: SCRAM-SHA-512
  iterations:
    description: PBKDF2 iterations (Kafka requires at least 4096).
    type: int
    default: 8192
  update_password:
    description: C(always) checks the password by logging in and rewrites it if needed; C(on_create) sets it only for a new user.
    type: str
    choices: [always, on_create]
    default: always
  login_bootstrap_servers:
    description: A SASL listener (C(host:port)) to check the password against; default I(bootstrap_servers).
    type: list
    elements: str
  login_security_protocol:
    description: Protocol of that listener.
    type: str
    choices: [SASL_SSL, SASL_PLAINTEXT]
    default: SASL_SSL
notes:
  - Connection options as for kafka_topic (module_utils/kafka_connection.py); they name the
    admin identity that writes the credential.
requirements:
  - kafka-python >= 3.0 (speaks to Kafka 4)
"""

EXAMPLES = r"""
- name: The agents' identity
  kafka_scram_user:
    name: keplerlog-agent
    password: "{{ vault_keplerlog_agent_password }}"
    bootstrap_servers: ["kafka-1:9094"]
    security_protocol: SSL
    ssl_cafile: /etc/kafka/tls/ca.crt
    ssl_certfile: /etc/kafka/tls/node.crt
    ssl_keyfile: /etc/kafka/tls/node.key
    login_bootstrap_servers: ["kafka-1:9092"]
  no_log: true
"""

RETURN = r"""
action:
  description: C(create), C(update), C(delete) or C(none).
  returned: always
  type: str
"""

import contextlib
import time
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible.module_utils.kafka_connection import (
    CONNECTION_ARGS,
    capture_connection_errors,
    client_kwargs,
    connect_admin,
)

KAFKA_IMPORT_ERROR = None
try:
    from kafka.admin import (
        KafkaAdminClient,
        ScramMechanism,
        UserScramCredentialDeletion,
        UserScramCredentialUpsertion,
    )
    from kafka.errors import KafkaError
except ImportError:
    KAFKA_IMPORT_ERROR = traceback.format_exc()

MECHANISMS = {"SCRAM-SHA-256": "SCRAM_SHA_256", "SCRAM-SHA-512": "SCRAM_SHA_512"}


def has_credential(admin, name, mechanism):
    """True when the user has a credential for `mechanism`."""
    described = admin.describe_user_scram_credentials([name]).get(name) or {}
    error = described.get("error")
    if error and "does not exist" not in str(error):
        raise RuntimeError("describe_user_scram_credentials(%s): %s" % (name, error))
    return any(info.get("mechanism") == mechanism for info in described.get("credential_infos") or [])


def can_log_in(module, name, password, deadline):
    """Log in as the user on the SASL listener: True if the password is accepted.

    A refused login shows as a connection error in kafka-python's log (the exception is a
    bootstrap timeout); anything else (broker not answering) is retried until `deadline`.
    """
    params = dict(module.params)
    params["bootstrap_servers"] = (
        module.params["login_bootstrap_servers"] or module.params["bootstrap_servers"]
    )
    params["security_protocol"] = module.params["login_security_protocol"]
    params["sasl_mechanism"] = module.params["mechanism"]
    params["request_timeout_ms"] = 10000
    kwargs = client_kwargs(params, username=name, password=password)
    kwargs.pop("ssl_certfile", None)  # the login is SCRAM's alone, not the admin's certificate
    kwargs.pop("ssl_keyfile", None)
    while True:
        with capture_connection_errors() as seen:
            try:
                client = KafkaAdminClient(**kwargs)
            except (KafkaError, OSError) as exc:
                text = "%s %s" % (seen.text, exc)
                if "Authentication failed" in text or "SaslAuthentication" in text:
                    return False
                if time.monotonic() >= deadline:
                    module.fail_json(msg="Cannot check the password of %s: %s" % (name, text))
                time.sleep(2)
                continue
        with contextlib.suppress(Exception):
            client.close()
        return True


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            password=dict(type="str", no_log=True),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            mechanism=dict(type="str", choices=sorted(MECHANISMS), default="SCRAM-SHA-512"),
            iterations=dict(type="int", default=8192),
            update_password=dict(type="str", choices=["always", "on_create"], default="always"),
            login_bootstrap_servers=dict(type="list", elements="str"),
            login_security_protocol=dict(
                type="str", choices=["SASL_SSL", "SASL_PLAINTEXT"], default="SASL_SSL"
            ),
            **CONNECTION_ARGS,
        ),
        required_if=[("state", "present", ("password",))],
        supports_check_mode=True,
    )
    if KAFKA_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("kafka-python"), exception=KAFKA_IMPORT_ERROR)
    p = module.params
    if p["iterations"] < 4096:
        module.fail_json(msg="iterations must be at least 4096 (Kafka refuses fewer)")
    mechanism = ScramMechanism[MECHANISMS[p["mechanism"]]]
    deadline = time.monotonic() + p["wait_timeout"]
    admin = connect_admin(module, deadline)
    result = dict(changed=False, action="none", name=p["name"])
    try:
        exists = has_credential(admin, p["name"], mechanism)
        change = None
        if p["state"] == "absent":
            if exists:
                result["action"] = "delete"
                change = UserScramCredentialDeletion(p["name"], mechanism)
        elif not exists:
            result["action"] = "create"
        elif p["update_password"] == "always" and not can_log_in(module, p["name"], p["password"], deadline):
            result["action"] = "update"
        if result["action"] in ("create", "update"):
            change = UserScramCredentialUpsertion(
                p["name"], mechanism, p["password"], iterations=p["iterations"]
            )
        if change is not None:
            result["changed"] = True
            if not module.check_mode:
                outcome = admin.alter_user_scram_credentials([change])
                error = (outcome or {}).get(p["name"])
                if error not in (None, "", 0):
                    module.fail_json(
                        msg="Writing the SCRAM credential of %s failed: %s" % (p["name"], error), **result
                    )
    except (KafkaError, RuntimeError, ValueError) as exc:
        module.fail_json(
            msg="Kafka SCRAM operation failed: %s" % exc, exception=traceback.format_exc(), **result
        )
    finally:
        with contextlib.suppress(Exception):  # closing must not mask the result
            admin.close()
    module.exit_json(**result)


if __name__ == "__main__":
    main()
