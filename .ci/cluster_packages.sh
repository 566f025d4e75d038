#!/usr/bin/env bash
# Debian packages of the cluster tier (tests/cluster/): SLURM, munge, OpenSSH, pdsh (and ip/nsenter/unshare).
# The tests start their own daemons with their own configuration; the packages' system services are kept from
# starting during the install (policy-rc.d) and are not used. Needs root; a no-op when everything is there.
set -euo pipefail
PKGS="slurmctld slurmd slurm-client munge openssh-server openssh-client pdsh iproute2 util-linux"
installed=$(dpkg-query -W -f='${Status}\n' $PKGS 2>/dev/null | grep -c '^install ok installed' || true)
if [[ $installed -eq $(wc -w <<< "$PKGS") ]]; then
    echo "cluster tier packages: installed"
    exit 0
fi
echo "cluster tier packages: apt-get install $PKGS"
made_policy=0
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
fi
trap 'if [[ $made_policy == 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends $PKGS > /dev/null
