#!/usr/bin/env bash
# System packages for the reporter's tests (tests/report): pdflatex compiles the LaTeX tables,
# headless chromium renders the HTML report. Idempotent: installs only what is missing.
set -euo pipefail

PACKAGES=(texlive-latex-base texlive-latex-recommended texlive-fonts-recommended chromium)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "report-deps: all present (${PACKAGES[*]})"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

echo "report-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
command -v pdflatex >/dev/null
command -v chromium >/dev/null
echo "report-deps: done"
