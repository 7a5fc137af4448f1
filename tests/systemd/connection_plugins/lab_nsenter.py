# scripts/test-systemd: Ansible reaches the lab's containers through this.
"""Runs Ansible's commands inside a systemd-nspawn container by entering its
namespaces with nsenter(1): no SSH server, no Python packages and no network
inside the container, and the controller's own ansible-core.

community.docker's nsenter connection would do the same, but it ships in a
collection that ansible-core does not include (only the large `ansible`
bundle does); this is the 60 lines the lab needs.
"""
from __future__ import annotations

DOCUMENTATION = """
name: lab_nsenter
short_description: run commands in a systemd-nspawn container via nsenter
description:
  - Enters the mount, UTS, IPC, PID and cgroup namespaces of the container
    whose PID 1 has the host PID given as ansible_host, with a clean
    environment. The container shares the controller's network namespace.
  - Files are streamed through stdin/stdout of cat, so paths are resolved
    inside the container (symlinks included).
author: apilb developers
extends_documentation_fragment:
  - connection_pipelining
options:
  remote_addr:
    description: Host PID of the container's PID 1 (systemd).
    type: string
    default: inventory_hostname
    vars:
      - name: inventory_hostname
      - name: ansible_host
"""

import shlex
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.module_utils.common.text.converters import to_bytes
from ansible.plugins.connection import ConnectionBase

ENV = [
    "env", "-i",
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root", "LANG=C.UTF-8", "TERM=dumb",
]


class Connection(ConnectionBase):
    transport = "lab_nsenter"
    has_pipelining = True

    def _argv(self, command):
        pid = str(self._play_context.remote_addr)
        if not pid.isdigit():
            raise AnsibleError(f"lab_nsenter: ansible_host must be the container's PID 1, not {pid!r}")
        return ["nsenter", "-t", pid, "-m", "-u", "-i", "-p", "-C", "--", *ENV, "/bin/sh", "-c", command]

    def _connect(self):
        if not self._connected:
            rc, _, err = self._run("true")
            if rc != 0:
                raise AnsibleConnectionFailure(f"lab_nsenter: cannot enter the container: {err!r}")
            self._connected = True
        return self

    def _run(self, command, stdin=None, in_data=None):
        p = subprocess.Popen(
            self._argv(command),
            stdin=stdin if stdin is not None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = p.communicate(in_data)
        return p.returncode, out, err

    def exec_command(self, cmd, in_data=None, sudoable=False):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        return self._run(cmd, in_data=to_bytes(in_data) if in_data is not None else b"")

    def put_file(self, in_path, out_path):
        super().put_file(in_path, out_path)
        with open(in_path, "rb") as f:
            rc, _, err = self._run(f"cat > {shlex.quote(out_path)}", stdin=f)
        if rc != 0:
            raise AnsibleError(f"lab_nsenter: cannot write {out_path}: {err!r}")

    def fetch_file(self, in_path, out_path):
        super().fetch_file(in_path, out_path)
        rc, out, err = self._run(f"cat {shlex.quote(in_path)}")
        if rc != 0:
            raise AnsibleError(f"lab_nsenter: cannot read {in_path}: {err!r}")
        with open(out_path, "wb") as f:
            f.write(out)

    def close(self):
        self._connected = False
