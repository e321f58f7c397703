# -*- coding: utf-8 -*-
# kepler-log: how the role's Kafka modules (kafka_topic, kafka_acl, kafka_scram_user) connect.
#
# One argument spec and one connect loop, so the three modules speak plaintext, TLS with a
# client certificate (the role's own way: the admin host's node certificate, a super user) or
# SASL/SCRAM the same way and report a wrong CA, a host-name mismatch or a refused login as a
# clear failure instead of a timeout.
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import logging
import os
import time

CONNECTION_ARGS = dict(
    bootstrap_servers=dict(type="list", elements="str", required=True),
    security_protocol=dict(
        type="str", choices=["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"], default="PLAINTEXT"
    ),
    ssl_cafile=dict(type="path"),
    ssl_certfile=dict(type="path"),
    ssl_keyfile=dict(type="path"),
    ssl_check_hostname=dict(type="bool", default=True),
    sasl_mechanism=dict(type="str", choices=["SCRAM-SHA-512", "SCRAM-SHA-256"], default="SCRAM-SHA-512"),
    sasl_username=dict(type="str"),
    sasl_password=dict(type="str", no_log=True),
    client_id=dict(type="str", default="ansible-kepler-log"),
    request_timeout_ms=dict(type="int", default=30000),
    wait_timeout=dict(type="int", default=120),
)


def client_kwargs(params, username=None, password=None):
    """kafka-python keyword arguments for the connection described by the module's params.

    `username`/`password` override the SASL identity (kafka_scram_user logs in as the user it
    manages to tell whether the stored password is still the wanted one).
    """
    protocol = params["security_protocol"]
    out = dict(
        bootstrap_servers=params["bootstrap_servers"],
        security_protocol=protocol,
        client_id=params["client_id"],
        request_timeout_ms=params["request_timeout_ms"],
    )
    if protocol in ("SSL", "SASL_SSL"):
        out.update(ssl_check_hostname=params["ssl_check_hostname"])
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if params.get(key):
                out[key] = params[key]
    if protocol.startswith("SASL_"):
        out.update(
            sasl_mechanism=params["sasl_mechanism"],
            sasl_plain_username=username if username is not None else params["sasl_username"],
            sasl_plain_password=password if password is not None else params["sasl_password"],
        )
    return out


def check_connection_params(module):
    """Fail with a message naming the parameter for settings that cannot work."""
    p = module.params
    protocol = p["security_protocol"]
    if protocol in ("SSL", "SASL_SSL"):
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if p.get(key) and not os.access(p[key], os.R_OK):
                module.fail_json(msg="%s %s is not a readable file" % (key, p[key]))
        if bool(p.get("ssl_certfile")) != bool(p.get("ssl_keyfile")):
            module.fail_json(msg="ssl_certfile and ssl_keyfile go together (client certificate)")
    if protocol.startswith("SASL_") and not (p.get("sasl_username") and p.get("sasl_password")):
        module.fail_json(msg="security_protocol %s needs sasl_username and sasl_password" % protocol)


class LastConnectionError(logging.Handler):
    """Keeps the last connection error kafka-python logged.

    kafka-python 3 reports a refused login or an unknown CA only in its log; the exception the
    caller sees is a bootstrap timeout. This handler lets the module name the real cause.
    """

    def __init__(self):
        logging.Handler.__init__(self, logging.WARNING)
        self.text = None

    def emit(self, record):
        message = record.getMessage()
        if "Connection lost" in message or "Connection failed" in message:
            cause = message.split(": ", 1)[-1]
            # the broker drops the connections after a refused login ("socket disconnected"):
            # that generic cause must not hide the specific one (is_fatal, can_log_in read it)
            if not (self.text and is_fatal(self.text) and not is_fatal(cause)):
                self.text = cause


def connect_admin(module, deadline):
    """A KafkaAdminClient, retried (with a pause, not hammering) until `deadline`.

    A refused login or a certificate error is not retried: waiting cannot fix it.
    """
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    check_connection_params(module)
    last = None
    with capture_connection_errors() as seen:
        while True:
            try:
                return KafkaAdminClient(**client_kwargs(module.params))
            except (KafkaError, OSError) as exc:
                last = "%s: %s" % (type(exc).__name__, exc)
                if seen.text:
                    last = "%s (%s)" % (seen.text, last)
                if is_fatal(last):
                    break
            if time.monotonic() >= deadline:
                break
            time.sleep(2)
    module.fail_json(
        msg="Cannot connect to Kafka at %s (%s): %s"
        % (
            ",".join(module.params["bootstrap_servers"]),
            module.params["security_protocol"],
            describe_error(last),
        )
    )


class capture_connection_errors(object):
    """Context manager attaching LastConnectionError to kafka-python's logger."""

    def __enter__(self):
        self.handler = LastConnectionError()
        logging.getLogger("kafka").addHandler(self.handler)
        return self.handler

    def __exit__(self, *exc):
        logging.getLogger("kafka").removeHandler(self.handler)
        return False


def is_fatal(text):
    """True for errors that a retry cannot fix: a refused login, a certificate problem."""
    return (
        "CERTIFICATE_VERIFY_FAILED" in text or "Authentication failed" in text or "SaslAuthentication" in text
    )


def describe_error(text):
    """The error in words an operator can act on."""
    text = str(text)
    if "CERTIFICATE_VERIFY_FAILED" in text and "hostname" in text.lower():
        return "the broker's certificate does not name this host (%s)" % text
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "the broker's certificate is not signed by ssl_cafile's CA (%s)" % text
    if "Authentication failed" in text or "AuthenticationFailed" in text:
        return "login refused: wrong user name or password (%s)" % text
    return text
