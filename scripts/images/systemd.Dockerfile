# Molecule host image: systemd as PID 1, plus what the roles' hosts need at their start.
# Java and venv are preloaded only to keep the test runs fast; the roles still install them.
ARG BASE_IMAGE=keplerlog/debian:12
FROM ${BASE_IMAGE}
ENV container=docker
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      systemd systemd-sysv dbus procps iproute2 cron logrotate python3-venv python3-apt \
      openjdk-17-jre-headless ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && rm -f /lib/systemd/system/multi-user.target.wants/getty* /etc/systemd/system/getty.target.wants/* \
 && systemctl mask systemd-logind.service getty.target console-getty.service
STOPSIGNAL SIGRTMIN+3
CMD ["/lib/systemd/systemd"]
