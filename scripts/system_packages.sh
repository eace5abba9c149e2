#!/bin/sh
# Install the Debian packages whose program is missing, given as package:program pairs, e.g.
#   scripts/system_packages.sh default-jre-headless:java tesseract-ocr:tesseract
# As root: apt-get installs the missing ones. Otherwise: prints the exact command to run. Programs already on
# PATH are left alone, so running it again changes nothing. Each program is optional for mmlm (a fallback
# exists), so a failed install warns and does not stop `make install-test`.
set -eu

missing=""
for pair in "$@"; do
    package=${pair%%:*}
    program=${pair#*:}
    if [ -z "$package" ] || [ -z "$program" ] || [ "$package" = "$pair" ]; then
        echo "system_packages.sh: expected package:program, got '$pair'" >&2
        exit 2
    fi
    command -v "$program" >/dev/null 2>&1 || missing="$missing $package"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "mmlm: optional system packages missing:$missing; to install them run:" >&2
    echo "  sudo apt-get update -qq && sudo apt-get install -y -qq$missing" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "mmlm: optional system packages missing:$missing (no apt-get here; install them another way)" >&2
    exit 0
fi
echo "mmlm: installing system packages:$missing" >&2
# shellcheck disable=SC2086  # $missing is a list of package names
if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing); then
    echo "mmlm: warning: apt-get could not install$missing; mmlm falls back where it can" >&2
fi
