#!/usr/bin/env bash
# Installs, from Debian's packages, what building twophase needs beyond Rust when it is missing:
# librdkafka is compiled from source with OpenSSL (TLS and SASL over it), which takes a C and C++
# toolchain, make, pkg-config and OpenSSL's headers.
set -euo pipefail

missing=()
command -v cc >/dev/null && command -v c++ >/dev/null && command -v make >/dev/null ||
  missing+=(build-essential)
command -v pkg-config >/dev/null || missing+=(pkg-config)
pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
[[ ${#missing[@]} -eq 0 ]] && exit 0

echo "== installing ${missing[*]} (apt)"
if [[ $(id -u) -eq 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null; then
  as_root=(sudo)
else
  echo "build-deps.sh: missing ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
