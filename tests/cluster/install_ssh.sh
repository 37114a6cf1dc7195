#!/usr/bin/env bash
# What the two-node test needs to start ranks the way a cluster with a hostfile does: pdsh (DeepSpeed's default
# multi-node launcher), an OpenSSH server to run inside each test node's network namespace, and iproute2.
exec bash "$(dirname "$0")/apt_install.sh" pdsh ssh ssh-keygen sshd ip -- pdsh openssh-server openssh-client iproute2
