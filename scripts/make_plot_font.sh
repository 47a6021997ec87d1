#!/usr/bin/env bash
# Builds src/study/font/OpenSans-Subset.ttf, the font `dualpriv study` draws its plot
# labels with (plotters' ab_glyph backend reads no system fonts, so the plots render
# the same on a machine without any).
#
# Source: Open Sans Regular 1.10 (Digitized data copyright (c) 2010-2011, Google
# Corporation; Apache License 2.0), from Debian's fonts-open-sans 1.11-2 package.
# Change made: subset with fontTools' pyftsubset to printable ASCII, Latin-1, Greek
# and the few math signs the plots print; hinting dropped. See
# src/study/font/README.md.
#
# Needs: apt-get (to download, not install, the package) and a Python with
# `pip install fonttools` (4.68 was used).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download fonts-open-sans=1.11-2
dpkg -x fonts-open-sans_1.11-2_all.deb x
src=x/usr/share/fonts/truetype/open-sans/OpenSans-Regular.ttf
sha256sum "$src"
pyftsubset "$src" \
  --unicodes="U+0020-007E,U+00A0-00FF,U+0391-03A9,U+03B1-03C9,U+2013,U+2014,U+2026,U+2212,U+221E,U+2248,U+2264,U+2265,U+00D7,U+00B1,U+2022" \
  --no-hinting --desubroutinize --layout-features='kern' \
  --output-file="$here/src/study/font/OpenSans-Subset.ttf"
ls -l "$here/src/study/font/OpenSans-Subset.ttf"
