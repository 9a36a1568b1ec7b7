#!/usr/bin/env bash
# Installs the Debian packages that hold mtml's offline data, if any is missing:
#   fonts-noto-core        — glyphs of ~120 scripts (the `glyphs` few-shot dataset)
#   dataset-fashion-mnist  — Fashion-MNIST IDX files (/usr/share/datasets/fashion-mnist)
#   fortunes               — ~14k short texts in ~40 topic files (/usr/share/games/fortunes)
#   chromium               — headless browser of the `mtml report` page test (not needed to use mtml)
# Without root or apt-get it only says what is missing; the tests that need a package then fail with a message
# naming it.
set -euo pipefail
packages=(fonts-noto-core dataset-fashion-mnist fortunes chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian data packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "warning: missing Debian data packages: ${missing[*]} — install them with: sudo apt-get install ${missing[*]}" >&2
fi
